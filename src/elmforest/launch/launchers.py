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
Ray and submitit are imported only inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elmforest.train import distributed
from elmforest.errors import ElmError, require
from elmforest.launch.worker import LOG_NAME, JobFn, describe, one_line, run_one

from elmforest.config import LauncherConfig

Log = Callable[[str], Any]


def default_workers(n_jobs: int, cores: int | None = None, procs: int = 1) -> tuple[int, int]:
    """(workers, threads per process) that use every core: as many workers as jobs, each job
    running `procs` processes, up to the cores.

    2 cores, 4 jobs -> (2, 1); 2 cores, 1 job -> (1, 2); 8 cores, 3 jobs -> (3, 2);
    8 cores, 3 jobs of 2 processes -> (3, 1).
    """
    cores = max(1, cores or os.cpu_count() or 1)
    workers = max(1, min(n_jobs, cores // procs))
    return workers, max(1, cores // (workers * procs))


@dataclass
class _Job:
    """One expert's training: the folder, its name, and how many times it has been started."""

    name: str
    path: str
    attempts: int = 0


Done = Callable[[_Job, dict], None]  # called once per finished job with its result


class _Retries:
    """Retry bookkeeping shared by every launcher: log each retry, remember final failures."""

    def __init__(self, retries: int, log: Log):
        self.retries = retries
        self.log = log
        self.failures: list[tuple[_Job, str]] = []

    def should_retry(self, job: _Job, reason: str) -> bool:
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


# A launcher's body: run every job (retrying through `_Retries`), report each result to `done`.
Run = Callable[[list[_Job], JobFn, LauncherConfig, _Retries, Done, Log], None]


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
    jobs = [_Job(name, path) for name, path in zip(names, paths)]
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

        def done(job: _Job, result: dict) -> None:
            results[job.name] = result
            progress.advance(task)

        retries = _Retries(config.retries, log)
        launcher.run(jobs, fn, config, retries, done, log)
    if config.storage:
        for p in paths:  # bring the trained experts home (retries' checkpoints included)
            remote.pull(remote.join(config.storage, Path(p).name), p)
    retries.raise_failures()
    return {name: results[name] for name in names}


# --- sequential ------------------------------------------------------------------------------------


def _run_sequential(
    jobs: list[_Job], fn: JobFn, config: LauncherConfig, retries: _Retries, done: Done, log: Log
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
    jobs: list[_Job], fn: JobFn, config: LauncherConfig, retries: _Retries, done: Done, log: Log
) -> None:
    procs = config.procs_per_job
    workers = min(config.workers or default_workers(len(jobs), procs=procs)[0], len(jobs))
    threads = config.threads_per_worker or default_workers(workers, procs=procs)[1]  # cores shared by those in flight
    each = f" of {procs} processes" if procs > 1 else ""
    log(f"training {len(jobs)} experts in {workers} worker processes{each} x {threads} threads")
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/thread state
    queue = deque(jobs)
    running: dict[int, tuple[_Job, Any, Any]] = {}  # sentinel -> (job, process, reader)
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


# --- Ray -------------------------------------------------------------------------------------------


def _ray_task(fn: JobFn, path: str, threads: int, attempt: int, storage=None, sync_seconds=60.0) -> dict:
    return run_one(fn, path, threads, attempt, True, storage, sync_seconds)


def _ray_train_loop(job: dict[str, Any]) -> dict:
    """One Ray Train worker (a rank; Ray Train has joined the process group): run the job."""
    return run_one(job["fn"], job["path"], job["threads"], job["attempt"], True, job["storage"], job["sync_seconds"])


def _ray_trainer_fit(fn: JobFn, job: _Job, config: LauncherConfig, threads: int, storage_path: str) -> dict:
    """Train one expert on `procs_per_job` Ray Train workers (a TorchTrainer); rank 0's result."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = config.num_gpus > 0
    per_worker = {"CPU": config.num_cpus, **({"GPU": config.num_gpus} if use_gpu else {})}
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "fn": fn, "path": job.path, "threads": threads, "attempt": job.attempts,
            "storage": config.storage, "sync_seconds": config.sync_seconds,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=config.procs_per_job, use_gpu=use_gpu, resources_per_worker=per_worker),
        # Ray Train's run records (not our checkpoints: those stay in the expert folder).
        run_config=RunConfig(
            name=f"{job.name.replace('/', '-')}-attempt{job.attempts}",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=0),  # we retry ourselves, from the checkpoint
        ),
    )
    return trainer.fit().return_value


def _run_ray(
    jobs: list[_Job], fn: JobFn, config: LauncherConfig, retries: _Retries, done: Done, log: Log
) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry unless the user opts in
    import ray

    started = False
    if not ray.is_initialized():
        if config.address:
            ray.init(address=config.address)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False)
            started = True
    try:
        have = ray.cluster_resources()
        procs = config.procs_per_job
        if not config.address:  # a fixed cluster cannot grow: a task it cannot fit would wait forever
            for key, want in (("CPU", config.num_cpus), ("GPU", config.num_gpus)):
                require(
                    want * procs <= have.get(key, 0),
                    f"launcher.num_{key.lower()}s={want} x launcher.procs_per_job={procs} exceeds the "
                    f"Ray cluster's {have.get(key, 0)} {key}s",
                )
        threads = config.threads_per_worker or max(1, int(config.num_cpus))
        if procs > 1:
            _run_ray_train(jobs, fn, config, threads, retries, done, log)
            return
        log(f"training {len(jobs)} experts as Ray tasks ({config.num_cpus} CPUs, {config.num_gpus} GPUs each)")
        # max_retries=0: we retry ourselves, so each retry is logged and resumes from the checkpoint.
        remote = ray.remote(num_cpus=config.num_cpus, num_gpus=config.num_gpus, max_retries=0)(_ray_task)
        pending: dict[Any, _Job] = {}

        def submit(job: _Job) -> None:
            job.attempts += 1
            pending[remote.remote(fn, job.path, threads, job.attempts, config.storage, config.sync_seconds)] = job

        for job in jobs:
            submit(job)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    job = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        cause = getattr(e, "cause", None)  # RayTaskError carries the job's exception
                        if retries.should_retry(job, describe(cause) if cause else describe(e)):
                            submit(job)
                        continue
                    done(job, result)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


def _run_ray_train(
    jobs: list[_Job], fn: JobFn, config: LauncherConfig, threads: int, retries: _Retries, done: Done, log: Log
) -> None:
    """Every job a TorchTrainer; their `fit()` calls block, so each runs in a driver thread."""
    if importlib.util.find_spec("ray.train") is None or importlib.util.find_spec("pandas") is None:
        raise ElmError("launcher.procs_per_job > 1 with launcher.kind 'ray' needs Ray Train: pip install 'elmforest[ray]'")
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # job output once in train.log, not twice
    log(
        f"training {len(jobs)} experts as Ray Train runs of {config.procs_per_job} workers "
        f"({config.num_cpus} CPUs, {config.num_gpus} GPUs each)"
    )
    records = str(Path(os.path.commonpath([str(Path(j.path).parent) for j in jobs])) / ".ray_train")
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="elmforest-ray-train") as pool:
        pending: dict[Any, _Job] = {}

        def submit(job: _Job) -> None:
            job.attempts += 1
            pending[pool.submit(_ray_trainer_fit, fn, job, config, threads, records)] = job

        for job in jobs:
            submit(job)
        while pending:
            finished, _ = wait(list(pending), timeout=1.0, return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                try:
                    result = future.result()
                except Exception as e:  # ray.train.TrainingFailedError: a worker raised or died
                    if retries.should_retry(job, _ray_train_reason(e)):
                        submit(job)
                    continue
                done(job, result)


def _ray_train_reason(e: BaseException) -> str:
    """The failing worker's own error inside Ray Train's WorkerGroupError (not a peer's broken
    connection, which follows from it), else the error itself."""
    failures = getattr(e, "worker_failures", None)
    if not isinstance(failures, dict) or not failures:
        return describe(e)
    errors = [getattr(f, "cause", None) or f for _, f in sorted(failures.items())]
    own = [f for f in errors if not distributed.is_collective_error(f)]
    return describe((own or errors)[0])


# --- Slurm (submitit) ------------------------------------------------------------------------------


def _slurm_task(fn: JobFn, path: str, threads: int, attempt: int, storage=None, sync_seconds=60.0, procs=1) -> dict:
    """One Slurm task; with procs > 1 one rank of the job's G tasks, which join one process group."""
    if procs > 1:
        import submitit

        # MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK from Slurm's view of the job. All GPUs of
        # the node stay visible: rank r trains on cuda:LOCAL_RANK.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return run_one(fn, path, threads, attempt, True, storage, sync_seconds)


def _run_slurm(
    jobs: list[_Job], fn: JobFn, config: LauncherConfig, retries: _Retries, done: Done, log: Log
) -> None:
    import submitit

    params = dict(config.slurm)
    parents = [str(Path(j.path).resolve().parent) for j in jobs]  # the forest folder, usually
    folder = params.pop("folder", None) or str(Path(os.path.commonpath(parents)) / ".submitit")
    cluster = params.pop("cluster", None)
    params.setdefault("cpus_per_task", max(1, int(config.num_cpus)))
    procs = config.procs_per_job
    if procs > 1:  # G tasks per job, spread over `nodes` nodes (default 1)
        nodes = int(params.get("nodes", 1))
        require(procs % nodes == 0, f"launcher.procs_per_job={procs} must divide evenly among launcher.slurm nodes={nodes}")
        params.setdefault("tasks_per_node", procs // nodes)
    if config.num_gpus:
        params.setdefault("gpus_per_node", int(config.num_gpus) * int(params.get("tasks_per_node", 1)))
    params.setdefault("timeout_min", 24 * 60)  # submitit's own default (5 min on Slurm) is too short
    threads = config.threads_per_worker or params["cpus_per_task"]
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        executor.update_parameters(**params)
    except (ValueError, NameError, AssertionError) as e:
        raise ElmError(f"launcher.slurm: {describe(e)}") from None
    each = f" of {procs} tasks" if procs > 1 else ""
    log(f"training {len(jobs)} experts as submitit jobs{each} ({executor.cluster}), logs in {folder}")
    active: dict[Any, _Job] = {}

    def submit(job: _Job) -> None:
        job.attempts += 1
        executor.update_parameters(name=f"elmforest-{job.name}")
        args = (fn, job.path, threads, job.attempts, config.storage, config.sync_seconds, procs)
        active[executor.submit(_slurm_task, *args)] = job

    for job in jobs:
        submit(job)
    try:
        while active:
            for sjob in [s for s in active if s.done()]:
                job = active.pop(sjob)
                try:
                    result = sjob.results()[0]  # task 0 is rank 0
                except Exception as e:  # FailedJobError, UncompletedJobError (killed, timed out)
                    if retries.should_retry(job, describe(e)):
                        submit(job)
                    continue
                done(job, result)
            if active:
                time.sleep(0.5)
    finally:
        for sjob in active:
            with contextlib.suppress(Exception):
                sjob.cancel(check=False)


# --- the registry ----------------------------------------------------------------------------------


for _launcher in (
    Launcher("sequential", _run_sequential, "one job after another in this process", in_process=True),
    Launcher("local", _run_local, "one spawned process per job, `workers` at a time"),
    Launcher("ray", _run_ray, "one Ray task (or Ray Train run) per job, on a local or remote cluster", "ray", "ray"),
    Launcher("slurm", _run_slurm, "one submitit job per expert, on Slurm or this machine", "submitit", "slurm"),
):
    LAUNCHERS[_launcher.name] = _launcher
