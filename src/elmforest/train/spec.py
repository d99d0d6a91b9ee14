"""What the training loop takes: the run's hyper-parameters (`TrainSpec`), the sampler protocol it
draws batches from (`Sampler`), and what an arm hands it beside the model: the routing hook (`Route`,
DEMix), an extra loss term (`ExtraLoss`, BTX's load balancing) and the model's training FLOPs per token
(`FlopsPerToken`, a Mixtral's or an anchored expert's). Apart from the loop so that the loop
(`train.loop`) and its bookkeeping (`train.state`) both import these without importing each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import torch

from elmforest.errors import ElmError


@dataclasses.dataclass
class TrainSpec:
    """Hyper-parameters of one training run (flat and typed; the CLI builds it from a recipe)."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warm-up."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment coefficients."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (every >= 2-D parameter, embeddings included)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from ~0 to `lr`."""
    total_steps: int = 100
    """Steps the schedule is defined over; the learning rate reaches `final_lr_fraction * lr` here."""
    final_lr_fraction: float = 0.1
    """Learning rate at `total_steps`, as a fraction of `lr` (linear decay after the warm-up)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    micro_batches: int = 1
    """Sampler batches (forward/backward passes) accumulated into one optimizer step."""
    bf16: bool = False
    """Run forward passes under torch.autocast(bfloat16); the loss is computed in float32."""
    compile: bool = False
    """torch.compile the model's forward (bit-identical resumption is not guaranteed with it)."""
    threads: int | None = None
    """torch.set_num_threads for this process; None leaves the current setting."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl (the last step is always logged)."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints (the last step is always checkpointed)."""
    eval_every: int = 0
    """Steps between valid-loss evaluations; 0: only at the end. Needs `valid_batches`."""
    seed: int = 0
    """Seeds torch's RNG at the start of a fresh run (dropout-free models draw nothing from it)."""
    device: str = "cpu"
    """torch device to train on, e.g. "cpu" or "cuda"."""

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        checks = [
            (self.lr > 0, "lr", "must be > 0"),
            (all(0 <= b < 1 for b in self.betas), "betas", "must lie in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.total_steps > 0, "total_steps", "must be > 0"),
            (0 <= self.warmup_steps < self.total_steps, "warmup_steps", "must be in [0, total_steps)"),
            (0 <= self.final_lr_fraction <= 1, "final_lr_fraction", "must be in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0"),
            (self.micro_batches >= 1, "micro_batches", "must be >= 1"),
            (self.threads is None or self.threads >= 1, "threads", "must be >= 1"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
            (self.eval_every >= 0, "eval_every", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ElmError(f"train spec {name}={getattr(self, name)!r}: {why}")


class Sampler(Protocol):
    """What `train` needs from a sampler (see `elmforest.data.sampler`): batch i depends only on (seed, i)."""

    def next_batch(self) -> torch.Tensor: ...  # LongTensor [B, block+1]

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # With `train(route=...)` only: the batch and each row's domain id, (LongTensor [B, block+1], LongTensor [B]).
    # def next_batch_with_domains(self) -> tuple[torch.Tensor, torch.Tensor]: ...


# Called with each batch's per-row domain ids [B] before its forward pass (see the module docstring).
Route = Callable[[torch.Tensor], None]

# Training FLOPs (forward + backward) per token of the model at a block length: what the loop counts
# in metrics.jsonl's `flops` and `mfu` and in its result. Default: the dense formula
# `models.factory.flops_per_token(model.config, block)`; an arm whose model costs something else per
# token (a Mixtral runs top-k of its experts; an anchored expert skips frozen weights' gradients) passes
# the figure its own run JSON reports, so the two agree.
FlopsPerToken = Callable[[int], int]


@dataclasses.dataclass(frozen=True)
class ExtraLoss:
    """A term the loop adds to each training micro-batch's mean next-token cross-entropy before the
    backward pass, e.g. BTX's `coef x load-balancing loss` (`mixtures.btx.load_balancing`).

    The logged loss (metrics.jsonl, `final_loss`) stays the cross-entropy alone, and validation
    forwards run without it. Per step the gradient is that of mean over micro-batches of
    (cross-entropy + term).
    """

    term: Callable[[Any], torch.Tensor]
    """The model's output (e.g. a `MoeCausalLMOutputWithPast`) -> a scalar tensor, part of the graph."""
    forward_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Keyword arguments added to every training forward, asking the model for what `term` reads
    (e.g. {"output_router_logits": True})."""
