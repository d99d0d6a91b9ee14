"""`elmforest run`: the whole compute-matched comparison from one recipe, resumably.

Stages (each skipped when already complete, each resumable when interrupted):

    1. tokenizer and token caches      RUN/tokenizer, CORPUS/.cache/tokens
    2-7. every arm the recipe trains   the registry of arms (`elmforest.study.arms`), in its order:
       seed                            RUN/dense to the seed step, snapshot RUN/seed
       dense baseline                  RUN/dense continued to the full budget
       dense at k x the compute        RUN/dense_x<k> (arms.dense_multiples), each from scratch
       BTM forest                      RUN/experts/<domain> -> RUN/forest
       seed-fraction forests           RUN/sweep/seed<f>/ (arms.seed_fractions)
       random-split forest             RUN/random_experts/random<i> -> RUN/random_forest
       DEMix (arms.demix)              RUN/demix (see elmforest.mixtures.stages)
       BTX (arms.btx, llama only)      RUN/forest mixed into RUN/btx, routers (or all) fine-tuned
       anchored mixture (arms.anchored) RUN/anchored_experts/<d> -> RUN/anchored_moe (+ _router_tuned)
       then each arm's budget record   RUN/<arm folder>/arm.json
    8. evaluation                      RUN/eval/<domain>.json; then the arms that read it
                                       (arms.opt_out: RUN/forget_<d>.json, ...)
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
from elmforest import storage
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError
from elmforest.btm.seed import model_context, prepare_tokenizer
from elmforest.combine.forest import read_json
from elmforest.study import arms
from elmforest.study.arms.base import StageContext
from elmforest.study.recipe import study_recipe
from elmforest.study.report import results_table, write_report
from elmforest.study.run_folder import claim_run_dir
from elmforest.study.tracking import report_results
from elmforest.data.tokens import token_array


def run_study(recipe: Recipe, out: Path, *, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the whole study in `out`; returns results.json's contents.

    One process at a time per run folder: a second `elmforest run` on the same folder is refused."""
    from filelock import FileLock, Timeout

    out, recipe = Path(out), study_recipe(recipe)
    if distributed.env_size() > 1:
        raise ElmError("elmforest run starts its own processes (launcher.procs_per_job); run it without torchrun")
    corpus = Corpus(recipe.corpus)
    corpus.require([*recipe.train_domains, *recipe.novel_domains], "recipe")
    arms.preflight(recipe)
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
    return type(recipe).model_validate(data)


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
    write_report(out, results, title=f"elmforest study: {out.name}", sections=arms.report_sections)
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
    ctx = StageContext(recipe, out, corpus, tok, context, procs, progress, log)

    def train(arm: arms.Arm, name: str) -> None:
        message = arm.announce(recipe, name)
        if message:
            log(message)
        stage(arm.stage(name), lambda: arm.train(ctx, name))

    for arm, name in arms.trained_arms(recipe, after_evaluation=False):
        train(arm, name)
    arms.arm_records(recipe, out, refresh=True)  # every trained arm's arm.json, from its files as they are now
    log("[8/9] evaluation")
    from elmforest.study.results import evaluate_study

    scores = stage("evaluation", lambda: evaluate_study(recipe, out, tok, context, arms.study_methods(recipe),
                                                        arms.provide_models(recipe), log))
    for arm, name in arms.trained_arms(recipe, after_evaluation=True):
        train(arm, name)
    log("[9/9] report")
    return scores, budget, {**previous, **timing}

