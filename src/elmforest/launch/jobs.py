"""What every launcher shares: the jobs it runs, their retries, and the shape of a launcher.

A launcher (`elmforest.launch.launchers.LAUNCHERS`) is a `Launcher`: a name, what it needs
installed, and a body `run(jobs, fn, config, retries, done, log)` that runs `fn(path, threads)`
once per `Job` and reports each result to `done`. A job that fails goes to `Retries`, which logs
`retry 1/2 for expert NAME: <reason>` and says whether to run it again (it resumes from its
folder's checkpoint) or remembers the failure for `run_jobs` to raise once every job has ended.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elmforest.config import LauncherConfig
from elmforest.errors import ElmError
from elmforest.launch.worker import LOG_NAME, JobFn, one_line

Log = Callable[[str], Any]


@dataclass
class Job:
    """One expert's training: the folder, its name, and how many times it has been started."""

    name: str
    path: str
    attempts: int = 0


Done = Callable[[Job, dict], None]  # called once per finished job with its result


class Retries:
    """Retry bookkeeping shared by every launcher: log each retry, remember final failures."""

    def __init__(self, retries: int, log: Log):
        self.retries = retries
        self.log = log
        self.failures: list[tuple[Job, str]] = []

    def should_retry(self, job: Job, reason: str) -> bool:
        """After `job` failed with `reason`: True to run it again, False once it has no retries left."""
        reason = one_line(reason)
        if job.attempts <= self.retries:
            self.log(f"retry {job.attempts}/{self.retries} for expert {job.name}: {reason}")
            return True
        self.failures.append((job, reason))
        return False

    def raise_failures(self) -> None:
        if not self.failures:
            return
        job, reason = self.failures[0]
        more = f" (and {len(self.failures) - 1} more failed experts)" if len(self.failures) > 1 else ""
        raise ElmError(
            f"expert {job.name} failed after {job.attempts} attempts: {reason}; "
            f"see {Path(job.path) / LOG_NAME}{more}"
        )


# A launcher's body: run every job (retrying through `Retries`), report each result to `done`.
Run = Callable[[list[Job], JobFn, LauncherConfig, Retries, Done, Log], None]


@dataclass(frozen=True)
class Launcher:
    """One way of running expert trainings, with what it needs."""

    name: str
    run: Run
    summary: str
    package: str | None = None  # the optional package it imports (None: nothing beyond elmforest)
    extra: str | None = None  # the elmforest extra that installs it: pip install 'elmforest[extra]'
    in_process: bool = False  # jobs run in the caller's process (their output is captured at the Python level only)

    @property
    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def require(self) -> None:
        if not self.available:
            raise ElmError(f"launcher.kind: {self.name!r} needs {self.package}: pip install 'elmforest[{self.extra}]'")
