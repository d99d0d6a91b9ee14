"""Domain-posterior ensembles of expert LMs (BTM's "ensemble").

The mixture's next-token probability is

    p(x_t | x_<t) = sum_j w_j(t) * p_j(x_t | x_<t),      w_j(t) = P(D=j | x_<t)

and everything below is done in log space: log p = logsumexp_j(log w_j(t) + log p_j(x_t | x_<t)).
The per-position weights come from a prior over experts and a *posterior* (a rule in the
`POSTERIORS` registry), each computing an *evidence* term from the experts' log-probs of the
tokens already seen:

    full_prefix  (the paper)         log w_j(t) ∝ log prior_j + sum_{s<t} log p_j(x_s | x_<s)
    one_step     (the reference code) log w_j(t) ∝ log prior_j + log p_j(x_{t-1} | x_<t-1)
    decayed      (gamma in [0, 1])    log w_j(t) ∝ log prior_j + sum_{s<t} gamma^(t-1-s) log p_j(x_s | x_<s)
    prior        (no update)          log w_j(t) ∝ log prior_j
    uniform      (fixed weights)      w_j(t) = 1/k over the experts that run

normalised over experts at every position; position 1 (the first predicted token, whose only
context is the window's first token) uses the prior alone. `Mixing` adds the settings tuned on
validation data (`elmforest.combine.mixing`): a temperature dividing the evidence, a floor of uniform
weight, w <- (1 - floor) w + floor / k, the decay gamma of `decayed` (gamma = 0 is one_step,
gamma = 1 full_prefix), and whether the seed joins the experts as a generalist member. On novel
text the full-prefix posterior locks onto one expert within a window; the one-step posterior
stays near the prior and scored best in the pilot (shared/PILOT.md), so it is the default.

Priors: the cached and the updating prior (the reference code's moving average of batch-mean
posteriors) are `elmforest.combine.prior`'s. `top_k_prior` keeps the k largest entries; an
`Ensemble` only runs experts whose prior is non-zero, so cost scales with k, not n. The experts'
log-probs come from `elmforest.combine.logprobs.expert_logprobs`, the function every scorer uses.

Shapes: tokens [B, T+1] (T predicted tokens per window); expert log-probs [k, B, T]; weights
[k, B, T]; mixture log-probs [B, T]. Weights are computed in float64 (prefix sums over long
windows reach thousands of nats, where float32 loses the differences between experts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from elmforest.combine.logprobs import expert_logprobs
from elmforest.errors import ElmError, require

Evidence = Callable[[torch.Tensor, "Mixing"], torch.Tensor]  # lp [k, ..., T] float64 -> evidence [k, ..., T]


@dataclass(frozen=True)
class Mixing:
    """Settings on top of a posterior, chosen per domain on validation data (`elmforest.combine.mixing`).

    The defaults change nothing: temperature 1, no floor, the posterior's own decay, no seed.
    """

    temperature: float = 1.0
    """Divides the evidence: > 1 flattens the posterior towards the prior, < 1 sharpens it."""
    floor: float = 0.0
    """Weight spread uniformly over the k running members: w <- (1 - floor) w + floor / k."""
    decay: float = 0.0
    """Evidence decay gamma of the `decayed` posterior (0: one-step, 1: full prefix)."""
    with_seed: bool = False
    """The seed joins the mixture as one more (generalist) member; callers that hold it add it."""

    def __post_init__(self) -> None:
        require(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        require(0.0 <= self.floor <= 1.0, f"floor must be in [0, 1], got {self.floor}")
        require(0.0 <= self.decay <= 1.0, f"decay must be in [0, 1], got {self.decay}")

    def to_json(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "floor": self.floor, "decay": self.decay, "with_seed": self.with_seed}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "Mixing":
        data = data or {}
        return cls(
            temperature=float(data.get("temperature", 1.0)),
            floor=float(data.get("floor", 0.0)),
            decay=float(data.get("decay", 0.0)),
            with_seed=bool(data.get("with_seed", False)),
        )


NO_MIXING = Mixing()
SEED_MEMBER = "seed"  # the seed's name among the members when it joins the mixture (Mixing.with_seed)


def _shifted(lp: torch.Tensor) -> torch.Tensor:
    """lp(t-1) at position t, 0 at the first position: [k, ..., T] -> [k, ..., T]."""
    return torch.cat([torch.zeros_like(lp[..., :1]), lp[..., :-1]], dim=-1)


def one_step_evidence(lp: torch.Tensor, mixing: Mixing) -> torch.Tensor:
    """evidence(t) = log p_j(x_{t-1}): the previous token's likelihood."""
    return _shifted(lp)


