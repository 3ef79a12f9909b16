"""What reskit's HTTP middleware share: problem responses (RFC 9457) and status lines."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

__all__ = ["DOCS", "Problem", "status_line"]

#: Where a problem's ``type`` points: the docs page that explains it, at an anchor.
DOCS = "https://github.com/reskit/reskit/blob/main/docs/"


class Problem(Exception):
    """A request the middleware answers itself, as ``application/problem+json``.

    ``type`` is ``DOCS + page + "#" + slug``: a link to where the docs explain
    the problem and what a client should do about it.
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        page: str = "idempotency.md",
        retry_after: int | None = None,
        **members: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.page = page
        self.title = title
        self.detail = detail
        self.retry_after = retry_after
        self.members = members

    def response(self) -> tuple[int, list[tuple[str, str]], bytes]:
        """Status, headers and body of the problem response."""
        document = {
            "type": f"{DOCS}{self.page}#{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.members,
        }
        body = json.dumps(document, separators=(",", ":")).encode()
        headers = [
            ("content-type", "application/problem+json"),
            ("content-length", str(len(body))),
        ]
        if self.retry_after is not None:
            headers.append(("retry-after", str(self.retry_after)))
        return self.status, headers, body


def status_line(status: int) -> str:
    """``"201 Created"``: a WSGI status line."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"
