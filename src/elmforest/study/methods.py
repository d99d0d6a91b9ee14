"""The study's methods: every row of `elmforest run`'s results, one registry entry each.

A study method names the trained *arm* it needs (whose training FLOPs it reports), the
parameters that run at inference, and how it scores one domain's test windows from the shared,
lazily computed pieces of `results.DomainEval` (each expert's log-probs computed once and
re-weighted by every ensemble variant, cached priors, tuned mixing, averaged models):

    score(ev) -> log p(x_t | x_<t) of every test window, float32 [N, T]

Adding a method is one function and one `register(...)` call here (e.g. a top-3 ensemble:
`register(StudyMethod("btm_ensemble_cached_top3", "btm", ..., score=_top_k(3), ...))`); a recipe
lists it when it trains the method's arm (`elmforest.study.arms.study_methods`, which also adds
the methods of arm families such as dense_x<k>), the evaluation scores every listed method,
results.json lists every one, and a method missing from a cached evaluation is re-scored, never
dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from elmforest.btm.seed import dense_multiple_name
from elmforest.config import Recipe
from elmforest.combine.ensemble import POSTERIORS, UPDATING_POSTERIORS, top_k_prior
from elmforest.combine.mixing import members_logprobs, mixture_logprobs
from elmforest.mixtures.stages import model_family

Score = Callable[[Any], torch.Tensor]  # DomainEval -> [N, T]


@dataclass(frozen=True)
class Sizes:
    """Parameter counts the inference costs are computed from."""

    model: int  # one dense model / expert
    n_experts: int
    arms: dict[str, int] = field(default_factory=dict)  # each trained arm's parameters at inference (its arm.json)
    extra: dict[str, int] = field(default_factory=dict)  # e.g. {"btm_ensemble_tuned": members}


@dataclass(frozen=True)
class StudyMethod:
    """One row of the study's results."""

    name: str
    arm: str
    """The trained arm it needs and is listed under (an arm of `elmforest.study.arms`, a key of
    results.json budget.arms: seed, dense, btm, random, ...); it is scored when the recipe trains that arm."""
    help: str
    score: Score
    params: Callable[[Sizes], int | None]
    """Parameters that run at inference (per token, summed over the models that run)."""
    enabled: Callable[[Recipe], bool] = lambda recipe: True
    """Whether a recipe that trains its arm lists it (e.g. a posterior variant only when it is not the recipe's)."""
    valid: Callable[[Any], float] | None = None
    """Its mean NLL on the domain's validation windows, for choosing settings without test data."""


STUDY_METHODS: dict[str, StudyMethod] = {}


def register(method: StudyMethod) -> StudyMethod:
    if method.name in STUDY_METHODS:
        raise ValueError(f"study method {method.name!r} is registered twice")
    STUDY_METHODS[method.name] = method
    return method


# --- score functions ---------------------------------------------------------------------------


def _single(name: str) -> Score:
    return lambda ev: ev.single_lp(name)


def cached_score(arm: str, posterior: str | None = None, top_k: int | None = None) -> Score:
    """The forest's mixture under its cached prior (top-k'd), with the recipe's or a given posterior."""

    def score(ev: Any) -> torch.Tensor:
        post = posterior or ev.recipe.eval.posterior
        prior = ev.cached_prior(arm, post)
        if top_k is not None:
            prior = top_k_prior(prior, top_k)
        return mixture_logprobs(ev.forest_lp(arm), prior, post)

    return score


def _valid_cached(arm: str) -> Callable[[Any], float]:
    """The cached-prior ensemble's NLL on the valid windows its prior was estimated on."""

    def valid(ev: Any) -> float:
        post = ev.recipe.eval.posterior
        return float(-mixture_logprobs(ev.forest_lp(arm, "valid"), ev.cached_prior(arm, post), post).double().mean())

    return valid


def _uniform(arm: str) -> Score:
    def score(ev: Any) -> torch.Tensor:
        n = ev.forest_lp(arm).shape[0]
        return mixture_logprobs(ev.forest_lp(arm), torch.full((n,), 1.0 / n, dtype=torch.float64), "uniform")

    return score


def _tuned(ev: Any) -> torch.Tensor:
    tuned = ev.tuned("btm")
    lp = members_logprobs(ev.forest_lp("btm"), ev.single_lp("seed"), tuned.mixing.with_seed)
    return mixture_logprobs(lp, tuned.prior, "decayed", tuned.mixing)


def _average(weights: str) -> Score:
    return lambda ev: ev.average_lp(weights)


def _n_experts_running(k: int | None = None) -> Callable[[Sizes], int]:
    return lambda s: s.model * (s.n_experts if k is None else min(k, s.n_experts))


def _top_k_enabled(k: int) -> Callable[[Recipe], bool]:
    return lambda r: k <= len(r.train_domains)  # (top-n is the full cached ensemble)


# --- the registry ---------------------------------------------------------------------------------