def full_prefix_evidence(lp: torch.Tensor, mixing: Mixing) -> torch.Tensor:
    """evidence(t) = sum_{s<t} log p_j(x_s): an exclusive prefix sum."""
    return _shifted(lp).cumsum(-1)


def decayed_evidence(lp: torch.Tensor, mixing: Mixing) -> torch.Tensor:
    """evidence(t) = sum_{s<t} gamma^(t-1-s) log p_j(x_s), gamma = mixing.decay.

    As one matrix product: evidence = lp @ D with D[s, t] = gamma^(t-1-s) for s < t, else 0
    ([T, T]; 0^0 = 1, so gamma = 0 gives the one-step evidence and gamma = 1 the full prefix).
    """
    T = lp.shape[-1]
    s = torch.arange(T, dtype=lp.dtype).unsqueeze(1)
    t = torch.arange(T, dtype=lp.dtype).unsqueeze(0)
    exponent = t - 1 - s  # [T, T]
    decay = torch.where(exponent >= 0, torch.tensor(mixing.decay, dtype=lp.dtype).pow(exponent.clamp(min=0)), 0.0)
    return lp @ decay


@dataclass(frozen=True)
class Posterior:
    """A per-position weighting rule; `POSTERIORS` holds every one the tool knows."""

    name: str
    evidence: Evidence | None
    """The evidence from the tokens seen so far; None: the weights never move with the text."""
    uses_prior: bool
    """False: fixed uniform weights over the experts that run, whatever the prior."""
    help: str

    @property
    def updates(self) -> bool:
        """Does the weight move with the text? Only such a posterior can estimate a cached prior."""
        return self.evidence is not None


POSTERIORS: dict[str, Posterior] = {
    p.name: p
    for p in (
        Posterior("one_step", one_step_evidence, True, "previous token's likelihood (the reference code)"),
        Posterior("full_prefix", full_prefix_evidence, True, "the whole prefix's likelihood (the paper's formula)"),
        Posterior("decayed", decayed_evidence, True, "the prefix's likelihood decayed by --decay per token"),
        Posterior("prior", None, True, "the prior alone, no per-token update"),
        Posterior("uniform", None, False, "fixed 1/k weights over the experts that run"),
    )
}
UPDATING_POSTERIORS = tuple(name for name, p in POSTERIORS.items() if p.updates)


def posterior_help() -> str:
    """One line per registered posterior, for --help texts."""
    return "; ".join(f"{name}: {p.help}" for name, p in POSTERIORS.items())


PriorLike = torch.Tensor | Sequence[float]


def check_posterior(posterior: str) -> Posterior:
    """The registered posterior of that name; an unknown name is refused, naming the known ones."""
    if posterior not in POSTERIORS:
        raise ElmError(f"unknown posterior {posterior!r}; choose one of {', '.join(POSTERIORS)}")
    return POSTERIORS[posterior]


def normalise_prior(prior: PriorLike | None, n: int) -> torch.Tensor:
    """A prior over n experts as a float64 vector summing to 1 (uniform when None).

    Entries must be finite and non-negative with a positive sum; they are divided by their sum.
    """
    require(n >= 1, "an ensemble needs at least one expert")
    if prior is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    p = torch.as_tensor(prior, dtype=torch.float64).detach().cpu().reshape(-1)
    require(p.numel() == n, f"prior has {p.numel()} entries but there are {n} experts")
    require(bool(torch.isfinite(p).all()), f"prior has non-finite entries: {p.tolist()}")
    require(bool((p >= 0).all()), f"prior has negative entries: {p.tolist()}")
    require(float(p.sum()) > 0, "prior is all zeros")
    return p / p.sum()


def top_k_prior(prior: PriorLike, k: int) -> torch.Tensor:
    """Keep the k largest prior entries, zero the rest, renormalise -> float64 [n]."""
    p = normalise_prior(prior, len(prior))
    require(k >= 1, f"top-k needs k >= 1, got {k}")
    if k >= p.numel():
        return p
    keep = torch.topk(p, k).indices
    out = torch.zeros_like(p)
    out[keep] = p[keep]
    return out / out.sum()


