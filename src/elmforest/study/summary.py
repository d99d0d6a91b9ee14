"""results.json: every method's perplexities with 95% intervals, the claims the report reads, and
how much compute a dense model needs to match the forest.

Inputs are the per-domain evaluations (`results.evaluate_study`, one per training seed) and the
run folders (every trained arm's budget record, `arms.arm_records`). Perplexities are per domain; a part's mean
(train domains, novel domains) is the geometric mean over its domains; with several seeds every
number is the geometric mean over seeds, and the intervals resample seeds as well as documents
(`elmforest.combine.bootstrap`). Each claim in `CLAIMS` whose two methods ran becomes a row of
`comparisons`: the perplexity ratio a/b, its 95% interval and the verdict read from it.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from elmforest.train.budget import Budget
from elmforest.combine.bootstrap import Bootstrap, DomainDocs, compare, compute_to_match
from elmforest.config import Recipe
from elmforest.errors import ElmError
from elmforest.combine.forest import Forest, read_json
from elmforest.study.arms import ARMS, ArmRecord, arm_records, study_methods, trained_arms
from elmforest.study.arms.dense import dense_multiples
from elmforest.study.arms.opt_out import opt_out_results
from elmforest.study.methods import Sizes
from elmforest.train.state import read_metrics

# (a, b, claim): "a beats b", read on train and novel domains when both methods ran.
CLAIMS: list[tuple[str, str, str]] = [
    ("btm_ensemble_cached", "dense", "BTM's cached-prior ensemble beats the compute-matched dense LM"),
    ("btm_ensemble_tuned", "dense", "BTM's ensemble with mixing tuned on validation data beats the dense LM"),
    ("btm_ensemble_tuned", "btm_ensemble_cached", "Mixing tuned on validation data beats the plain cached-prior ensemble"),
    ("btm_average_posterior", "dense", "Posterior-weighted averaging (one model's inference cost) beats dense"),
    ("btm_average_posterior", "btm_average_uniform", "Posterior-weighted averaging beats uniform averaging"),
    ("btm_ensemble_cached", "random_ensemble_cached", "Domain splits beat random (domain-balanced) splits"),
    ("btm_ensemble_cached", "btm_ensemble_cached_full_prefix", "The one-step posterior beats the paper's full-prefix one"),
    ("btm_ensemble_cached", "demix_cached", "BTM beats DEMix at equal compute"),
    ("btx", "dense", "BTX beats the dense LM (with its extra fine-tuning compute)"),
    ("anchored_moe", "dense", "The anchored opt-out mixture-of-experts beats the dense LM (with its extra compute)"),
    ("anchored_moe", "btm_ensemble_cached", "The anchored opt-out mixture-of-experts beats BTM's cached-prior ensemble"),
    ("anchored_moe_router_tuned", "anchored_moe", "Tuning the anchored mixture's router rows helps"),
    ("btm_ensemble_cached", "dense_adapter", "The adapter forest's cached-prior ensemble beats one adapter on all train domains (same tokens and FLOPs)"),
    ("btm_ensemble_cached", "btm_arrow", "The forest's cached-prior ensemble beats PEFT's Arrow router on the same adapters"),
    ("btm_average_posterior", "btm_cat", "Posterior-weighted averaging of the adapters beats PEFT's uniform cat merge"),
]


def arm_budgets(recipe: Recipe, out: Path) -> tuple[dict[str, dict[str, Any]], list[str], dict[str, ArmRecord]]:
    """Every trained arm's budget record of one run folder (`arms.arm_records`: RUN/<arm>/arm.json,
    derived from the arm's own files the first time) -> (results.json budget.arms, notes, records)."""
    records = arm_records(recipe, out)
    notes = [n for arm, name in trained_arms(recipe) if name in records for n in arm.notes(records[name], out, records)]
    return {name: r.budget() for name, r in records.items()}, notes, records


