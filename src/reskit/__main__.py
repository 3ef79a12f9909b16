"""``python -m reskit``: the ``reskit`` command."""

from .cli import main

raise SystemExit(main())
