"""``python -m reskit.cli``: the ``reskit`` command."""

from . import main

raise SystemExit(main())
