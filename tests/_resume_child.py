"""Test helpers for training: a tiny learnable sampler, the tiny model/spec, and a child process.

Run as a script it trains the tiny model into a folder (tests/test_training.py kills it midway
with SIGKILL and runs it again to check bit-identical resumption):

    python tests/_resume_child.py OUT --steps 40 --checkpoint-every 5 [--delay 0.05]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

VOCAB = 32
BLOCK = 16
ROWS = 4


class PatternSampler:
    """A synthetic language: each row counts from a random start by a random stride (1-3) mod VOCAB.

    Learnable from context (infer the stride, add it), so the loss can fall quickly. Batch i is a
    pure function of (seed, i), the same protocol as `elmforest.data.sampler`. `delay` sleeps per batch
    so a test can kill a run midway.
    """

    def __init__(self, seed: int, rows: int = ROWS, block: int = BLOCK, delay: float = 0.0):
        self.seed, self.rows, self.block, self.delay = seed, rows, block, delay
        self.batches = 0

    def batch(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, i])
        start = rng.integers(0, VOCAB, (self.rows, 1))
        stride = rng.integers(1, 4, (self.rows, 1))
        return torch.from_numpy((start + stride * np.arange(self.block + 1)) % VOCAB).long()  # [B, block+1]

    def next_batch(self) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        out = self.batch(self.batches)
        self.batches += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert state["seed"] == self.seed
        self.batches = int(state["batches"])


def tiny_model_spec(family: str = "gpt2"):
    from elmforest.models.factory import ModelSpec

    return ModelSpec(family=family, layers=2, width=64, heads=2, context=BLOCK, vocab_size=VOCAB)


def tiny_train_spec(**overrides: Any):
    from elmforest.train.spec import TrainSpec

    fields: dict[str, Any] = dict(
        lr=1e-2, warmup_steps=3, total_steps=30, final_lr_fraction=0.1, grad_clip=1.0, micro_batches=2,
        threads=1, log_every=1, checkpoint_every=5, seed=0,
    )
    fields.update(overrides)
    return TrainSpec(**fields)


def main() -> None:
    from elmforest.models.factory import build_model
    from elmforest.train.loop import train

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = tiny_train_spec(total_steps=args.steps, checkpoint_every=args.checkpoint_every)
    result = train(build_model(tiny_model_spec(), seed=0), PatternSampler(7, delay=args.delay), spec, args.out,
                   progress=False)
    print(f"start_step={result['start_step']} steps={result['steps']}")


if __name__ == "__main__":
    main()