def curves(out: Path, forest_dirs: list[Path]) -> dict[str, list[tuple[float, float]]]:
    """Valid perplexity against cumulative training FLOPs for dense and for the BTM forest.

    BTM's point at step s: the seed's FLOPs plus every expert's FLOPs up to s, and the geometric
    mean over domains of each expert's valid perplexity on its own domain (oracle routing)."""
    dense = [r for r in read_metrics(out / "dense" / "metrics.jsonl") if "valid_loss" in r]
    result: dict[str, list[tuple[float, float]]] = {"dense": [(r["flops"], math.exp(r["valid_loss"])) for r in dense]}
    seed = read_json(out / "seed" / "seed.json", "seed.json")
    per_expert = [{r["step"]: r for r in read_metrics(d / "metrics.jsonl") if "valid_loss" in r} for d in forest_dirs]
    if per_expert:
        steps = sorted(set.intersection(*(set(r) for r in per_expert)))
        btm = []
        for s in steps:
            flops = seed["flops"] + sum(rows[s]["flops"] for rows in per_expert)
            loss = sum(rows[s]["valid_loss"] for rows in per_expert) / len(per_expert)
            btm.append((flops, math.exp(loss)))
        seed_points = [p for p in result["dense"] if p[0] <= seed["flops"] * 1.0001]
        result["btm (each expert on its own domain)"] = seed_points + btm
    return result


def domain_docs(scores: dict[int, dict[str, dict[str, Any]]], domain: str, methods: list[str]) -> DomainDocs:
    """One domain's per-document NLL sums, every seed's, as the bootstrap wants them."""
    seeds = list(scores)
    first = scores[seeds[0]][domain]
    for s in seeds[1:]:
        if scores[s][domain]["doc_ids"] != first["doc_ids"]:
            raise ElmError(f"seed {s} scored other test documents of {domain!r} than seed {seeds[0]}; re-run the evaluation")
    tables = {m: np.array([scores[s][domain]["doc_nll"][m] for s in seeds], dtype=np.float64) for m in methods}
    return DomainDocs(np.array(first["doc_tokens"], dtype=np.float64), tables)


def _ci_map(boot: Bootstrap, method: str, domains: list[str]) -> dict[str, list[float]]:
    return {d: boot.domain_ci(method, d) for d in domains}


