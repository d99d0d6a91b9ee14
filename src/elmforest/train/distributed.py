"""Data-parallel training of one model on G processes ("ranks") with torch.distributed.

Every rank holds a full copy of the model. `training.train` gives each rank its share of the
rows of every micro-batch (`shard_rows`) and DistributedDataParallel averages the gradients, so a
step updates the weights exactly as one process on the whole batch would (up to float summation
order). Rank 0 is the *main* rank: it alone prints, writes metrics and checkpoints.

How the process group comes to exist, one of:

- `run_procs(fn, *args, procs=G)` spawns G local processes with MASTER_ADDR=127.0.0.1, a free
  MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set; each joins the group and runs
  `fn`, and rank 0's return value comes back. That is `elmforest train --procs G`, `launcher.
  procs_per_job` with the `sequential` and `local` launchers, and the study's seed/dense/DEMix arms.
- An external launcher set those variables: `torchrun --nproc-per-node G`, or submitit's
  `TorchDistributedEnvironment` (the `slurm` launcher). `process_group()` joins from them.
- Ray Train (`ray` launcher) joined the group before our function runs; it is used as it is.

Backend: gloo on CPU, NCCL on CUDA ("cpu:gloo,cuda:nccl" when CUDA is available, so small
control messages such as the gathered RNG states can stay on the CPU).

Failure: a rank that raises or dies must not leave the others blocked in a collective. Under
`run_procs` the parent watches every rank and terminates the rest as soon as one fails, then
raises one error naming the rank; a rank whose parent dies exits too. Under torchrun and Ray
Train, their own supervisors do the same.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from elmforest.errors import ElmError

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
# How long a collective may wait for a peer before it fails (a hung peer that is still alive).
TIMEOUT = datetime.timedelta(minutes=30)
GRACE_SECONDS = 3.0  # after one rank fails, how long the others get to fail on their own


@dataclass(frozen=True)
class World:
    """This process's place among the ranks training one model (a single process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The initialised process group's view of this process, else a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    rank, size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    return World(rank, size, local_rank, local_size)


def is_main() -> bool:
    """True in rank 0 (and in a plain single process): the one that writes files and prints."""
    return world().is_main


def env_rank() -> int:
    """RANK set by torchrun, submitit or `run_procs` (0 when unset): who prints in a CLI command."""
    return int(os.environ.get("RANK", "0") or 0)


def env_size() -> int:
    """WORLD_SIZE set by torchrun, submitit or `run_procs` (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ElmError(f"environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def backend() -> str:
    """gloo for CPU tensors, plus NCCL for CUDA tensors where this torch build has it."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@contextlib.contextmanager
def process_group() -> Iterator[World]:
    """Join the process group the environment describes (torchrun, submitit, `run_procs`) for the
    duration of the block, then leave it. A group that already exists (Ray Train's) or a world of
    one is used as it is and left alone."""
    if dist.is_initialized() or env_size() <= 1:
        yield world()
        return
    missing = [k for k in ENV_KEYS[:4] if k not in os.environ]
    if missing:
        raise ElmError(f"WORLD_SIZE={env_size()} is set but {', '.join(missing)} is not (start ranks with torchrun)")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)  # NCCL binds each rank to its own GPU
    dist.init_process_group(backend(), timeout=TIMEOUT)
    ok = False
    try:
        yield world()
        ok = True
    finally:
        _leave(ok)


def _leave(ok: bool) -> None:
    """Destroy the group; after an error, abort NCCL communicators instead of waiting on peers."""
    if not dist.is_initialized():
        return
    with contextlib.suppress(Exception):
        if not ok and "nccl" in str(dist.get_backend()):
            dist.distributed_c10d._abort_process_group()
            return
        dist.destroy_process_group()


# --- collectives the training loop uses (no-ops in a world of one) ------------------------------


def barrier() -> None:
    if world().size > 1:
        dist.barrier()


def main_first(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn on rank 0, then on the others once it has finished: for a step that writes files the
    other ranks then find ready (a tokenizer); every rank gets its own call's result."""
    where = world()
    result = fn(*args, **kwargs) if where.is_main else None
    barrier()
    return result if where.is_main else fn(*args, **kwargs)


def shard_rows(rows: int, where: World, source: str = "batch") -> slice:
    """Rows [r*b/G, (r+1)*b/G) of a b-row micro-batch: rank r's share.

    Every rank draws the same sampler batch and keeps its slice, so the data order and the global
    batch are those of a single process; G must divide b (and so cannot exceed it)."""
    if rows % where.size:
        raise ElmError(
            f"{where.size} processes cannot split a micro-batch of {rows} rows evenly; "
            f"use a process count that divides {rows}",
            source,
        )
    per = rows // where.size
    return slice(where.rank * per, (where.rank + 1) * per)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum `values` over the ranks (in place, returned); unchanged in a world of one."""
    if world().size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (picklable objects, sent through gloo)."""
    if world().size == 1:
        return [obj]
    out: list[Any] = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def device_of(name: str, where: World) -> torch.device:
    """The torch device `name` (cpu, cuda, cuda:1, ...) for this rank: rank r of G trains on
    cuda:LOCAL_RANK; a missing GPU, or fewer GPUs than local ranks, is a user error."""
    device = torch.device(name)
    if device.type != "cuda":
        return device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise ElmError(f"device={name!r}: no CUDA device on this machine")
    if where.size > 1:
        if where.local_size > gpus:
            raise ElmError(f"{where.local_size} processes on this machine need a GPU each; it has {gpus}")
        device = torch.device("cuda", where.local_rank)
    return device


def data_parallel(model: torch.nn.Module, device: torch.device, where: World, find_unused: bool = False):
    """`model` wrapped in DistributedDataParallel under G > 1 ranks, else None.

    find_unused: some parameters may get no gradient on a rank (DEMix: a rank's rows may skip
    some domains' MLPs); DDP then marks them ready with zeros instead of waiting for them."""
    if where.size == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        forward_sync_buffers=False,  # no buffer is trained; they are equal on every rank already
        find_unused_parameters=find_unused,
    )


