"""`elmforest run`: the whole compute-matched comparison from one recipe, resumably.

Stages (each skipped when already complete, each resumable when interrupted):

    1. tokenizer and token caches      RUN/tokenizer, CORPUS/.cache/tokens
    2. seed                            RUN/dense to the seed step, snapshot RUN/seed
    3. dense baseline                  RUN/dense continued to the full budget
    4. BTM forest                      RUN/experts/<domain> -> RUN/forest
    5. random-split forest             RUN/random_experts/random<i> -> RUN/random_forest
    6. DEMix (arms.demix)              RUN/demix (see elmforest.mixtures)
    7. BTX (arms.btx, llama only)      RUN/forest mixed into RUN/btx, routers fine-tuned
    8. evaluation                      RUN/eval/<domain>.json
    9. report                          RUN/results.json, RUN/report.md, RUN/plots/
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from elmforest import distributed, mixtures, phases, storage
from elmforest.config import Recipe, read_yaml
from elmforest.corpus import Corpus
from elmforest.errors import ElmError
from elmforest.forest import Forest, read_expert, read_json
from elmforest.report import geo_mean, results_table, write_report
from elmforest.tokens import token_array
from elmforest.training import read_metrics

RECIPE_FILE = "recipe.yaml"
# Recipe sections that may change between runs of one folder without invalidating its models:
# where experts run, and (after a fresh evaluation) which arms and how they are evaluated.
VOLATILE_KEYS = ("launcher", "out")
REEVALUATE_KEYS = ("arms", "eval")


def _sections(data: dict[str, Any], keep: bool, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if (k in keys) == keep}


def claim_run_dir(recipe: Recipe, out: Path) -> None:
    """Record the resolved recipe in RUN/recipe.yaml; refuse a folder holding another recipe's run.

    Changing `launcher` is always fine; changing `arms` or `eval` keeps every trained model and
    drops the evaluation cache, so the next run re-scores everything with the new settings."""
    path = out / RECIPE_FILE
    new = recipe.model_dump(mode="json")
    if path.is_file():
        old = read_yaml(path)
        skip = VOLATILE_KEYS + REEVALUATE_KEYS
        old_models, new_models = _sections(old, False, skip), _sections(new, False, skip)
        if old_models != new_models:
            changed = sorted(k for k in set(old_models) | set(new_models) if old_models.get(k) != new_models.get(k))
            raise ElmError(
                f"this folder holds a run of a different recipe ({', '.join(changed)} differ); use another --out",
                out,
            )
        if _sections(old, True, REEVALUATE_KEYS) != _sections(new, True, REEVALUATE_KEYS) and (out / "eval").is_dir():
            shutil.rmtree(out / "eval")  # re-score every method with the new arms / eval settings
    out.mkdir(parents=True, exist_ok=True)
    storage.write_text(path, yaml.safe_dump(new, sort_keys=False))


def _train_forest(
    recipe: Recipe,
    out: Path,
    arm: str,
    jobs: list[tuple[str, dict[str, Any]]],
    log: Callable[[str], None],
) -> Forest:
    """Branch every expert from the seed, train them with the recipe's launcher, merge them."""
    experts_dir = out / ("experts" if arm == "btm" else "random_experts")
    forest_dir = out / ("forest" if arm == "btm" else "random_forest")
    paths = []
    for name, data in jobs:
        job = phases.expert_job(recipe, out, name, data)
        paths.append(phases.branch_expert(experts_dir / name, job, from_seed=phases.seed_dir(out)))
    phases.train_pending(recipe, paths, log)
    meta = read_expert(paths[0])
    forest = Forest.create(forest_dir, out / "tokenizer", meta["tokenizer_hash"], meta["arch_hash"])
    for p in paths:
        phases.merge_once(forest, p)
    return forest


