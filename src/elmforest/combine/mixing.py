"""Mixing settings chosen on validation data: temperature, floor, evidence decay, and the seed.

BTM's cached-prior ensemble wins on the domains its experts know and struggles on novel text,
where the posterior can lock onto one expert (shared/PILOT.md). Its successors soften that: c-BTM
(Gururangan et al. 2023) divides its router scores by a temperature; a floor of uniform weight
keeps every expert in play; an evidence decay sits between the reference code's one-step
posterior and the paper's full prefix; and the seed, trained on every domain, can join the
mixture as a generalist member. None of these may be chosen by looking at test numbers, so
`tune_mixing` picks them per evaluation domain from a small grid by the mixture's NLL on the
*validation* windows that estimate the cached prior, re-estimating that prior for every
candidate (the moving average depends on the settings):

    for each candidate c in GRID:
        prior_c = cached_prior(members, valid windows, batch, alpha, "decayed", mixing=c)
        nll_c   = NLL of the mixture with prior_c and c on the same valid windows
    choose argmin nll_c (ties go to the candidate listed first: the plain one-step ensemble)

Everything works on precomputed log-probs ([members, P, T], `logprobs.expert_logprobs`) and the one
cached-prior computation (`prior.cached_prior`), so the grid costs no model pass.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch

from elmforest.combine.ensemble import SEED_MEMBER, Mixing, mix_logprobs, posterior_log_weights
from elmforest.combine.logprobs import mean_nll
from elmforest.combine.prior import cached_prior
from elmforest.errors import require

TUNED_POSTERIOR = "decayed"  # Mixing.decay spans one_step (0) .. full_prefix (1)

# The grid (96 candidates): the first entry is the plain one-step cached-prior ensemble.
GRID: dict[str, tuple[Any, ...]] = {
    "decay": (0.0, 0.3, 0.7, 1.0),
    "temperature": (1.0, 0.5, 2.0, 4.0),
    "floor": (0.0, 0.05, 0.2),
    "with_seed": (False, True),
}


def grid_candidates(grid: dict[str, tuple[Any, ...]] = GRID) -> list[Mixing]:
    """Every combination of the grid's values, the first values first."""
    keys = list(grid)
    return [Mixing(**dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]


@dataclass
class TunedMixing:
    """What `tune_mixing` chose: settings, the prior over members, and the validation NLLs."""

    mixing: Mixing
    prior: torch.Tensor  # float64 [members]: the experts, then the seed when mixing.with_seed
    members: list[str]
    valid_nll: float
    baseline_valid_nll: float  # the grid's first candidate (plain one-step cached prior)
    candidates: int

    def to_json(self) -> dict[str, Any]:
        return {
            "mixing": self.mixing.to_json(),
            "experts": dict(zip(self.members, self.prior.tolist())),
            "valid_nll": self.valid_nll,
            "baseline_valid_nll": self.baseline_valid_nll,
            "candidates": self.candidates,
        }


def mixture_logprobs(lp: torch.Tensor, prior: torch.Tensor, posterior: str, mixing: Mixing = Mixing()) -> torch.Tensor:
    """The mixture's log-probs over the members with non-zero prior: lp [k, N, T] -> float32 [N, T]."""
    active = (prior > 0).nonzero().flatten()
    logw = posterior_log_weights(lp[active], prior[active].log(), posterior, mixing)
    return mix_logprobs(lp[active], logw)


def mixture_nll(lp: torch.Tensor, prior: torch.Tensor, posterior: str, mixing: Mixing = Mixing()) -> float:
    """Mean NLL per token of the mixture (see `mixture_logprobs`)."""
    return mean_nll(mixture_logprobs(lp, prior, posterior, mixing))


def members_logprobs(expert_lp: torch.Tensor, seed_lp: torch.Tensor | None, with_seed: bool) -> torch.Tensor:
    """The mixture's members' log-probs: the experts [n, N, T], plus the seed's [N, T] as row n."""
    if not with_seed:
        return expert_lp
    require(seed_lp is not None, "mixing with_seed needs the seed's log-probs")
    return torch.cat([expert_lp, seed_lp.unsqueeze(0).to(expert_lp.dtype)])


def tune_mixing(
    names: list[str],
    valid_lp: torch.Tensor,
    seed_valid_lp: torch.Tensor | None,
    batch: int,
    alpha: float,
    candidates: list[Mixing] | None = None,
) -> TunedMixing:
    """Choose the mixing settings with the lowest validation NLL (see the module docstring).

    names: the experts' names (valid_lp rows); valid_lp: [n, P, T] expert log-probs on the prior's
    validation windows; seed_valid_lp: [P, T] the seed's on the same windows (None: candidates
    with the seed are skipped).
    """
    candidates = candidates if candidates is not None else grid_candidates()
    require(candidates, "no mixing candidates to choose from")
    best: tuple[float, Mixing, torch.Tensor] | None = None
    baseline = math.nan
    tried = 0
    for i, mixing in enumerate(candidates):
        if mixing.with_seed and seed_valid_lp is None:
            continue
        lp = members_logprobs(valid_lp, seed_valid_lp, mixing.with_seed)
        prior = cached_prior(lp, batch, alpha, TUNED_POSTERIOR, mixing)
        nll = mixture_nll(lp, prior, TUNED_POSTERIOR, mixing)
        tried += 1
        if i == 0:
            baseline = nll
        if best is None or nll < best[0] - 1e-12:
            best = (nll, mixing, prior)
    assert best is not None  # the first candidate needs no seed only when the caller's grid says so
    nll, mixing, prior = best
    members = [*names, SEED_MEMBER] if mixing.with_seed else list(names)
    return TunedMixing(mixing, prior, members, nll, baseline, tried)
