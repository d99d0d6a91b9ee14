"""What runs inside every launcher's worker: one expert training job, its output in train.log.

`run_one(fn, path, threads, attempt, ...)` is called the same way by every launcher in
`elmforest.launch.launchers` (in this process, in a spawned worker, in a Ray task or Ray Train worker,
in a Slurm task): it sets the torch threads, appends the job's stdout and stderr to
`<path>/train.log`, starts the job's data-parallel ranks when asked to (`procs`), and with an
fsspec `storage` URL trains in local scratch space synced to that URL (`elmforest.launch.remote`).
Under G ranks every rank appends to train.log; with `storage` each rank has its own scratch copy
and only rank 0's (log included) is pushed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from elmforest.train import distributed

JobFn = Callable[[str, int | None], dict]

LOG_NAME = "train.log"  # per-job log file inside each expert folder


def one_line(text: str) -> str:
    """The informative line of an error text: the exception line of its (last) traceback, else
    the first line. The exception line is the first unindented line after the frames; text may
    follow it (submitit appends the paths of its logs)."""
    lines = [line.rstrip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("Traceback (most recent call last)")]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if not line[0].isspace():
                return line.strip()
        return lines[-1].strip()
    return lines[0].strip()


def describe(exc: BaseException) -> str:
    return one_line(f"{type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _output_to_log(path: str, fd_level: bool) -> Iterator[None]:
    """Append this job's stdout and stderr to `<path>/train.log` for the duration of the job.

    fd_level also redirects file descriptors 1 and 2, catching output of C code and
    subprocesses; the old descriptors are restored afterwards because Ray and submitit reuse
    the process. Python-level redirection alone is used in-process (sequential), where the
    parent's own descriptors must stay on the terminal.
    """
    with open(Path(path) / LOG_NAME, "a", buffering=1, encoding="utf-8") as f:
        saved: list[int] = []
        if fd_level:
            sys.stdout.flush()
            sys.stderr.flush()
            saved = [os.dup(1), os.dup(2)]
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            f.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def run_one(
    fn: JobFn,
    path: str,
    threads: int | None,
    attempt: int,
    fd_level: bool = True,
    storage: str | None = None,
    sync_seconds: float = 60.0,
    procs: int = 1,
) -> dict:
    """Run one job the way every launcher does: torch threads set, output in train.log.

    procs > 1: spawn the job's ranks here (`distributed.run_procs`), each running this with
    procs=1, and return rank 0's result. Inside a process group (Ray Train's, or one torchrun /
    submitit describe in the environment) every rank runs `fn` itself.
    With `storage` (an fsspec URL), the expert folder lives at STORAGE/<folder name>: it is pulled
    into local scratch space, trained there, and pushed back every `sync_seconds` and at the end
    by rank 0 (see elmforest.launch.remote), so `path` need not exist on this node. Exceptions propagate
    (after their traceback is written to the log).
    """
    if procs > 1:
        args = (fn, path, threads, attempt, True, storage, sync_seconds)
        return distributed.run_procs(run_one, *args, procs=procs, rank_threads=threads)
    with distributed.process_group() as where:
        if not storage:
            return _run_here(fn, path, threads, attempt, fd_level, where)
        from elmforest.launch import remote

        url = remote.join(storage, Path(path).name)
        scratch = remote.scratch_dir(Path(path).name)
        try:
            remote.pull(url, scratch)
            distributed.barrier()  # every rank holds its copy before rank 0 pushes a newer one
            with remote.Pusher(scratch, url, sync_seconds) if where.is_main else contextlib.nullcontext():
                return _run_here(fn, str(scratch), threads, attempt, fd_level, where)
        finally:
            remote.drop_scratch(scratch)


def _run_here(fn: JobFn, path: str, threads: int | None, attempt: int, fd_level: bool, where) -> dict:
    import torch

    before = torch.get_num_threads()
    with _output_to_log(path, fd_level):
        rank = f", rank {where.rank} of {where.size}" if where.size > 1 else ""
        print(f"== elmforest job: attempt {attempt}{rank}, pid {os.getpid()}, threads {threads} ==", flush=True)
        if threads:
            torch.set_num_threads(threads)
        try:
            return fn(path, threads)
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            torch.set_num_threads(before)  # leave a reused process (Ray, sequential) as it was
