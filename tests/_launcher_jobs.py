"""Toy expert trainings for tests/test_launchers.py.

Top-level functions of an importable module, shaped like `experts.train_expert`:
`fn(path, threads) -> dict`. They must be picklable by reference into spawned processes, Ray
tasks and submitit jobs.
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from elmforest.storage import atomic_path

RESULT = "weights.safetensors"


def sgd_job(path: str, threads: int | None) -> dict:
    """A few SGD steps of a tiny nn.Linear seeded by the folder name; idempotent."""
    folder = Path(path)
    if (folder / RESULT).exists():  # finished: return at once, like a finished expert
        return {"name": folder.name, "weight_sum": float(load_file(folder / RESULT)["weight"].sum()), "resumed": True}
    torch.set_num_threads(threads or 1)
    seed = zlib.crc32(folder.name.encode())
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 16, generator=gen)
    y = torch.randn(64, 4, generator=gen)
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"python-level output of {folder.name}")
    os.write(1, f"fd-level output of {folder.name}\n".encode())
    with atomic_path(folder / RESULT) as tmp:
        save_file({"weight": model.weight.detach().contiguous(), "bias": model.bias.detach().contiguous()}, tmp)
    return {
        "name": folder.name,
        "loss": float(loss.detach()),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "weight_sum": float(model.weight.detach().sum()),
        "resumed": False,
    }


def kill_once_job(path: str, threads: int | None) -> dict:
    """SIGKILL our own process on the first attempt (a marker file remembers it), then train."""
    marker = Path(path) / "killed_once"
    if not marker.exists():
        marker.write_text("1")
        os.kill(os.getpid(), signal.SIGKILL)
    return sgd_job(path, threads)


def always_fail_job(path: str, threads: int | None) -> dict:
    """Count the attempt in a file, then fail."""
    with open(Path(path) / "attempts", "a") as f:
        f.write("x")
    raise RuntimeError(f"boom in {Path(path).name}")


def fail_if_marked_job(path: str, threads: int | None) -> dict:
    """Fail in folders holding a `fail` marker, train elsewhere."""
    if (Path(path) / "fail").exists():
        return always_fail_job(path, threads)
    return sgd_job(path, threads)


def sleep_job(path: str, threads: int | None) -> dict:
    """Write our pid and torch threads, then sleep far longer than any test (which interrupts us)."""
    with atomic_path(Path(path) / "pid") as tmp:  # appears complete: the test polls for it
        tmp.write_text(f"{os.getpid()} {torch.get_num_threads()}")
    time.sleep(120)
    return {}


def contract_job(path: str, threads: int | None) -> dict:
    """The launcher contract's job: a `fail` marker fails every attempt, a `flaky` marker fails
    the first attempt only (both counted in `attempts`); otherwise, or after that, `sgd_job`."""
    folder = Path(path)
    if (folder / "fail").exists():
        return always_fail_job(path, threads)
    if (folder / "flaky").exists() and not (folder / "attempts").exists():
        (folder / "attempts").write_text("x")
        raise RuntimeError(f"flaky {folder.name}")
    return sgd_job(path, threads)


def rank_sum_job(path: str, threads: int | None) -> dict:
    """Run on each rank of a data-parallel job: all-reduce (rank + 1) over the group."""
    from elmforest.train import distributed

    where = distributed.world()
    total = distributed.all_reduce_sum(torch.tensor([float(where.rank + 1)]))
    return {"rank": where.rank, "size": where.size, "sum": float(total), "torch_threads": torch.get_num_threads()}