register(StudyMethod("seed", "seed", "the seed: the dense run at the seed step", _single("seed"), lambda s: s.model))
register(StudyMethod(
    "base", "seed", "the pretrained model (`model.path`) untrained: the seed when budget.seed_fraction is 0",
    _single("seed"), lambda s: s.model, enabled=lambda r: r.model.path is not None and r.budget.seed_fraction == 0,
))
register(StudyMethod(
    "dense", "dense", "the compute-matched dense LM (the seed run continued to the full budget)",
    _single("dense"), lambda s: s.model,
))
register(StudyMethod(
    "dense_adapter", "dense_adapter", "adapter experts (`experts:`): one adapter of the same shape on all train domains, "
    "domain-balanced, at the adapter forest's tokens and FLOPs (arms.dense_adapter)",
    _single("dense_adapter"), lambda s: s.model,
))
register(StudyMethod(
    "btm_ensemble_uniform", "btm", "the forest's experts mixed with fixed 1/n weights",
    _uniform("btm"), _n_experts_running(),
))
register(StudyMethod(
    "btm_ensemble_cached", "btm", "the forest mixed with its cached prior and the recipe's posterior",
    cached_score("btm"), _n_experts_running(), valid=_valid_cached("btm"),
))
for _post in UPDATING_POSTERIORS:
    if _post == "decayed":  # spanned by the tuned ensemble
        continue
    register(StudyMethod(
        f"btm_ensemble_cached_{_post}", "btm", f"as btm_ensemble_cached with the {_post} posterior "
        f"({POSTERIORS[_post].help}); listed when the recipe's posterior is another one",
        cached_score("btm", _post), _n_experts_running(), enabled=lambda r, p=_post: r.eval.posterior != p,
    ))
for _k in (1, 2):
    register(StudyMethod(
        f"btm_ensemble_cached_top{_k}", "btm",
        f"the cached-prior ensemble of the {_k} expert{'s' if _k > 1 else ''} with the largest prior (only those run)",
        cached_score("btm", top_k=_k), _n_experts_running(_k), enabled=_top_k_enabled(_k),
    ))
register(StudyMethod(
    "btm_ensemble_tuned", "btm", "the forest (and optionally the seed) mixed with settings chosen on validation data "
    "(temperature, floor, evidence decay, seed member; elmforest.combine.mixing)",
    _tuned, lambda s: s.model * s.extra.get("btm_ensemble_tuned", s.n_experts),
))
register(StudyMethod(
    "btm_average_uniform", "btm", "one model: the experts' parameters averaged uniformly",
    _average("uniform"), lambda s: s.model,
))
register(StudyMethod(
    "btm_average_posterior", "btm", "one model: the experts' parameters averaged with the domain's cached prior",
    _average("posterior"), lambda s: s.model,
))
register(StudyMethod(
    "btm_arrow", "btm", "adapter experts (`experts:`) routed by PEFT's Arrow: training-free, per token and layer, "
    "the top-3 adapters by their prototypes' |cosine| with the token, softmax-mixed (llama: linear projections)",
    _single("btm_arrow"), lambda s: s.model, enabled=lambda r: r.experts is not None and model_family(r) == "llama",
))
register(StudyMethod(
    "btm_cat", "btm", "adapter experts (`experts:`) merged by PEFT's uniform `cat`: the base plus the mean of the "
    "adapters' updates", _single("btm_cat"), lambda s: s.model, enabled=lambda r: r.experts is not None,
))
register(StudyMethod(
    "random_ensemble_cached", "random", "a forest trained on random (domain-balanced) splits, cached-prior ensemble",
    cached_score("random"), _n_experts_running(),
))
register(StudyMethod(
    "demix_cached", "demix", "DEMix: one MLP per domain inside one model, mixed with its cached prior",
    lambda ev: ev.demix_lp(), lambda s: s.arms.get("demix"),
))
register(StudyMethod(
    "btx", "btx", "BTX: the forest's MLPs as one Mixtral mixture-of-experts, its routers (or, with arms.btx_train_all, every parameter) fine-tuned",
    _single("btx"), lambda s: s.arms.get("btx"),
))

register(StudyMethod(
    "anchored_moe", "anchored", "FlexOlmo-style: anchored experts (a trained FFN copy beside the frozen seed's) merged "
    "into one opt-out mixture-of-experts, router rows from training, no joint training",
    _single("anchored_moe"), lambda s: s.arms.get("anchored"),
))
register(StudyMethod(
    "anchored_moe_router_tuned", "anchored_router_tuned", "the anchored mixture with its router rows tuned on a "
    "small domain-balanced sample (arms.anchored_router_tokens extra tokens)",
    _single("anchored_moe_router_tuned"), lambda s: s.arms.get("anchored_router_tuned"),
))

# --- dense models at k times the compute (results.json "compute_to_match") -----------------------


def dense_multiple_method(k: float) -> StudyMethod:
    name = dense_multiple_name(k)
    return StudyMethod(name, name, f"a dense LM trained from scratch on {k:g} x the budget", _single(name), lambda s: s.model)


# --- forests branched at other seed fractions (arms.seed_fractions) ---------------------------------


def seed_fraction_arm(fraction: float) -> str:
    """`btm_seed0.6`: the forest branched from the dense run's snapshot at that fraction."""
    return f"btm_seed{fraction:g}"


def seed_fraction_method(fraction: float) -> StudyMethod:
    arm = seed_fraction_arm(fraction)
    return StudyMethod(
        f"btm_ensemble_cached_seed{fraction:g}", arm,
        f"the cached-prior ensemble of a forest branched at {fraction:g} of the budget (compute-matched on its own)",
        cached_score(arm), _n_experts_running(), valid=_valid_cached(arm),
    )


def method_names_help() -> str:
    """`name: help` for every registered method (README and --help lists come from here)."""
    families = [dense_multiple_method(2.0), seed_fraction_method(0.7)]
    lines = [f"- `{m.name}` ({m.arm}): {m.help}" for m in STUDY_METHODS.values()]
    lines += [f"- `{m.name}` ({m.arm}), one per entry of arms.{key}: {m.help}"
              for m, key in zip(families, ("dense_multiples", "seed_fractions"))]
    return "\n".join(lines)


if __name__ == "__main__":  # README's list of study methods: python -m elmforest.study.methods
    print(method_names_help())
