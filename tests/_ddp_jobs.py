"""Rank functions for the data-parallel tests (tests/test_distributed.py).

Top-level functions of an importable module: `distributed.run_procs` pickles them by reference
into spawned ranks. Each trains the tiny model of tests/_resume_child.py on its PatternSampler.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from _resume_child import ROWS, PatternSampler, tiny_model_spec, tiny_train_spec
from elmforest.train import distributed
from elmforest.train.state import read_metrics

KILLED = ".killed-rank"


def train_tiny(out: str, steps: int = 6, delay: float = 0.0, valid: int = 0, rows: int = ROWS, **spec: Any) -> dict:
    """Train the tiny GPT-2 into `out` for `steps` steps (under whatever process group exists).
    spec: TrainSpec overrides, plus train()'s stop_at_step."""
    import torch

    from elmforest.models.factory import build_model
    from elmforest.train.loop import train

    torch.set_num_threads(1)
    stop = spec.pop("stop_at_step", None)
    valid_batches = [PatternSampler(99).batch(i) for i in range(valid)]
    model = build_model(tiny_model_spec(), seed=0)
    return train(
        model, PatternSampler(7, rows=rows, delay=delay), tiny_train_spec(total_steps=steps, **spec), out,
        progress=False, valid_batches=valid_batches or None, stop_at_step=stop,
    )


def train_tiny_kill_rank1(out: str, steps: int, **spec: Any) -> dict:
    """`train_tiny`, but on the first attempt rank 1 SIGKILLs itself once rank 0 has logged step
    checkpoint_every + 1 (so the first checkpoint is on disk: rank 0 writes it before that step):
    one rank of a data-parallel run dying mid-run. OUT/.killed-rank records the logged step."""
    folder = Path(out)
    if distributed.world().rank == 1 and not (folder / KILLED).exists():

        def killer() -> None:
            while True:
                rows = read_metrics(folder / "metrics.jsonl")
                if rows and rows[-1]["step"] > spec["checkpoint_every"]:
                    (folder / KILLED).write_text(str(rows[-1]["step"]))
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.005)

        threading.Thread(target=killer, daemon=True).start()
    return train_tiny(out, steps, delay=0.05, **spec)


def raise_on_rank1(out: str) -> dict:
    """Rank 1 raises before training; rank 0 enters the loop and would wait for it forever."""
    if distributed.world().rank == 1:
        raise RuntimeError("boom on rank 1")
    return train_tiny(out, 4)


def rank_and_size() -> tuple[int, int]:
    w = distributed.world()
    return w.rank, w.size


def anchored_with_audit(expert_dir: str) -> tuple[int, list[str], int, dict]:
    """`train_anchored_expert` on this rank, watching what it writes -> every rank's
    (rank, ["<event> <path under expert_dir>", ...], FLOP counts run, the returned record).

    A Python audit hook sees every file opened for writing (builtins.open, os.open: tempfile's
    temporaries included), renamed into place, copied, created or removed, whatever writes the
    bytes afterwards (torch.save, safetensors)."""
    import sys

    from elmforest.mixtures import anchored_flops
    from elmforest.mixtures.anchored import train_anchored_expert

    root = os.path.realpath(expert_dir)
    writes: list[str] = []
    counted = [0]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def note(event: str, path: Any) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            full = os.path.realpath(os.fsdecode(path))
            if full == root or full.startswith(root + os.sep):
                writes.append(f"{event} {os.path.relpath(full, root)}")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (not mode and flags & write_flags):
                note("open", path)
        elif event in ("os.rename", "shutil.copyfile", "shutil.copytree"):
            note(event, args[1])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            note(event, args[0])

    count = anchored_flops.anchored_training_flops

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted[0] += 1
        return count(*args, **kwargs)

    anchored_flops.anchored_training_flops = counting
    sys.addaudithook(hook)  # for the rest of this spawned rank's life
    meta = train_anchored_expert(expert_dir, 1)
    return distributed.gather_objects((distributed.world().rank, list(writes), counted[0], meta))