def _curves(out: Path, forest_dirs: list[Path]) -> dict[str, list[tuple[float, float]]]:
    """Valid perplexity against cumulative training FLOPs for dense and for the BTM forest.

    BTM's point at step s: the seed's FLOPs plus every expert's FLOPs up to s, and the geometric
    mean over domains of each expert's valid perplexity on its own domain (oracle routing)."""
    dense = [r for r in read_metrics(out / "dense" / "metrics.jsonl") if "valid_loss" in r]
    curves: dict[str, list[tuple[float, float]]] = {"dense": [(r["flops"], math.exp(r["valid_loss"])) for r in dense]}
    seed = read_json(out / "seed" / "seed.json", "seed.json")
    per_expert = []
    for d in forest_dirs:
        rows = {r["step"]: r for r in read_metrics(d / "metrics.jsonl") if "valid_loss" in r}
        per_expert.append(rows)
    if per_expert:
        steps = sorted(set.intersection(*(set(r) for r in per_expert)))
        btm = []
        for s in steps:
            flops = seed["flops"] + sum(rows[s]["flops"] for rows in per_expert)
            loss = sum(rows[s]["valid_loss"] for rows in per_expert) / len(per_expert)
            btm.append((flops, math.exp(loss)))
        seed_points = [p for p in curves["dense"] if p[0] <= seed["flops"] * 1.0001]
        curves["btm (each expert on its own domain)"] = seed_points + btm
    return curves


