"""`elmforest run`: the whole compute-matched comparison from one recipe, resumably.

Stages (each skipped when already complete, each resumable when interrupted):

    1. tokenizer and token caches      RUN/tokenizer, CORPUS/.cache/tokens
    2. seed                            RUN/dense to the seed step, snapshot RUN/seed
    3. dense baseline                  RUN/dense continued to the full budget
       dense at k x the compute        RUN/dense_x<k> (arms.dense_multiples), each from scratch
    4. BTM forest                      RUN/experts/<domain> -> RUN/forest
    5. random-split forest             RUN/random_experts/random<i> -> RUN/random_forest
    6. DEMix (arms.demix)              RUN/demix (see elmforest.mixtures.stages)
    7. BTX (arms.btx, llama only)      RUN/forest mixed into RUN/btx, routers (or all) fine-tuned
    8. evaluation                      RUN/eval/<domain>.json
    9. report                          RUN/results.json, RUN/report.md, RUN/plots/

With several training seeds (recipe `seeds: [0, 1, 2]`), RUN/seed-<s>/ holds each seed's run of
stages 1-9 (its own results.json and report.md, intervals over documents), and RUN/results.json
and RUN/report.md combine them: means over seeds, intervals over seeds and documents.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elmforest.train.budget import Budget, check_data_parallel, plan_budget
from elmforest.train import distributed
from elmforest.mixtures import stages as mixtures
from elmforest.btm.experts import branch_expert, expert_job, merge_once, train_pending
from elmforest.btm.seed import model_context, prepare_tokenizer, seed_dir, sweep_dir, sweep_recipe, train_dense_multiple, train_seed
from elmforest import storage
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError
from elmforest.combine.forest import Forest, read_expert, read_json
from elmforest.study.report import results_table, write_report
from elmforest.study.run_folder import claim_run_dir
from elmforest.study.tracking import report_results
from elmforest.data.tokens import token_array


def _train_forest(
    recipe: Recipe,
    out: Path,
    arm: str,
    jobs: list[tuple[str, dict[str, Any]]],
    log: Callable[[str], None],
    home: Path | None = None,
) -> Forest:
    """Branch every expert from the seed (in `home`, default the run folder: home/seed), train them
    with the recipe's launcher, merge them into a forest."""
    home = Path(home) if home is not None else out
    experts_dir = home / ("random_experts" if arm == "random" else "experts")
    forest_dir = home / ("random_forest" if arm == "random" else "forest")
    seed = home / "seed" if home != out else seed_dir(out)
    paths = []
    for name, data in jobs:
        job = expert_job(recipe, out, name, data, seed_from=seed)
        paths.append(branch_expert(experts_dir / name, job, from_seed=seed))
    train_pending(recipe, paths, log)
    meta = read_expert(paths[0])
    forest = Forest.create(forest_dir, out / "tokenizer", meta["tokenizer_hash"], meta["arch_hash"])
    for p in paths:
        merge_once(forest, p)
    return forest


def _anchored_arm(recipe: Recipe, out: Path, log: Callable[[str], None]) -> None:
    """The anchored experts, their merged mixture, and (arms.anchored_router_tokens) its tuned router."""
    from elmforest.mixtures import anchored, anchored_moe

    anchored.train_anchored_experts(recipe, out, log)
    anchored_moe.build_anchored_moe(recipe, out, log)
    if recipe.arms.anchored_router_tokens:
        anchored_moe.tune_router(recipe, out, recipe.arms.anchored_router_tokens, log)


def _opt_out(recipe: Recipe, out: Path, domain: str, log: Callable[[str], None]) -> None:
    """`domain` removed from the BTM forest (forget) and, when trained, from the anchored mixture;
    each writes its before/after table once (RUN/forget_<d>.json, RUN/anchored_moe_optout_<d>.json)."""
    from elmforest.study.removal import removal_study

    if not (out / f"forget_{domain}.json").is_file():
        removal_study(recipe, out, domain, log=log)
    if recipe.arms.anchored and not (out / f"anchored_moe_optout_{domain}.json").is_file():
        from elmforest.mixtures.anchored_moe import opt_out_study

        opt_out_study(recipe, out, domain, log=log)


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
        results = _run_locked(recipe, out, corpus, progress, log)
        report_results(recipe, out, results)  # the final table and claims to the recipe's trackers
        return results
    finally:
        lock.release()


def seed_recipe(recipe: Recipe, seed: int) -> Recipe:
    """The recipe of one training seed's run: optim.seed = seed, no seeds list."""
    data = recipe.model_dump(mode="json")
    data["optim"]["seed"] = seed
    data["seeds"] = None
    return Recipe.model_validate(data)


