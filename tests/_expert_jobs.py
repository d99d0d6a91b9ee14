"""Real expert trainings for tests/test_parallel_experts.py, importable by spawned workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from elmforest.phases import train_expert

MARKER = ".killed-once"


def train_then_die(path: str, threads: int | None) -> dict:
    """`phases.train_expert`, but the first attempt SIGKILLs its own process once the expert has
    written a checkpoint and logged a later step: a worker dying mid-training."""
    folder = Path(path)
    if not (folder / MARKER).exists():
        (folder / MARKER).write_text("")

        def killer() -> None:
            metrics = folder / "metrics.jsonl"
            while True:
                if (folder / "train_state.pt").exists() and metrics.exists():
                    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
                    state_step = json.loads((folder / "train.json").read_text()).get("step", 0)
                    if steps and steps[-1] > state_step:
                        os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(0.005)

        threading.Thread(target=killer, daemon=True).start()
    return train_expert(path, threads)
