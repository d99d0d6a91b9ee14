"""Ensemble scoring cost: tokens/s of one model, k-expert cached-prior ensembles, and top-k of 6.

A domain-posterior ensemble of k experts runs k forward passes per window and mixes their
log-probs (a logsumexp over k in float64). The claim: that is all it costs, so

    ensemble tokens/s >= 0.9 * single-model tokens/s / k

and a top-k ensemble of an n-expert forest costs k forward passes, not n (experts with zero
prior are never run). Models are random-init `demo` size (speed does not depend on training);
the prior is `elmforest.combine.prior.cached_prior` on separate validation windows (not timed).
Every contender scores the same test windows with `elmforest.combine.evaluate.perplexity`.
"""

from __future__ import annotations

import time
import warnings

import torch

import record
from elmforest.config import ModelConfig
from elmforest.combine.ensemble import Ensemble, top_k_prior
from elmforest.combine.logprobs import expert_logprobs
from elmforest.combine.prior import cached_prior
from elmforest.combine.evaluate import perplexity
from elmforest.models.factory import build_model, resolve_spec


def main() -> None:
    a = record.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1 if a.quick else 2)  # quick: a smoke test on a shared machine
    warnings.filterwarnings("ignore")
    size, vocab, n_windows, batch = ("tiny", 512, 4, 2) if a.quick else ("demo", 4096, 32, 8)
    repeats = a.repeats or (1 if a.quick else 3)
    n_experts = 6

    spec = resolve_spec(ModelConfig(size=size), vocab)
    T = spec.context
    gen = torch.Generator().manual_seed(0)
    test = torch.randint(0, vocab, (n_windows, T + 1), generator=gen)  # [N, T+1]
    valid = torch.randint(0, vocab, (8 if a.quick else 16, T + 1), generator=gen)
    models = [build_model(spec, seed).eval() for seed in range(n_experts)]
    valid_lp = expert_logprobs(models, valid)  # [6, P, T]
    prior6 = cached_prior(valid_lp, batch_size=4)

    # contender name -> (log-prob function or model, forward passes per window)
    contenders: dict[str, tuple[object, int]] = {"single model": (models[0], 1)}
    for k in (2, 4, 6):
        prior_k = cached_prior(valid_lp[:k], batch_size=4)
        contenders[f"ensemble k={k}"] = (Ensemble(models[:k], prior=prior_k), k)
    for k in (1, 2):
        contenders[f"top-{k} of 6"] = (Ensemble(models, prior=top_k_prior(prior6, k)), k)

    tokens = n_windows * T

    def run(name: str) -> float:
        fn, _ = contenders[name]
        t = time.perf_counter()
        perplexity(fn, test, batch_size=batch)
        return tokens / (time.perf_counter() - t)

    run("single model")  # warm-up (allocator, oneDNN kernels)
    results = record.interleaved(list(contenders), repeats, run)
    single = record.median(results["single model"])
    rows = []
    for name, (_, k) in contenders.items():
        tps = record.median(results[name])
        ratio = tps / (single / k)
        rows.append(
            [name, k, f"{tps:,.0f}", record.spread(results[name]), f"{single / k:,.0f}", f"{ratio:.2f}",
             "yes" if ratio >= 0.9 else "no"]
        )
    table = record.markdown_table(
        ["scorer", "forward passes", "tokens/s (median)", "range", "single / k", "ratio", "target >= 0.9 met"], rows
    )
    notes = [
        "ratio = tokens/s / (single-model tokens/s / k); 1.0 means the ensemble costs exactly k forward passes.",
        f"top-k rows run k of the 6 experts (prior {', '.join(f'{p:.3f}' for p in prior6.tolist())}, cut to its k largest).",
    ]
    settings = (
        f"{n_experts} random-init {size} models (vocab {vocab}), {n_windows} test windows of {T} tokens, "
        f"batch {batch} windows, one_step posterior, {repeats} interleaved repeats, torch threads {torch.get_num_threads()}"
    )
    record.emit("ensemble_cost", settings, table, notes, a.quick)


if __name__ == "__main__":
    main()