def assemble_results(
    recipe: Recipe,
    runs: dict[int, Path],
    scores: dict[int, dict[str, dict[str, Any]]],
    budget: Budget,
    timing: dict[str, float],
) -> dict[str, Any]:
    """results.json of a study over the training seeds `runs` ({seed: run folder}), from their evaluations."""
    seeds = list(runs)
    first = runs[seeds[0]]
    methods = [m.name for m in study_methods(recipe)]
    train_d, novel_d = list(recipe.train_domains), list(recipe.novel_domains)
    all_d = [*train_d, *novel_d]
    docs = {d: domain_docs(scores, d, [*methods, "unigram"]) for d in all_d}
    boot = Bootstrap(docs, {"train": train_d, "novel": novel_d}, recipe.eval.bootstrap_resamples, recipe.eval.window_seed)

    arms, notes, records = arm_budgets(recipe, first)
    s0 = scores[seeds[0]]
    tuned_members = max((len(s0[d]["priors"].get("btm_tuned", {}).get("experts", {})) for d in all_d), default=0)
    sizes = Sizes(
        model=records["seed"].params_at_inference,
        n_experts=len(train_d),
        arms={name: r.params_at_inference for name, r in records.items()},
        extra={"btm_ensemble_tuned": tuned_members or len(train_d)},
    )
    results: dict[str, Any] = {}
    for m in study_methods(recipe):
        results[m.name] = _row(boot, m.name, train_d, novel_d)
        results[m.name].update(train_flops=arms.get(m.arm, {}).get("flops"), inference_params=m.params(sizes), arm=m.arm)
        if m.valid is not None:  # validation perplexity: for choosing settings (e.g. the seed fraction) without test data
            for part, ds in (("train", train_d), ("novel", novel_d)):
                vals = [statistics.fmean(scores[s][d]["valid_nll"][m.name] for s in seeds) for d in ds]
                results[m.name][f"valid_{part}_mean"] = math.exp(statistics.fmean(vals)) if vals else None
        if len(seeds) > 1:
            per = [_seed_means(scores[s], m.name, train_d, novel_d) for s in seeds]
            for part in ("train", "novel"):
                vals = [p[f"{part}_mean"] for p in per if p[f"{part}_mean"] is not None]
                results[m.name][f"{part}_mean_sd"] = statistics.stdev(vals) if len(vals) > 1 else None
    results["unigram"] = _row(boot, "unigram", train_d, novel_d)
    comparisons = []
    for a, b, claim in CLAIMS:
        if a in methods and b in methods:
            comparisons += compare(boot, a, b, claim)
    results["comparisons"] = comparisons
    multiples = dense_multiples(recipe)
    if multiples and "btm_ensemble_cached" in methods:
        dense = {1.0: "dense", **{k: name for name, k in multiples.items()}}
        results["compute_to_match"] = {
            part: compute_to_match(boot, "btm_ensemble_cached", dense, part)
            for part in ("train", "novel")
            if (train_d if part == "train" else novel_d)
        }
    for arm in ARMS.values():  # sections of an arm's own (the c-BTM cluster sweep)
        if arm.instances(recipe):
            results.update(arm.summarize(recipe, first, boot, results))
    results["priors"] = {  # {arm: {domain: {member: weight}}}: distributions over each mixture's members
        arm: {d: s0[d]["priors"][arm]["experts"] for d in all_d}
        for arm in ("btm", "random", "demix", "btm_tuned")
        if all(arm in s0[d]["priors"] for d in all_d)
    }
    if "btm_tuned" in results["priors"]:  # what the tuned ensemble chose on validation data, per domain
        results["mixing"] = {
            "btm_tuned": {d: {k: v for k, v in s0[d]["priors"]["btm_tuned"].items() if k != "experts"} for d in all_d}
        }
    results["budget"] = {
        "total_tokens": recipe.budget.total_tokens,
        "batch_tokens": budget.batch_tokens,
        "expert_batch_tokens": budget.expert_batch_tokens,
        "total_steps": budget.total_steps,
        "seed_steps": budget.seed_steps,
        "context": budget.context,
        "arms": arms,
        "eval_tokens_per_domain": {d: s0[d]["tokens"] for d in all_d},
        "eval_documents_per_domain": {d: s0[d]["documents"] for d in all_d},
        "split_documents_per_domain": {d: s0[d]["split_documents"] for d in all_d},
        "prior_windows_per_domain": {d: s0[d]["valid_windows"] for d in all_d},
        "bootstrap_resamples": recipe.eval.bootstrap_resamples,
    }
    opt_out = opt_out_results(recipe, first)  # removing a domain after training: the first seed's run
    if opt_out:
        results["opt_out"] = opt_out
    results["seeds"] = seeds
    results["per_seed"] = {str(s): {m: _seed_means(scores[s], m, train_d, novel_d) for m in methods} for s in seeds}
    if (first / "forest" / "forest.json").is_file():
        results["curves"] = curves(first, [first / "experts" / n for n in Forest(first / "forest").names])
    if notes:
        results["notes"] = notes
    results["timing"] = timing
    results["recipe"] = recipe.model_dump(mode="json")
    return results


def _row(boot: Bootstrap, method: str, train_d: list[str], novel_d: list[str]) -> dict[str, Any]:
    def ppl(x: float | None) -> float | None:
        return None if x is None else math.exp(x)

    return {
        "train": {d: math.exp(boot.domain_point(method, d)) for d in train_d},
        "novel": {d: math.exp(boot.domain_point(method, d)) for d in novel_d},
        "train_mean": ppl(boot.part_point(method, "train")),
        "novel_mean": ppl(boot.part_point(method, "novel")),
        "train_mean_ci": boot.part_ci(method, "train"),
        "novel_mean_ci": boot.part_ci(method, "novel"),
        "train_ci": _ci_map(boot, method, train_d),
        "novel_ci": _ci_map(boot, method, novel_d),
    }


def _seed_means(scores: dict[str, dict[str, Any]], method: str, train_d: list[str], novel_d: list[str]) -> dict[str, float | None]:
    """One seed's geometric-mean perplexities (train, novel) of a method."""

    def mean(ds: list[str]) -> float | None:
        return math.exp(sum(scores[d]["nll"][method] for d in ds) / len(ds)) if ds else None

    return {"train_mean": mean(train_d), "novel_mean": mean(novel_d)}