def assemble_results(
    recipe: Recipe, out: Path, scores: dict[str, dict[str, Any]], budget: phases.Budget, timing: dict[str, float]
) -> dict[str, Any]:
    """results.json: method -> per-domain perplexities, means, training FLOPs, inference params."""
    from elmforest.models import load_model
    from elmforest.results import param_count

    seed = read_json(out / "seed" / "seed.json", "seed.json")
    params = param_count(load_model(out / "seed"))
    forests = {arm: Forest(out / folder) for arm, folder in (("btm", "forest"), ("random", "random_forest"))
               if (out / folder / "forest.json").is_file()}
    forest_flops = {arm: seed["flops"] + sum(f.expert_meta(n)["flops"] for n in f.names) for arm, f in forests.items()}
    arms = {"seed": {"tokens": seed["tokens"], "flops": seed["flops"]}}
    if recipe.arms.dense:
        dense = read_json(out / "dense" / "dense.json", "dense.json")
        arms["dense"] = {"tokens": dense["tokens"], "flops": dense["flops"]}
    for arm, f in forests.items():
        arms[arm] = {
            "tokens": seed["tokens"] + sum(f.expert_meta(n)["tokens"] for n in f.names),
            "flops": forest_flops[arm],
        }
    notes = []
    demix_run = mixtures.demix_dir(out) / mixtures.DEMIX_RUN_JSON
    demix_params = None
    if recipe.arms.demix and demix_run.is_file():
        d = read_json(demix_run, mixtures.DEMIX_RUN_JSON)
        arms["demix"] = {"tokens": d["seed_tokens"] + d["tokens"], "flops": d["seed_flops"] + d["flops"]}
        demix_params = d["params"]
        notes.append(
            "DEMix (`demix_cached`) counts its shared weights plus all n domain MLPs as parameters at inference: "
            "the cached-prior mixture runs every domain's MLPs, after n single-domain passes for the posterior."
        )
    mix_json = mixtures.btx_dir(out) / mixtures.MIX_JSON
    btx_params = None
    if recipe.arms.btx and mix_json.is_file() and "btm" in arms:
        m = read_json(mix_json, mixtures.MIX_JSON)
        ft = m["finetune"]
        arms["btx"] = {"tokens": arms["btm"]["tokens"] + ft["tokens"], "flops": arms["btm"]["flops"] + ft["flops"]}
        btx_params = m["params"]
        notes.append(
            f"BTX (`btx`) is not compute-matched: its training FLOPs are the BTM forest's ({arms['btm']['flops']:.3e}) "
            f"plus {ft['flops']:.3e} for fine-tuning on {ft['tokens']:,} tokens (arms.btx_tokens; each token runs "
            f"the top-{m['top_k']} MoE forward and backward). Its parameters at inference count every expert MLP "
            f"and router; {m['top_k']} of {len(m['experts'])} MLPs run per token."
        )
    n = len(recipe.train_domains)
    row_cost = {
        "seed": ("seed", params),
        "dense": ("dense", params),
        "btm_ensemble_uniform": ("btm", n * params),
        "btm_ensemble_cached": ("btm", n * params),
        f"btm_ensemble_cached_{'full_prefix' if recipe.eval.posterior == 'one_step' else 'one_step'}": ("btm", n * params),
        "btm_ensemble_cached_top1": ("btm", params),
        "btm_ensemble_cached_top2": ("btm", 2 * params),
        "btm_average_uniform": ("btm", params),
        "btm_average_posterior": ("btm", params),
        "random_ensemble_cached": ("random", n * params),
        "demix_cached": ("demix", demix_params),
        "btx": ("btx", btx_params),
    }
    results: dict[str, Any] = {}
    methods = [m for m in row_cost if all(m in s["nll"] for s in scores.values())]
    for m in methods:
        arm, inf_params = row_cost[m]
        train = {d: math.exp(scores[d]["nll"][m]) for d in recipe.train_domains}
        novel = {d: math.exp(scores[d]["nll"][m]) for d in recipe.novel_domains}
        results[m] = {
            "train": train,
            "novel": novel,
            "train_mean": geo_mean(list(train.values())),
            "novel_mean": geo_mean(list(novel.values())),
            "train_flops": arms[arm]["flops"],
            "inference_params": inf_params,
        }
    unigram_train = [math.exp(scores[d]["nll"]["unigram"]) for d in recipe.train_domains]
    unigram_novel = [math.exp(scores[d]["nll"]["unigram"]) for d in recipe.novel_domains]
    results["unigram"] = {
        "train": {d: math.exp(scores[d]["nll"]["unigram"]) for d in recipe.train_domains},
        "novel": {d: math.exp(scores[d]["nll"]["unigram"]) for d in recipe.novel_domains},
        "train_mean": geo_mean(unigram_train),
        "novel_mean": geo_mean(unigram_novel),
    }
    results["priors"] = {
        arm: {d: scores[d]["priors"][arm]["experts"] for d in scores}
        for arm in [*forests, *(["demix"] if "demix" in arms else [])]
        if all(arm in scores[d]["priors"] for d in scores)
    }
    results["budget"] = {
        "total_tokens": recipe.budget.total_tokens,
        "batch_tokens": budget.batch_tokens,
        "expert_batch_tokens": budget.expert_batch_tokens,
        "total_steps": budget.total_steps,
        "seed_steps": budget.seed_steps,
        "context": budget.context,
        "arms": arms,
        "eval_tokens_per_domain": {d: scores[d]["tokens"] for d in scores},
        "prior_windows_per_domain": {d: scores[d]["valid_windows"] for d in scores},
    }
    if "btm" in forests:
        results["curves"] = _curves(out, [out / "experts" / name for name in forests["btm"].names])
    if notes:
        results["notes"] = notes
    results["timing"] = timing
    results["recipe"] = recipe.model_dump(mode="json")
    return results