def posterior_log_weights(
    expert_lp: torch.Tensor, log_prior: torch.Tensor, posterior: str, mixing: Mixing = NO_MIXING
) -> torch.Tensor:
    """Normalised log w_j(t) for predicting token t from tokens < t -> float64 [k, B, T].

    expert_lp [k, B, T] holds log p_j(x_t | x_<t); log_prior [k] (may hold -inf).
    log w_j(t) = log prior_j + evidence_j(t) / temperature, normalised over j, then mixed with
    `mixing.floor` of uniform weight.
    """
    rule = check_posterior(posterior)
    lp = expert_lp.double()
    if not rule.uses_prior:
        log_prior = torch.zeros_like(log_prior)
    logw = log_prior.to(lp).view(-1, *([1] * (lp.ndim - 1))).expand_as(lp)
    if rule.evidence is not None:
        logw = logw + rule.evidence(lp, mixing) / mixing.temperature
    logw = logw - torch.logsumexp(logw, dim=0, keepdim=True)
    if mixing.floor > 0:
        k = lp.shape[0]
        floor = torch.full_like(logw, math.log(mixing.floor / k))
        logw = torch.logaddexp(logw + math.log1p(-mixing.floor), floor) if mixing.floor < 1 else floor
    return logw


def next_log_weights(
    history_lp: torch.Tensor, log_prior: torch.Tensor, posterior: str, mixing: Mixing = NO_MIXING
) -> torch.Tensor:
    """Normalised log weights for the token *after* a scored history [k, ..., t] -> [k, ...].

    Used while generating: the weights at position t+1 depend only on positions <= t, so a
    placeholder column is appended and the last position's weights are read off.
    """
    placeholder = history_lp.new_zeros((*history_lp.shape[:-1], 1))
    padded = torch.cat([history_lp, placeholder], dim=-1)
    return posterior_log_weights(padded, log_prior, posterior, mixing)[..., -1]


def mix_logprobs(expert_lp: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """log p(x_t) = logsumexp_j(log w_j(t) + log p_j(x_t)): [k, B, T] x2 -> float32 [B, T]."""
    return torch.logsumexp(log_weights + expert_lp.double(), dim=0).float()


class Ensemble:
    """A domain-posterior mixture of causal LMs.

    models: the experts (Hugging Face causal LMs, put in eval mode); prior: a vector over them
    (uniform when None; normalised); posterior: one of POSTERIORS; mixing: temperature, floor and
    decay (its `with_seed` is the caller's business: pass the seed among the models). Experts with
    zero prior are never run ("uniform" spreads weight over the experts that do run).
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        prior: PriorLike | None = None,
        posterior: str = "one_step",
        mixing: Mixing = NO_MIXING,
    ):
        check_posterior(posterior)
        self.models = list(models)
        self.prior = normalise_prior(prior, len(self.models))  # float64 [n]
        self.posterior = posterior
        self.mixing = mixing
        self.active = [j for j in range(len(self.models)) if self.prior[j] > 0]
        for m in self.models:
            m.eval()

    def expert_logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log-probs of the active experts only: tokens [B, T+1] -> [k_active, B, T]."""
        return expert_logprobs(self.models, tokens, batch_size=len(tokens), prior=self.prior)

    def _active_log_weights(self, expert_lp: torch.Tensor) -> torch.Tensor:
        return posterior_log_weights(expert_lp, self.prior[self.active].log(), self.posterior, self.mixing)

    def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mixture log p(x_t | x_<t) for t = 1..T: tokens [B, T+1] -> float32 [B, T]."""
        lp = self.expert_logprobs(tokens)
        return mix_logprobs(lp, self._active_log_weights(lp))

    __call__ = logprobs

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Posterior weights w_j(t) for every expert: [n, B, T] float64, zero rows for skipped ones."""
        lp = self.expert_logprobs(tokens)
        active_w = self._active_log_weights(lp).exp()
        out = torch.zeros((len(self.models), *active_w.shape[1:]), dtype=torch.float64)
        out[self.active] = active_w.cpu()
        return out
