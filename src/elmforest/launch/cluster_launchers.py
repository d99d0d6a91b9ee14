"""The cluster launchers: Ray (tasks, or Ray Train runs for data-parallel jobs) and Slurm (submitit).

The only module that imports Ray or submitit, and only inside the functions that need them, so
elmforest imports without either. Both are registered in `elmforest.launch.launchers.LAUNCHERS`
(`ray`, `slurm`) and keep the same contract as the local launchers (see that module): one call of
`fn(path, threads)` per expert folder through `elmforest.launch.worker.run_one`, failures retried
from the folder's checkpoint by `Retries`.

- `ray`: one Ray task per job (`max_retries=0`: elmforest retries, logging each), or with
  `procs_per_job` G > 1 one Ray Train `TorchTrainer` of G workers per job, each `fit()` in a
  driver thread.
- `slurm`: one submitit job per expert, G tasks per job when data-parallel; task 0 is rank 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from elmforest.config import LauncherConfig
from elmforest.errors import ElmError, require
from elmforest.launch.jobs import Done, Job, Log, Retries
from elmforest.launch.worker import JobFn, describe, run_one
from elmforest.train import distributed


# --- Ray -------------------------------------------------------------------------------------------


def _ray_task(fn: JobFn, path: str, threads: int, attempt: int, storage=None, sync_seconds=60.0) -> dict:
    return run_one(fn, path, threads, attempt, True, storage, sync_seconds)


def _ray_train_loop(job: dict[str, Any]) -> dict:
    """One Ray Train worker (a rank; Ray Train has joined the process group): run the job."""
    return run_one(job["fn"], job["path"], job["threads"], job["attempt"], True, job["storage"], job["sync_seconds"])


def _ray_trainer_fit(fn: JobFn, job: Job, config: LauncherConfig, threads: int, storage_path: str) -> dict:
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


def run_ray(
    jobs: list[Job], fn: JobFn, config: LauncherConfig, retries: Retries, done: Done, log: Log
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
        pending: dict[Any, Job] = {}

        def submit(job: Job) -> None:
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
    jobs: list[Job], fn: JobFn, config: LauncherConfig, threads: int, retries: Retries, done: Done, log: Log
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
        pending: dict[Any, Job] = {}

        def submit(job: Job) -> None:
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


def run_slurm(
    jobs: list[Job], fn: JobFn, config: LauncherConfig, retries: Retries, done: Done, log: Log
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
    active: dict[Any, Job] = {}

    def submit(job: Job) -> None:
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
