"""Real expert trainings for tests/test_parallel_experts.py, importable by spawned workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from elmforest.btm.experts import train_expert

MARKER = ".killed-once"


def train_then_die(path: str, threads: int | None) -> dict:
    """`experts.train_expert`, but the first attempt SIGKILLs its own process once the expert has
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


def train_killed_past(path: str, threads: int | None, step: int) -> dict:
    """`experts.train_expert`, SIGKILLed by itself once metrics.jsonl logs a step past `step`."""
    metrics = Path(path) / "metrics.jsonl"

    def killer() -> None:
        while True:
            if metrics.exists():
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
                if steps and steps[-1] > step:
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.005)

    threading.Thread(target=killer, daemon=True).start()
    return train_expert(path, threads)


# --- a storage URL whose upload dies halfway ------------------------------------------------------

KILLED_IN_PUSH = "killed-in-push-{}"  # beside the expert folders in the bucket: survives the retry


class KillingFileSystem(LocalFileSystem):
    """Local files under `killpush://PATH`. In a worker's periodic push that re-uploads
    train_state.pt after an earlier checkpoint already reached the bucket, it writes half of the
    file to the upload's temporary name and SIGKILLs its own process: a worker killed inside a
    push, with a stale checkpoint and half a new one at the URL. Once per expert."""

    protocol = ("killpush",)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("killpush://") :] if path.startswith("killpush://") else path)

    def put_file(self, lpath, rpath, **kwargs):
        target = Path(self._strip_protocol(rpath).removesuffix(".partial"))
        marker = target.parents[1] / KILLED_IN_PUSH.format(target.parent.name)
        if target.name == "train_state.pt" and target.exists() and not marker.exists():
            from elmforest.models.checkpoint import load_train_state

            data = Path(lpath).read_bytes()
            Path(self._strip_protocol(rpath)).write_bytes(data[: len(data) // 2])
            stored = load_train_state(target)["step"]
            marker.write_text(f"{load_train_state(lpath)['step']} {stored}")  # local step, stored step
            os.kill(os.getpid(), signal.SIGKILL)
        return super().put_file(lpath, rpath, **kwargs)


fsspec.register_implementation("killpush", KillingFileSystem, clobber=True)


def train_with_killing_storage(path: str, threads: int | None) -> dict:
    """`experts.train_expert`, run from this module so that workers register `killpush://`."""
    return train_expert(path, threads)