# --- spawning G local ranks ---------------------------------------------------------------------


class RankFailed(RuntimeError):
    """One of the G ranks failed; the message names it and says how."""


def free_port() -> int:
    """A TCP port nothing listens on right now (rank 0 binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_procs(procs: int, source: str = "--procs") -> None:
    """Refuse a process count below 1, or above the cores of a machine without GPUs (on a GPU
    machine `training.train` checks the count against the GPUs once it knows the device)."""
    cores = os.cpu_count() or 1
    if procs < 1:
        raise ElmError(f"{source}={procs}: must be >= 1")
    if procs > cores and not torch.cuda.is_available():
        raise ElmError(f"{source}={procs} exceeds the {cores} CPU cores of this machine")


def run_procs(fn: Callable[..., Any], *args: Any, procs: int, rank_threads: int | None = None, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` on `procs` ranks of one process group; return rank 0's result.

    procs=1 calls fn here. In an environment that already describes the ranks (torchrun,
    submitit, Ray Train) every rank calls fn itself and gets its own result; `procs` must then be
    1 or the environment's WORLD_SIZE. Otherwise this spawns `procs` fresh processes, each with
    `rank_threads` torch threads (default cores // procs); if one raises or dies, the others are
    stopped at once and this raises `RankFailed` naming it (`ElmError` for a user error, which
    every rank raises alike). `fn`, its arguments and rank 0's result travel by pickle: `fn` must
    be a top-level function of an importable module.
    """
    outer = world().size if dist.is_initialized() else env_size()
    if outer > 1:
        if procs not in (1, outer):
            raise ElmError(f"--procs {procs}: this process is already one of {outer} ranks (torchrun or a launcher)")
        with process_group():
            return fn(*args, **kwargs)
    check_procs(procs)
    if procs == 1:
        return fn(*args, **kwargs)
    threads = rank_threads or max(1, (os.cpu_count() or 1) // procs)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/thread state
    port = free_port()
    running: dict[Any, tuple[int, Any]] = {}  # result pipe -> (rank, process)
    results: dict[int, Any] = {}
    failures: list[tuple[int, str, str]] = []  # (rank, kind, one-line reason)
    try:
        for rank in range(procs):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_rank_main,
                args=(fn, args, kwargs, rank, procs, port, threads, writer),
                name=f"elmforest-rank{rank}",
                daemon=True,
            )
            proc.start()
            writer.close()  # only the child writes; our copy closed lets us see EOF when it dies
            running[reader] = (rank, proc)
        deadline = None
        while running and (deadline is None or time.monotonic() < deadline):
            # A pipe is ready when its rank sent its message (read now, however large) or died (EOF).
            for reader in multiprocessing.connection.wait(list(running), timeout=0.5):
                rank, proc = running.pop(reader)
                message = _receive(reader)
                proc.join()
                if message is not None and message[0] == "ok":
                    results[rank] = message[1]
                else:
                    failures.append((rank, *(message[1:] if message else ("killed", _exit_reason(proc.exitcode)))))
            if failures and deadline is None:
                deadline = time.monotonic() + GRACE_SECONDS  # the others may fail on their own first
    finally:  # done, a failure, or Ctrl-C: no rank outlives this call
        _stop(running)
    if failures:
        rank, kind, reason = _root_cause(failures)
        if kind == "ElmError":
            raise ElmError(reason)
        raise RankFailed(f"rank {rank} of {procs}: {reason}")
    return results[0]


def _root_cause(failures: list[tuple[int, str, str]]) -> tuple[int, str, str]:
    """The failure to report: a user error, else the first that is not a peer's broken connection."""
    user = [f for f in failures if f[1] == "ElmError"]
    own = [f for f in failures if f[1] != "collective"]
    return (user or own or failures)[0]


def _receive(reader) -> tuple | None:
    try:
        message = reader.recv()
    except (EOFError, OSError):
        message = None
    reader.close()
    return message


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exited with status {exitcode} without a result"


def _stop(running: dict[Any, tuple[int, Any]]) -> None:
    for rank, proc in running.values():
        proc.terminate()
    for reader, (rank, proc) in running.items():
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        reader.close()


def _exit_with_parent() -> None:
    """Exit when the process that spawned us dies (SIGKILL gives it no chance to stop us)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="elmforest-parent-watch").start()


def _rank_main(fn, args, kwargs, rank: int, size: int, port: int, threads: int, conn) -> None:
    """Body of one spawned rank: join the group, run fn, send ("ok", result) or an error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent alone handles it and stops us
    _exit_with_parent()
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size),
    )
    torch.set_num_threads(threads)
    try:
        with process_group():
            result = fn(*args, **kwargs)
        message: tuple = ("ok", result if rank == 0 else None)
    except BaseException as e:
        traceback.print_exc()
        kind = "ElmError" if isinstance(e, ElmError) else "collective" if is_collective_error(e) else "error"
        reason = str(e) if kind == "ElmError" else _one_line(f"{type(e).__name__}: {e}")
        message = ("error", kind, reason)
    with contextlib.suppress(OSError):  # the parent may be gone already
        conn.send(message)
        conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    if message[0] != "ok":
        os._exit(1)


def is_collective_error(e: BaseException) -> bool:
    """A collective that failed because a peer went away (a consequence, not the cause)."""
    text = str(e)
    return isinstance(e, dist.DistError) or "Connection closed by peer" in text or "Connection reset" in text


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"
