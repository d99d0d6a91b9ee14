"""Expert log-probs on a set of windows: the one function every scorer calls.

Every way of combining experts (a cached-prior ensemble, its prior, an updating prior, tuned
mixing, DEMix's domain posterior, c-BTM's router, growth's parents) starts from the same table

    lp[j, i, t] = log p_j(x_{i,t} | x_{i,<t})      j: expert, i: window, t = 1..T

computed by `expert_logprobs`: windows [N, T+1] in batches of `batch_size`, one expert after
the other, each moved to `device` for its pass and back after it, so a forest larger than the
device's memory is still scored with one expert resident at a time. An expert may be given as a
loader (a function returning the model), called when its turn comes and dropped after it, so a
lazily loaded forest never holds more than one model. With a prior, only the experts whose
prior weight is non-zero run (a top-k ensemble costs k passes, not n).

The batch size is part of what is computed: on an accelerator a different batch may change the
last digits of a model's output, so the study, the CLI and growth pass the batch they score with
(the recipe's `eval.batch_size`, the CLI's --batch-size, default `EVAL_BATCH`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from elmforest.combine.evaluate import model_device, token_logprobs
from elmforest.errors import require

EVAL_BATCH = 8  # windows per forward pass unless a caller says otherwise (the recipe's eval.batch_size default)

Member = nn.Module | Callable[[], nn.Module]  # a model, or a function that loads it when its turn comes


def active_members(prior: torch.Tensor | Sequence[float] | None, n: int) -> list[int]:
    """Indices of the experts that run under `prior` (non-zero weight); all n when None."""
    if prior is None:
        return list(range(n))
    weights = torch.as_tensor(prior, dtype=torch.float64).reshape(-1)
    require(weights.numel() == n, f"prior has {weights.numel()} entries but there are {n} experts")
    return [j for j in range(n) if weights[j] > 0]


@torch.inference_mode()
def expert_logprobs(
    members: Sequence[Member],
    windows: torch.Tensor,
    batch_size: int = EVAL_BATCH,
    device: str | torch.device | None = None,
    prior: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """Each running expert's log p(x_t | x_<t) on `windows` [N, T+1] -> float32 [k, N, T].

    members: models or loaders (see the module docstring); device: where each model runs (None:
    where it is); prior: a weight per member, only those with weight > 0 run, in order (k of n
    rows; None: all). Returned on the windows' device.
    """
    require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    require(windows.ndim == 2 and windows.shape[0] >= 1 and windows.shape[1] >= 2, "need windows [N, T+1], N >= 1, T >= 1")
    rows = []
    for j in active_members(prior, len(members)):
        model = members[j] if isinstance(members[j], nn.Module) else members[j]()
        home = model_device(model)
        if device is not None:
            model.to(device)
        try:
            rows.append(torch.cat([token_logprobs(model, windows[s : s + batch_size]) for s in range(0, len(windows), batch_size)]))
        finally:
            if device is not None:
                model.to(home)
        del model
    require(rows, "no expert runs: the prior is zero for every one")
    return torch.stack(rows)


def mean_nll(logprobs: torch.Tensor) -> float:
    """Mean negative log-likelihood per predicted token (nats) of a log-prob table [..., T], summed
    in float64: the one reduction behind every perplexity the study and the CLI report."""
    return float(-logprobs.double().mean())
