"""Where expert trainings run: in this process, in local worker processes, on Ray, or on Slurm.

Experts train with zero communication between them (the "embarrassingly parallel" part of
BTM), so a launcher only has to run one plain function per expert folder:

    fn(path: str, threads: int | None) -> dict     # e.g. elmforest.btm.experts.train_expert

`fn` reads everything it needs from the folder, resumes from the folder's last checkpoint and is
idempotent. That is what makes failures cheap: a job whose worker dies (exception, non-zero exit,
SIGKILL, Ray task error, Slurm job failure) is simply called again on the same folder, up to
`LauncherConfig.retries` times, and picks up where its last checkpoint left off. Each retry logs
one line `retry 1/2 for expert NAME: <reason>`; the other jobs are not disturbed. An expert that
still fails after its retries raises `ElmError` once every other job has finished.

Kinds (`LauncherConfig.kind`, the registry `LAUNCHERS`):

- `sequential`: one job after another in this process (debugging; Python-level output only is
  captured in the log).
- `local` (default): one spawned process per job, at most `workers` in flight, each with
  `threads` torch threads. One process per job (not a pool) so a killed worker costs only its
  own job.
- `ray`: one Ray task per job. Ray is started in-process (and shut down afterwards) unless it
  is already running or `address` names a cluster. Every node must see the expert folders at
  the same paths (a shared filesystem: NFS, Lustre, ...) or `storage` must be set; `fn` must be
  importable on every node.
- `slurm`: one submitit job per expert; `LauncherConfig.slurm` holds submitit `AutoExecutor`
  parameters plus `folder` (submitit's logs, default `<common parent>/.submitit`) and `cluster`
  (`slurm`, or `local` to run on this machine; default: auto-detected).

Data-parallel jobs (`procs_per_job: G` > 1, see `elmforest.train.distributed`): each job trains its
one expert on G processes of one torch.distributed group; experts still exchange nothing.
`sequential` and `local` spawn the G ranks on this machine (from this process, or from the job's
worker process); `ray` runs each job as a Ray Train `TorchTrainer` with G workers; `slurm` asks
for G tasks per job and exports the distributed environment in each. A rank that dies fails the
whole job, which is retried like any other.

Each job runs through `elmforest.launch.worker.run_one`, which appends its stdout and stderr to
`<path>/train.log` (a log stream, not a result file, so it is appended rather than written
atomically). `fn` must be a top-level function of an importable module: it is pickled by reference into spawned processes, Ray tasks and Slurm jobs.
The shared pieces (`Job`, `Retries`, `Launcher`) live in `elmforest.launch.jobs`; `ray` and `slurm`
in `elmforest.launch.cluster_launchers`, the only module that imports Ray or submitit (inside the
functions that need them).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elmforest.config import LauncherConfig
from elmforest.errors import ElmError, require
from elmforest.launch.cluster_launchers import run_ray, run_slurm
from elmforest.launch.jobs import Done, Job, Launcher, Log, Retries
from elmforest.launch.worker import JobFn, describe, run_one


def default_workers(n_jobs: int, cores: int | None = None, procs: int = 1) -> tuple[int, int]:
    """(workers, threads per process) that use every core: as many workers as jobs, each job
    running `procs` processes, up to the cores.

    2 cores, 4 jobs -> (2, 1); 2 cores, 1 job -> (1, 2); 8 cores, 3 jobs -> (3, 2);
    8 cores, 3 jobs of 2 processes -> (3, 1).
    """
    cores = max(1, cores or os.cpu_count() or 1)
    workers = max(1, min(n_jobs, cores // procs))
    return workers, max(1, cores // (workers * procs))


LAUNCHERS: dict[str, Launcher] = {}  # filled at the end of this module, in the order listed above


def get_launcher(kind: str) -> Launcher:
    """The registered launcher `kind` (the recipe's launcher.kind), or an error listing the choices."""
    if kind not in LAUNCHERS:
        raise ElmError(f"launcher.kind: unknown launcher {kind!r}; choose one of {', '.join(LAUNCHERS)}")
    return LAUNCHERS[kind]


def run_jobs(
    paths: list[str],
    fn: JobFn,
    config: LauncherConfig,
    *,
    names: list[str] | None = None,
    log: Log = print,
) -> dict[str, dict]:
    """Run `fn(path, threads)` once per expert folder, the way `config.kind` says, each job on
    `config.procs_per_job` processes.

    Returns {name: fn's result} in the order of `paths`; names default to the folder names.
    Raises ElmError naming the expert if one still fails after `config.retries` retries.
    """
    paths = [str(Path(p).absolute()) for p in paths]  # workers may start in another folder (Ray Train)
    names = list(names) if names is not None else [Path(p).name for p in paths]
    require(len(names) == len(paths), f"{len(names)} names given for {len(paths)} expert folders")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ElmError(f"two experts are named {dup[0]!r}")
    for path in paths:
        require(Path(path).is_dir(), "expert folder not found", path)
    if not paths:
        return {}
    launcher = get_launcher(config.kind)
    launcher.require()
    if config.storage:
        from elmforest.launch import remote

        folders = [Path(p).name for p in paths]
        require(len(set(folders)) == len(folders), "launcher.storage needs expert folders with distinct names")
        for p in paths:  # sync: newest checkpoint from storage first, then what only this side has
            remote.pull(remote.join(config.storage, Path(p).name), p)
            remote.push(p, remote.join(config.storage, Path(p).name))
        log(f"expert folders synced to {config.storage}")
    jobs = [Job(name, path) for name, path in zip(names, paths)]
    results: dict[str, dict] = {}
    # The bar is bound to the real stderr now, so in-process jobs redirecting sys.stderr
    # to their train.log do not capture the bar's refreshes.
    with Progress(
        TextColumn(f"experts ({config.kind})"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
    ) as progress:
        task = progress.add_task("experts", total=len(jobs))

        def done(job: Job, result: dict) -> None:
            results[job.name] = result
            progress.advance(task)

        retries = Retries(config.retries, log)
        launcher.run(jobs, fn, config, retries, done, log)
    if config.storage:
        for p in paths:  # bring the trained experts home (retries' checkpoints included)
            remote.pull(remote.join(config.storage, Path(p).name), p)
    retries.raise_failures()
    return {name: results[name] for name in names}


# --- sequential ------------------------------------------------------------------------------------


def _run_sequential(
    jobs: list[Job], fn: JobFn, config: LauncherConfig, retries: Retries, done: Done, log: Log
) -> None:
    procs = config.procs_per_job
    threads = config.threads_per_worker or default_workers(1, procs=procs)[1]
    each = f", {procs} processes each" if procs > 1 else ""
    log(f"training {len(jobs)} experts one after another{each}, {threads} threads")
    for job in jobs:
        while True:
            job.attempts += 1
            try:
                result = run_one(fn, job.path, threads, job.attempts, False, config.storage, config.sync_seconds, procs)
            except Exception as e:  # KeyboardInterrupt propagates
                if retries.should_retry(job, describe(e)):
                    continue
                break
            done(job, result)
            break


# --- local worker processes ------------------------------------------------------------------------


def _local_worker(fn: JobFn, path: str, threads: int, attempt: int, conn, storage=None, sync_seconds=60.0, procs=1) -> None:
    """Body of one spawned worker: run the job and send ("ok", result) or ("error", reason)."""
    # Ctrl-C reaches the whole process group; the parent alone handles it and terminates us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        message = ("ok", run_one(fn, path, threads, attempt, True, storage, sync_seconds, procs))
    except BaseException as e:
        message = ("error", describe(e))
    with contextlib.suppress(OSError):  # the parent may be gone already
        conn.send(message)
        conn.close()


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"worker killed by {signal.Signals(-exitcode).name}"
    return f"worker exited with status {exitcode} without a result"


def _run_local(
    jobs: list[Job], fn: JobFn, config: LauncherConfig, retries: Retries, done: Done, log: Log
) -> None:
    procs = config.procs_per_job
    workers = min(config.workers or default_workers(len(jobs), procs=procs)[0], len(jobs))
    threads = config.threads_per_worker or default_workers(workers, procs=procs)[1]  # cores shared by those in flight
    each = f" of {procs} processes" if procs > 1 else ""
    log(f"training {len(jobs)} experts in {workers} worker processes{each} x {threads} threads")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/thread state
    queue = deque(jobs)
    running: dict[int, tuple[Job, Any, Any]] = {}  # sentinel -> (job, process, reader)
    try:
        while queue or running:
            while queue and len(running) < workers:
                job = queue.popleft()
                job.attempts += 1
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=_local_worker,
                    args=(fn, job.path, threads, job.attempts, writer, config.storage, config.sync_seconds, procs),
                    name=f"elmforest-{job.name}",
                    daemon=procs == 1,  # a daemonic process may not start the job's ranks
                )
                proc.start()
                writer.close()  # only the child writes; our copy closed lets us see EOF
                running[proc.sentinel] = (job, proc, reader)
            # Wake on any exit; the timeout keeps Ctrl-C responsive while blocked here.
            ready = multiprocessing.connection.wait(list(running), timeout=1.0)
            for sentinel in ready:
                job, proc, reader = running.pop(sentinel)
                proc.join()
                # The child sends before it exits, so its message (if any) is in the pipe now;
                # a killed child leaves only the end of the pipe (EOF).
                try:
                    message = reader.recv() if reader.poll() else None
                except EOFError:
                    message = None
                reader.close()
                message = message or ("error", _exit_reason(proc.exitcode))
                if message[0] == "ok":
                    done(job, message[1])
                elif retries.should_retry(job, message[1]):
                    queue.appendleft(job)
    finally:  # normal end: nothing left; Ctrl-C or an error here: stop the workers (their ranks follow)
        for job, proc, reader in running.values():
            proc.terminate()
        for job, proc, reader in running.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            reader.close()


# --- the registry ----------------------------------------------------------------------------------


for _launcher in (
    Launcher("sequential", _run_sequential, "one job after another in this process", in_process=True),
    Launcher("local", _run_local, "one spawned process per job, `workers` at a time"),
    Launcher("ray", run_ray, "one Ray task (or Ray Train run) per job, on a local or remote cluster", "ray", "ray"),
    Launcher("slurm", run_slurm, "one submitit job per expert, on Slurm or this machine", "submitit", "slurm"),
):
    LAUNCHERS[_launcher.name] = _launcher
