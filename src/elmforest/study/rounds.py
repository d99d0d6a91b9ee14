"""Incremental studies: rounds of new domains joining one forest (recipes with `rounds:`).

    round 1   tokenizer and seed on round 1's domains (domain-balanced), one expert per domain
              branched from the seed (the standard BTM forest of those domains)
    round r   every new domain's expert branched from the forest after round r-1 (mixture init,
              `elmforest.btm.growth`), and a second copy branched from the seed (seed init) at the
              same compute

Compute accounting per round: the forest's training FLOPs so far are the seed's plus every
expert's. The dense model of round r is a fresh dense LM trained on the domains seen so far with
domain-balanced batches of B tokens for floor(forest tokens / B) steps: the same data, the same
architecture and (up to one partial batch) the same training tokens, hence FLOPs. Round 1's dense
model is the usual compute-matched continuation of the seed run. The tokenizer is trained on
round 1's domains only: a forest grown later keeps the tokenizer it was born with.

    RUN/
      tokenizer/  seed/  dense/           round 1 (as in `elmforest run`)
      experts/<domain>/                   every expert of the grown forest
      experts_seedinit/<domain>/          round >= 2 experts again, branched from the seed
      rounds/<r>/forest/                  the forest after round r
      rounds/<r>/forest_seedinit/         the forest after round r-1 plus round r's seed-init experts
      rounds/<r>/dense_run/dense/         round r's compute-matched dense model (r >= 2)
      rounds/<r>/eval/<domain>.json       per-domain NLLs (resumable evaluation)
      rounds/<r>/round.json               the round's results block (written last: "round done")
      results.json  report.md
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from elmforest.btm.experts import branch_expert, expert_job, merge_once, train_pending
from elmforest.btm.seed import SEED_JSON, dense_dir, model_context, prepare_tokenizer, seed_dir, train_seed

from elmforest import storage
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import require
from elmforest.combine.forest import EXPERT_JSON, Forest, read_expert, read_json
from elmforest.study.forest_eval import forest_scores, forest_tokens_flops, results_row, single_nll
from elmforest.btm.growth import Log, branch_grown_expert, fresh_steps, sub_recipe
from elmforest.models.factory import load_model, param_count
from elmforest.study.run_folder import claim_run_dir
from elmforest.combine.scoring import domain_windows, load_experts

ROUND_JSON = "round.json"


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / "rounds" / str(r)


def _build_forest(forest_dir: Path, tok: Path, previous: Path | None, experts: list[Path]) -> Forest:
    """forest_dir = the experts of `previous` (copied) + `experts`; resumable."""
    meta = read_expert(experts[0] if experts else Forest(previous).expert_dir(Forest(previous).names[0]))
    forest = Forest.create(forest_dir, tok, meta["tokenizer_hash"], meta["arch_hash"])
    if previous is not None:
        prev = Forest(previous)
        for n in prev.names:
            merge_once(forest, prev.expert_dir(n))
    for p in experts:
        merge_once(forest, p)
    return forest


def _dense_for_round(recipe: Recipe, out: Path, r: int, seen: list[str], forest_tokens: int, progress: bool) -> Path:
    """Round r's dense model: fresh, balanced over `seen`, floor(forest_tokens / B) steps of B tokens."""
    if r == 1:
        train_seed(sub_recipe(recipe, recipe.rounds[0].domains), out, full=True, progress=progress)
        return dense_dir(out)
    B = recipe.budget.batch_tokens
    rec = sub_recipe(recipe, seen, **{"budget.total_tokens": (forest_tokens // B) * B,
                                     "tokenizer.path": str((out / "tokenizer").resolve())})
    run = round_dir(out, r) / "dense_run"
    train_seed(rec, run, full=True, progress=progress)  # its seed/ snapshot is a by-product
    return dense_dir(run)


def _evaluate_round(
    recipe: Recipe, out: Path, r: int, seen: list[str], arms: dict[str, Path], dense: Path | None, log: Log
) -> dict[str, dict[str, Any]]:
    """Per-domain NLLs of every arm (cached in rounds/<r>/eval/<domain>.json)."""
    tok = out / "tokenizer"
    corpus = Corpus(recipe.corpus)
    context = model_context(recipe, tok)
    e = recipe.eval
    scores: dict[str, dict[str, Any]] = {}
    loaded: dict[str, Any] | None = None
    for d in [*seen, *recipe.novel_domains]:
        path = round_dir(out, r) / "eval" / f"{d}.json"
        if path.is_file():
            scores[d] = read_json(path, "evaluation cache")
            continue
        if loaded is None:
            loaded = {arm: load_experts(Forest(p)) for arm, p in arms.items()}
            if dense is not None:
                loaded["dense"] = load_model(dense).eval()
        log(f"round {r}: evaluating {d}")
        test = domain_windows(corpus, tok, d, "test", context, e.max_tokens_per_domain, e.window_seed)
        valid = domain_windows(corpus, tok, d, "valid", context, e.prior_sequences * context, e.window_seed)
        nll: dict[str, float] = {}
        priors: dict[str, dict[str, float]] = {}
        with torch.inference_mode():
            for arm, p in arms.items():
                got, prior = forest_scores(loaded[arm], test, valid, recipe)
                nll.update({f"{arm}_{k}": v for k, v in got.items()})
                priors[arm] = dict(zip(Forest(p).names, prior))
            if dense is not None:
                nll["dense"] = single_nll(loaded["dense"], test, e.batch_size)
        scores[d] = {"nll": nll, "priors": priors, "tokens": int(test[:, 1:].numel())}
        storage.write_json(path, scores[d])
    return scores


def _round_block(
    recipe: Recipe, out: Path, r: int, seen: list[str], arms: dict[str, Path], dense: Path | None,
    scores: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    seed = read_json(seed_dir(out) / SEED_JSON, "seed.json")
    params = param_count(load_model(seed_dir(out)))
    compute: dict[str, dict[str, float]] = {}
    for arm, p in arms.items():
        tokens, flops = forest_tokens_flops(p, seed)
        compute[arm] = {"tokens": tokens, "flops": flops, "experts": len(Forest(p).names)}
    if dense is not None:
        dj = read_json(dense / "dense.json", "dense.json")
        compute["dense"] = {"tokens": dj["tokens"], "flops": dj["flops"]}
    methods: dict[str, Any] = {}
    if dense is not None:
        methods["dense"] = results_row({d: s["nll"]["dense"] for d, s in scores.items()}, seen, recipe.novel_domains,
                                compute["dense"]["flops"], params)
    for arm in arms:
        n = compute[arm]["experts"]
        for kind, inf in (("ensemble_cached", n * params), ("average_posterior", params)):
            key = f"{arm}_{kind}"
            methods[key] = results_row({d: s["nll"][key] for d, s in scores.items()}, seen, recipe.novel_domains,
                                compute[arm]["flops"], inf)
    parents = {}
    for d in recipe.rounds[r - 1].domains:
        meta = read_json(out / "experts" / d / EXPERT_JSON, "expert.json")
        parents[d] = meta["parents"]
    return {
        "round": r,
        "domains": list(recipe.rounds[r - 1].domains),
        "seen": list(seen),
        "compute": compute,
        "methods": methods,
        "parents": parents,
        "priors": {arm: {d: s["priors"][arm] for d, s in scores.items()} for arm in arms},
    }


def run_rounds(
    recipe: Recipe, out: Path, *, progress: bool = True, log: Log = print, max_rounds: int | None = None
) -> dict[str, Any]:
    """Run (or continue) an incremental study: rounds of new domains joining one forest.

    Finished rounds (rounds/<r>/round.json) and finished experts (expert.json) are skipped;
    `max_rounds` stops early (results cover the rounds done). Returns results.json's contents.
    """
    out = Path(out)
    require(recipe.rounds, "the recipe has no rounds:")
    Corpus(recipe.corpus).require([*recipe.train_domains, *recipe.novel_domains], "recipe")
    claim_run_dir(recipe, out)
    first = sub_recipe(recipe, recipe.rounds[0].domains)
    log(f"grow: {len(recipe.rounds)} rounds: " + " | ".join(", ".join(rc.domains) for rc in recipe.rounds))
    prepare_tokenizer(first, out)  # trained on round 1's domains only
    blocks: list[dict[str, Any]] = []
    seen: list[str] = []
    for r, rc in enumerate(recipe.rounds[: max_rounds or len(recipe.rounds)], 1):
        seen = [*seen, *rc.domains]
        rdir = round_dir(out, r)
        if (rdir / ROUND_JSON).is_file():
            log(f"round {r}: done")
            blocks.append(read_json(rdir / ROUND_JSON, ROUND_JSON))
            continue
        log(f"round {r}: {', '.join(rc.domains)}")
        tok = out / "tokenizer"
        arms: dict[str, Path] = {}
        if r == 1:
            train_seed(first, out, full=False, progress=progress)
            paths = []
            for d in rc.domains:
                job = expert_job(first, out, d, {"kind": "domain", "domain": d})
                paths.append(branch_expert(out / "experts" / d, job, from_seed=seed_dir(out)))
            train_pending(first, paths, log)
            arms["forest"] = _build_forest(rdir / "forest", tok, None, paths).path
        else:
            previous = round_dir(out, r - 1) / "forest"
            models = load_experts(Forest(previous))
            grown, seeded = [], []
            for d in rc.domains:
                grown.append(branch_grown_expert(first, out, previous, d, out / "experts" / d, top_k=recipe_top_k(recipe),
                                                 init="mixture", models=models))
                seeded.append(branch_grown_expert(first, out, previous, d, out / "experts_seedinit" / d,
                                                  init="seed", models=models))
            del models
            train_pending(first, [*grown, *seeded], log)
            arms["forest"] = _build_forest(rdir / "forest", tok, previous, grown).path
            arms["forest_seedinit"] = _build_forest(rdir / "forest_seedinit", tok, previous, seeded).path
        dense = None
        if recipe.arms.dense:
            tokens, _ = forest_tokens_flops(arms["forest"], read_json(seed_dir(out) / SEED_JSON, "seed.json"))
            log(f"round {r}: dense model on {', '.join(seen)} ({tokens:,} tokens)")
            dense = _dense_for_round(recipe, out, r, seen, tokens, progress)
        scores = _evaluate_round(recipe, out, r, seen, arms, dense, log)
        block = _round_block(recipe, out, r, seen, arms, dense, scores)
        storage.write_json(rdir / ROUND_JSON, block)
        blocks.append(block)
    results = {
        "rounds": blocks,
        "budget": {
            "total_tokens_round1": recipe.budget.total_tokens,
            "batch_tokens": recipe.budget.batch_tokens,
            "expert_steps": fresh_steps(first, out),
            "top_k": recipe_top_k(recipe),
        },
        "notes": GROW_NOTES,
        "recipe": recipe.model_dump(mode="json"),
    }
    storage.write_json(out / "results.json", results)
    write_rounds_report(out, results)
    for b in blocks:
        log(f"round {b['round']} ({', '.join(b['seen'])}):")
        log(_rounds_table(b, markdown=False))
    log(f"report: {out / 'report.md'}")
    return results


def recipe_top_k(recipe: Recipe) -> int:
    """Parents of a grown expert in a rounds study: 2, or fewer when round 1 has fewer experts."""
    return min(2, len(recipe.rounds[0].domains)) if recipe.rounds else 2


GROW_NOTES = [
    "forest FLOPs = the round-1 seed + every expert in the forest; each expert trains the steps and batch "
    "of a round-1 expert, so every round adds the same compute per new domain.",
    "dense (round r >= 2) = a fresh dense LM on the domains seen so far, domain-balanced batches of B "
    "tokens, floor(forest tokens / B) steps: the same data and (to one batch) the same training FLOPs; "
    "round 1's dense model is the seed run continued (the standard compute-matched baseline).",
    "forest_seedinit = the forest after round r-1 plus round r's experts branched from the seed instead "
    "of the forest's prior-weighted average: the same steps, batch, data and FLOPs; only the start differs. "
    "Its training compute is an extra experiment, not part of the forest.",
    "The prior that picks a new expert's parents costs a forward pass of each expert over "
    "eval.prior_sequences valid windows (inference, not counted in training FLOPs).",
    "The tokenizer is trained on round 1's domains only.",
]



def _rounds_table(block: dict[str, Any], markdown: bool) -> str:
    from elmforest.study.report import results_table

    return results_table(block["methods"], markdown=markdown)


def write_rounds_report(out: Path, results: dict[str, Any]) -> Path:
    """report.md of an incremental study: compute and a perplexity table per round, and a reading."""
    from elmforest.study.report import fmt_change, fmt_ppl

    parts = [f"# elmforest incremental study: {Path(out).name}", ""]
    for b in results["rounds"]:
        parts += [f"## Round {b['round']}: + {', '.join(b['domains'])}", ""]
        parts += ["| arm | experts | tokens | training FLOPs |", "|---|---|---|---|"]
        for arm, c in b["compute"].items():
            parts.append(f"| {arm} | {c.get('experts', '-')} | {c['tokens']:,} | {c['flops']:.3e} |")
        parents = [f"{d} <- " + (", ".join(f"{p['name']} {p['weight']:.2f}" for p in ps) if isinstance(ps, list) else ps)
                   for d, ps in b["parents"].items()]
        parts += ["", "Parents: " + "; ".join(parents), "", _rounds_table(b, markdown=True), ""]
        rows = b["methods"]
        lines = []
        for split, label in (("train", "seen"), ("novel", "novel")):
            for a, c in (("forest_ensemble_cached", "dense"), ("forest_average_posterior", "dense"),
                         ("forest_ensemble_cached", "forest_seedinit_ensemble_cached"),
                         ("forest_average_posterior", "forest_seedinit_average_posterior")):
                if a in rows and c in rows and rows[a][f"{split}_mean"] and rows[c][f"{split}_mean"]:
                    x, y = rows[a][f"{split}_mean"], rows[c][f"{split}_mean"]
                    lines.append(f"- {label} domains: `{a}` {fmt_ppl(x)} vs `{c}` {fmt_ppl(y)} ({fmt_change(x, y)}): "
                                 f"{'better' if x < y else 'not better'}.")
        if lines:
            parts += ["Reading:", "", *lines, ""]
    parts += ["## Notes", "", *[f"- {n}" for n in results.get("notes", [])], ""]
    path = Path(out) / "report.md"
    storage.write_text(path, "\n".join(parts) + "\n")
    return path
