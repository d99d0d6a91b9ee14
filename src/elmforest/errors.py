"""User-facing errors.

Anything the user can fix (a bad path, a malformed file, a recipe value out of range) raises
`ElmError` with a one-line message that names the file and the field. The CLI turns it into
one line on stderr and exit status 2, with no traceback unless `--debug` is given.
"""

from __future__ import annotations

from pathlib import Path


class ElmError(Exception):
    """An error the user can fix; its message is one line naming the file, field or value."""

    def __init__(self, message: str, path: str | Path | None = None):
        text = " ".join(str(message).split())  # always one line
        self.path = Path(path) if path is not None else None
        self.detail = text  # the message without the path
        if path is not None:
            text = f"{path}: {text}"
        super().__init__(text)


def require(condition: object, message: str, path: str | Path | None = None) -> None:
    """Raise `ElmError(message)` unless `condition` holds."""
    if not condition:
        raise ElmError(message, path)
