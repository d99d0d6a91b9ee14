"""One forest measured the way the growth studies report it (`rounds`, `removal`, `compare`).

On one domain's test windows [N, C+1] and its `eval.prior_sequences` valid windows (both drawn, seeded
by `eval.window_seed`, from the whole split; `scoring.domain_windows`):

    ensemble_cached     the cached-prior ensemble: prior = EMA of mean posteriors on the valid
                        windows (alpha eval.prior_alpha, batches of eval.prior_batch), then
                        p(x_t | x_<t) = sum_j p_j(x_t | x_<t) P(D=j | x_<t) on the test windows
    average_posterior   one model whose parameters are the prior-weighted average of the experts'

Training compute of a forest = the seed's + every expert's (tokens and FLOPs as recorded in
seed.json and expert.json). A results row holds per-domain perplexities, their geometric means,
training FLOPs and parameters at inference, as `report.results_table` prints them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from elmforest.config import Recipe
from elmforest.combine.forest import Forest
from elmforest.combine.evaluate import geo_mean
from elmforest.combine.logprobs import expert_logprobs, mean_nll
from elmforest.combine.mixing import mixture_nll
from elmforest.combine.prior import cached_prior
from elmforest.study.results import averaged_model


def forest_scores(
    models: list[torch.nn.Module], test: torch.Tensor, valid: torch.Tensor, recipe: Recipe, average: bool = True
) -> tuple[dict[str, float], list[float]]:
    """NLL of the cached-prior ensemble (and of the posterior-weighted average) -> ({method: nll}, prior)."""
    e = recipe.eval
    lp = expert_logprobs(models, test, e.batch_size)  # [n, N, T]
    vlp = expert_logprobs(models, valid, e.batch_size)  # [n, P, T]
    prior = cached_prior(vlp, e.prior_batch, e.prior_alpha, e.posterior)
    out = {"ensemble_cached": mixture_nll(lp, prior, e.posterior)}
    if average:
        avg = averaged_model(models, prior.tolist())
        out["average_posterior"] = mean_nll(expert_logprobs([avg], test, e.batch_size)[0])
    return out, prior.tolist()


def single_nll(model: torch.nn.Module, test: torch.Tensor, batch_size: int) -> float:
    """Mean NLL of one model on `test` [N, C+1]."""
    return mean_nll(expert_logprobs([model], test, batch_size)[0])


def forest_tokens_flops(forest_dir: Path, seed: dict[str, Any]) -> tuple[int, float]:
    """(tokens, FLOPs) of training: the seed's (seed.json) plus every expert's in the forest."""
    f = Forest(forest_dir)
    metas = [f.expert_meta(n) for n in f.names]
    return seed["tokens"] + sum(m["tokens"] for m in metas), seed["flops"] + sum(m["flops"] for m in metas)


def results_row(nll: dict[str, float], train: list[str], novel: list[str], flops: float | None, params: int) -> dict[str, Any]:
    """One results_table row from per-domain NLLs."""
    t = {d: math.exp(nll[d]) for d in train}
    n = {d: math.exp(nll[d]) for d in novel}
    return {"train": t, "novel": n, "train_mean": geo_mean(list(t.values())), "novel_mean": geo_mean(list(n.values())),
            "train_flops": flops, "inference_params": params}