def run_study(recipe: Recipe, out: Path, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the whole study in `out`; returns results.json's contents.

    One process at a time per run folder: a second `elmforest run` on the same folder is refused."""
    from filelock import FileLock, Timeout

    out = Path(out)
    if distributed.env_size() > 1:
        raise ElmError("elmforest run starts its own processes (launcher.procs_per_job); run it without torchrun")
    corpus = Corpus(recipe.corpus)
    corpus.require([*recipe.train_domains, *recipe.novel_domains], "recipe")
    mixtures.check_arms(recipe)
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / ".run.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ElmError("another elmforest process is running in this folder; wait for it or use another --out", out) from None
    try:
        return _run_locked(recipe, out, corpus, progress, log)
    finally:
        lock.release()


def _run_locked(recipe: Recipe, out: Path, corpus: Corpus, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    claim_run_dir(recipe, out)
    if recipe.rounds:  # incremental growth: a study of its own (see elmforest.grow)
        from elmforest.grow import run_rounds

        return run_rounds(recipe, out, progress=progress, log=log)
    timing: dict[str, float] = {}
    previous = read_json(out / "timing.json", "timing.json") if (out / "timing.json").is_file() else {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        took = time.perf_counter() - t0
        timing[name] = round(previous.get(name, 0.0) + took, 1) if took > 1 else previous.get(name, round(took, 1))
        storage.write_json(out / "timing.json", {**previous, **timing})
        return value

    log(f"[1/9] tokenizer and token caches -> {out / 'tokenizer'}")
    tok = stage("tokenizer", lambda: phases.prepare_tokenizer(recipe, out))

    def caches() -> None:
        for d in [*recipe.train_domains, *recipe.novel_domains]:
            for split in ("train", "valid", "test"):
                token_array(corpus, tok, d, split)

    stage("token_caches", caches)
    context = phases.model_context(recipe, tok)
    budget = phases.plan_budget(recipe, context)
    log(
        f"budget: {budget.total_steps} steps of {budget.batch_tokens} tokens; seed at step {budget.seed_steps}; "
        f"{budget.n_experts} experts at {budget.expert_batch_tokens} tokens/step"
    )
    procs = recipe.launcher.procs_per_job  # processes per model: data-parallel seed, dense and DEMix too
    phases.check_data_parallel(budget, procs)
    log("[2/9] seed (dense, domain-balanced)")
    stage("seed", lambda: distributed.run_procs(phases.train_seed, recipe, out, full=False, progress=progress, procs=procs))
    if recipe.arms.dense:
        log("[3/9] dense baseline (the seed run continued to the full budget)")
        stage("dense", lambda: distributed.run_procs(phases.train_seed, recipe, out, full=True, progress=progress, procs=procs))
    log("[4/9] BTM forest: one expert per train domain")
    domain_jobs = [(d, {"kind": "domain", "domain": d}) for d in recipe.train_domains]
    stage("btm_forest", lambda: _train_forest(recipe, out, "btm", domain_jobs, log))
    if recipe.arms.random_split:
        log("[5/9] random-split forest")
        n = len(recipe.train_domains)
        random_jobs = [
            (f"random{i}", {"kind": "random_split", "domains": list(recipe.train_domains), "part": i, "parts": n})
            for i in range(n)
        ]
        stage("random_forest", lambda: _train_forest(recipe, out, "random", random_jobs, log))
    if recipe.arms.demix:
        log("[6/9] DEMix: one MLP per train domain inside one model, from the seed, compute-matched")
        stage("demix", lambda: distributed.run_procs(mixtures.train_demix, recipe, out, progress=progress, procs=procs))
    if recipe.arms.btx:
        log(f"[7/9] BTX: the forest mixed into one Mixtral MoE, routers fine-tuned on {recipe.arms.btx_tokens:,} tokens")
        stage("btx", lambda: mixtures.build_btx(recipe, out, log=log))
    log("[8/9] evaluation")
    from elmforest.results import evaluate_study

    scores = stage("evaluation", lambda: evaluate_study(recipe, out, tok, context, log))
    log("[9/9] report")
    results = assemble_results(recipe, out, scores, budget, {**previous, **timing})
    storage.write_json(out / "results.json", results)
    write_report(out, results, title=f"elmforest study: {out.name}")
    log(results_table(results, markdown=False))
    log(f"report: {out / 'report.md'}")
    return results

