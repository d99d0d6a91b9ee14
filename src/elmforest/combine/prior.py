"""The cached prior: the one computation of the reference code's moving-average prior, and its record.

BTM weights the experts on a test domain by a prior estimated on that domain's validation
windows (the reference code): start uniform; for each batch of `batch_size` windows, average the
posterior weights w_j(t) (under the current prior, with the chosen posterior and mixing
settings) over the batch's windows and positions, and move the prior towards that mean,

    prior <- (1 - alpha) * prior + alpha * mean_{windows, positions} w(t)      (alpha 0.3, batches of 4)

then freeze the last value for the test split. The *updating* prior runs the same moving
average over the test windows themselves, scoring each batch under the prior before it.

Both work on a table of expert log-probs [n, P, T] (`logprobs.expert_logprobs`), so every
caller (the study, `elmforest ensemble/eval/average/generate`, growth, tuned mixing, DEMix)
computes the same numbers from the same windows: they differ only in how they obtain the table.
The estimate depends on how many batches it sees (the start's weight is (1 - alpha)^batches):
use ~100 windows in batches of 4, as the reference does.

`PriorRecord` is a cached prior on disk (`--save-prior`, `--load-prior`):

    {"domain", "experts": {member: weight}, "posterior", "batches", "windows", "alpha",
     "mixing": {"temperature", "floor", "decay", "with_seed"}}
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elmforest import storage
from elmforest.combine.ensemble import (
    NO_MIXING,
    SEED_MEMBER,
    Mixing,
    PriorLike,
    check_posterior,
    mix_logprobs,
    normalise_prior,
    posterior_log_weights,
)
from elmforest.combine.forest import read_json
from elmforest.errors import ElmError, require


def ema_batches(windows: int, batch_size: int) -> int:
    """Moving-average steps over `windows` windows in batches of `batch_size`."""
    return math.ceil(windows / batch_size)


def _ema_walk(
    lp: torch.Tensor, batch_size: int, alpha: float, posterior: str, start: PriorLike | None, mixing: Mixing
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batch by batch over the table lp [n, N, T]: yields (the batch's log-probs [n, b, T], the log
    weights used on it under the prior *before* it, the prior *after* it)."""
    check_posterior(posterior)
    require(0.0 < alpha <= 1.0, f"alpha must be in (0, 1], got {alpha}")
    require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    require(lp.ndim == 3 and lp.shape[1] >= 1, "need expert log-probs [n, N, T] of at least one window")
    current = normalise_prior(start, lp.shape[0])  # float64 [n]
    for s in range(0, lp.shape[1], batch_size):
        batch = lp[:, s : s + batch_size]
        logw = posterior_log_weights(batch, current.log(), posterior, mixing)  # [n, b, T]
        batch_mean = logw.exp().mean(dim=(1, 2)).cpu()  # [n]
        current = (1 - alpha) * current + alpha * batch_mean
        yield batch, logw, current


def cached_prior(
    lp: torch.Tensor,
    batch_size: int = 4,
    alpha: float = 0.3,
    posterior: str = "one_step",
    mixing: Mixing = NO_MIXING,
    return_history: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """The cached prior over the n members from their log-probs on validation windows lp [n, P, T].

    Starting from uniform, each batch of `batch_size` windows updates prior <- (1-alpha) prior +
    alpha * (mean posterior over the batch's windows and positions, under the current prior,
    `posterior` and `mixing`). Returns the final prior (float64 [n]); with return_history also
    the priors after each batch (the uniform start first).
    """
    history = [normalise_prior(None, lp.shape[0])]
    for _batch, _logw, current in _ema_walk(lp, batch_size, alpha, posterior, None, mixing):
        history.append(current)
    return (history[-1], history) if return_history else history[-1]


def updating_logprobs(
    lp: torch.Tensor,
    batch_size: int = 4,
    alpha: float = 0.3,
    posterior: str = "one_step",
    prior: PriorLike | None = None,
    mixing: Mixing = NO_MIXING,
) -> torch.Tensor:
    """Mixture log-probs [N, T] under the *updating* prior, from the members' test log-probs lp
    [n, N, T]: the cached-prior moving average run over the test windows themselves, scoring batch
    b with the prior after batches < b (no window sees its own tokens through the prior). Starts
    from `prior` (uniform when None)."""
    return torch.cat([mix_logprobs(batch, logw) for batch, logw, _ in _ema_walk(lp, batch_size, alpha, posterior, prior, mixing)])


# --- the prior on disk --------------------------------------------------------------------------


@dataclass
class PriorRecord:
    """A cached prior as saved by `--save-prior`: weights by member name plus how it was made.

    Members are the forest's experts, and `seed` when the mixing lets the seed join; `mixing`
    holds the temperature, floor, decay and with_seed the prior was estimated (and is to be used) with.
    """

    domain: str
    experts: dict[str, float]
    posterior: str
    batches: int
    windows: int
    alpha: float = 0.3
    mixing: dict[str, Any] | None = None

    def vector(self, names: Sequence[str]) -> torch.Tensor:
        """The prior in `names` order (members the record does not name get 0), normalised."""
        return normalise_prior([self.experts.get(n, 0.0) for n in names], len(names))

    @property
    def mix(self) -> Mixing:
        return Mixing.from_json(self.mixing)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "experts": dict(self.experts),
            "posterior": self.posterior,
            "batches": self.batches,
            "windows": self.windows,
            "alpha": self.alpha,
            "mixing": self.mix.to_json(),
        }


def save_prior(path: str | Path, record: PriorRecord) -> None:
    """Write a prior record as JSON (atomically)."""
    storage.write_json(path, record.to_json())


def load_prior(path: str | Path, names: Sequence[str]) -> PriorRecord:
    """Read a prior record; every member it names must be one of `names` (the forest's) or the seed."""
    path = Path(path)
    data = read_json(path, "prior file")
    experts = data.get("experts")
    require(isinstance(experts, dict) and experts, "field 'experts' must be a non-empty {name: weight} object", path)
    unknown = [k for k in experts if k not in names and k != SEED_MEMBER]
    require(not unknown, f"unknown expert(s) {', '.join(map(repr, unknown))}; the forest has {', '.join(names)}", path)
    for k, w in experts.items():
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        require(ok, f"experts.{k} must be a non-negative number, got {w!r}", path)
    require(sum(experts.values()) > 0, "field 'experts' has all-zero weights", path)
    mixing = data.get("mixing")
    require(mixing is None or isinstance(mixing, dict), "field 'mixing' must be an object", path)
    try:
        mix = Mixing.from_json(mixing)
    except (ElmError, TypeError, ValueError) as e:
        raise ElmError(f"field 'mixing': {getattr(e, 'detail', e)}", path) from None
    require(mix.with_seed == (SEED_MEMBER in experts), "field 'mixing.with_seed' disagrees with a 'seed' entry in 'experts'", path)
    return PriorRecord(
        domain=str(data.get("domain", "")),
        experts={k: float(v) for k, v in experts.items()},
        posterior=str(data.get("posterior", "")),
        batches=int(data.get("batches", 0)),
        windows=int(data.get("windows", 0)),
        alpha=float(data.get("alpha", 0.3)),
        mixing=mix.to_json(),
    )
