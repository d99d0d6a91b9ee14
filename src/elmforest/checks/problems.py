"""What `elmforest check` finds: problems (one line each, naming the file) and leftovers.

Every check (`elmforest.checks.folders`, `elmforest.checks.mixtures`, `elmforest.checks.check`) reports to
one `Collector`, which turns the `ElmError` of any loader it calls into a `Problem` and carries on,
so one run lists every problem of a folder instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmforest.errors import ElmError


@dataclass(frozen=True)
class Problem:
    """One thing wrong, located at a file or folder."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Report:
    """What `check_path` found: the folder's kind, problems, leftovers of killed writes, notes."""

    path: Path
    kind: str
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # "kind path" of every folder validated

    @property
    def ok(self) -> bool:
        return not self.problems


class Collector:
    """Accumulates problems; `attempt` turns an ElmError from a loader into a Problem."""

    def __init__(self, report: Report):
        self.report = report

    def add(self, path: Path, message: str) -> None:
        self.report.problems.append(Problem(Path(path), " ".join(message.split())))

    def attempt(self, path: Path, fn: Callable[[], Any]) -> Any:
        """Run `fn`; on ElmError record it at the path it names (else `path`) and return None."""
        return self.run(path, fn)[1]

    def succeeds(self, path: Path, fn: Callable[[], Any]) -> bool:
        """Run `fn`; True when it raised no ElmError (which is recorded)."""
        return self.run(path, fn)[0]

    def run(self, path: Path, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except ElmError as e:
            self.add(e.path or path, e.detail)
            return False, None

    def read_json(self, path: Path, what: str) -> dict[str, Any] | None:
        """The JSON object in `path`, or None with the problem recorded."""
        from elmforest.combine.forest import read_json

        return self.attempt(path, lambda: read_json(path, what))

    def counts(self, path: Path, data: dict[str, Any], keys: tuple[str, ...]) -> None:
        """Each of `keys` present in `data` must be a non-negative integer (tokens, FLOPs, steps)."""
        for key in keys:
            if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] < 0):
                self.add(path, f"field {key!r} must be a non-negative integer, got {data[key]!r}")


def child_dirs(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            yield p