def _run_locked(recipe: Recipe, out: Path, corpus: Corpus, progress: bool, log: Callable[[str], None]) -> dict[str, Any]:
    claim_run_dir(recipe, out)
    if recipe.rounds:  # incremental growth: a study of its own (see elmforest.study.rounds)
        from elmforest.study.rounds import run_rounds

        return run_rounds(recipe, out, progress=progress, log=log)
    seeds = recipe.seed_list
    if len(seeds) == 1:
        one = seed_recipe(recipe, seeds[0])
        scores, budget, timing = _train_and_score(one, out, corpus, progress, log)
        runs, all_scores = {seeds[0]: out}, {seeds[0]: scores}
    else:
        runs, all_scores = {}, {}
        for i, s in enumerate(seeds):
            log(f"== training seed {s} ({i + 1} of {len(seeds)}) -> {out / f'seed-{s}'}")
            one = seed_recipe(recipe, s)
            sub = out / f"seed-{s}"
            claim_run_dir(one, sub)
            scores, budget, timing = _train_and_score(one, sub, corpus, progress, log)
            _write_results(one, {s: sub}, {s: scores}, budget, timing, sub, log=None)
            runs[s], all_scores[s] = sub, scores
        timing = {f"seed-{s}": round(sum(read_json(runs[s] / "timing.json", "timing.json").values()), 1) for s in seeds}
    return _write_results(recipe, runs, all_scores, budget, timing, out, log)


def _write_results(
    recipe: Recipe,
    runs: dict[int, Path],
    scores: dict[int, dict[str, Any]],
    budget: Budget,
    timing: dict[str, float],
    out: Path,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    from elmforest.study.summary import assemble_results

    results = assemble_results(recipe, runs, scores, budget, timing)
    storage.write_json(out / "results.json", results)
    write_report(out, results, title=f"elmforest study: {out.name}")
    if log is not None:
        log(results_table(results, markdown=False))
        log(f"report: {out / 'report.md'}")
    return results


def _train_and_score(
    recipe: Recipe, out: Path, corpus: Corpus, progress: bool, log: Callable[[str], None]
) -> tuple[dict[str, Any], Budget, dict[str, float]]:
    """Stages 1-8 of one training seed's run in `out` -> (per-domain evaluations, budget, timing)."""
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
    tok = stage("tokenizer", lambda: prepare_tokenizer(recipe, out))

    def caches() -> None:
        for d in [*recipe.train_domains, *recipe.novel_domains]:
            for split in ("train", "valid", "test"):
                token_array(corpus, tok, d, split)

    stage("token_caches", caches)
    context = model_context(recipe, tok)
    budget = plan_budget(recipe, context)
    log(
        f"budget: {budget.total_steps} steps of {budget.batch_tokens} tokens; seed at step {budget.seed_steps}; "
        f"{budget.n_experts} experts at {budget.expert_batch_tokens} tokens/step"
    )
    procs = recipe.launcher.procs_per_job  # processes per model: data-parallel seed, dense and DEMix too
    check_data_parallel(budget, procs)
    log("[2/9] seed (dense, domain-balanced)")
    stage("seed", lambda: distributed.run_procs(train_seed, recipe, out, full=False, progress=progress, procs=procs))
    if recipe.arms.dense:
        log("[3/9] dense baseline (the seed run continued to the full budget)")
        stage("dense", lambda: distributed.run_procs(train_seed, recipe, out, full=True, progress=progress, procs=procs))
        for k in recipe.arms.dense_multiples:
            log(f"[3/9] dense at {k:g} x the compute, from scratch with its own schedule")
            stage(f"dense_x{k:g}", lambda k=k: distributed.run_procs(
                train_dense_multiple, recipe, out, k, progress=progress, procs=procs))
    log("[4/9] BTM forest: one expert per train domain")
    domain_jobs = [(d, {"kind": "domain", "domain": d}) for d in recipe.train_domains]
    stage("btm_forest", lambda: _train_forest(recipe, out, "btm", domain_jobs, log))
    for f in recipe.arms.seed_fractions:
        log(f"[4/9] BTM forest branched at {f:g} of the budget (seed-fraction sweep)")
        stage(f"btm_seed{f:g}", lambda f=f: _train_forest(sweep_recipe(recipe, f), out, "btm", domain_jobs, log,
                                                          home=sweep_dir(out, f)))
    if recipe.arms.random_split:
        log("[5/9] random-split forest")
        n = len(recipe.train_domains)
        random_jobs = [
            (f"random{i}", {"kind": "random_split", "domains": list(recipe.train_domains), "part": i, "parts": n,
                            "mix": "balanced"})
            for i in range(n)
        ]
        stage("random_forest", lambda: _train_forest(recipe, out, "random", random_jobs, log))
    if recipe.arms.demix:
        log("[6/9] DEMix: one MLP per train domain inside one model, from the seed, compute-matched")
        stage("demix", lambda: distributed.run_procs(mixtures.train_demix, recipe, out, progress=progress, procs=procs))
    if recipe.arms.btx:
        log(f"[7/9] BTX: the forest mixed into one Mixtral MoE, {'every parameter' if recipe.arms.btx_train_all else 'routers'} fine-tuned on {recipe.arms.btx_tokens:,} tokens")
        stage("btx", lambda: mixtures.build_btx(recipe, out, log=log))
    if recipe.arms.anchored:
        log("[7/9] anchored experts (FlexOlmo): FFN copies beside the frozen seed, merged into one opt-out mixture")
        stage("anchored", lambda: _anchored_arm(recipe, out, log))
    log("[8/9] evaluation")
    from elmforest.study.results import evaluate_study

    scores = stage("evaluation", lambda: evaluate_study(recipe, out, tok, context, log))
    for d in recipe.arms.opt_out:
        stage(f"opt_out_{d}", lambda d=d: _opt_out(recipe, out, d, log))
    log("[9/9] report")
    return scores, budget, {**previous, **timing}

