"""Growing a forest: new domains join a trained forest as new experts (BTM's incremental training).

A new domain's expert starts from what the forest already knows about that domain:

    prior   = cached_prior(forest experts, first eval.prior_sequences valid windows of NEW)
    parents = the top-k experts by prior, weights renormalised:  w_j = prior_j / sum_{top-k} prior
    init    = sum_j w_j * theta_j       --init mixture  (the paper's "branch from a weighted average")
            = theta_seed                --init seed     (the round-1 seed, the equal-compute control)
            = theta_{argmax prior}      --init nearest  (top-1)

and then trains with a fresh AdamW and a schedule of its own for exactly the steps and batch of a
round-1 expert (total_steps - seed_steps steps of B/n tokens, n = round-1 domains), so every
expert of a grown forest costs the same. The finished expert is merged into the forest.

Incremental recipes (`rounds:`) run this round by round (`run_rounds`):

    round 1   tokenizer and seed on round 1's domains (domain-balanced), one expert per domain
              branched from the seed (the standard BTM forest of those domains)
    round r   every new domain's expert branched from the forest after round r-1 (mixture init),
              and a second copy branched from the seed (seed init) at the same compute

Compute accounting per round: the forest's training FLOPs so far are the seed's plus every
expert's. The dense model of round r is a fresh dense LM trained on the domains seen so far with
domain-balanced batches of B tokens for floor(forest tokens / B) steps: the same data, the same
architecture and (up to one partial batch) the same training tokens, hence FLOPs. Round 1's dense
model is the usual compute-matched continuation of the seed run. The tokenizer is trained on
round 1's domains only: a forest grown later keeps the tokenizer it was born with.

Also here: `removal_study` (drop a domain's expert and watch that domain's perplexity rise to a
novel domain's level) and the c-BTM comparison helpers (`router_row`, `compare_runs`).

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

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elmforest import phases, storage
from elmforest.config import Recipe, recipe_from_dict
from elmforest.corpus import Corpus
from elmforest.ensemble import mix_logprobs
from elmforest.errors import ElmError, require
from elmforest.forest import EXPERT_JSON, Forest, read_expert, read_json
from elmforest.models import load_model
from elmforest.report import geo_mean
from elmforest.results import param_count
from elmforest.scoring import domain_windows, estimate_prior, load_experts

INITS = ("mixture", "seed", "nearest")
GROW_JSON = "grow.json"
ROUND_JSON = "round.json"
Log = Callable[[str], Any]


# ---------------------------------------------------------------------------------------------
# Recipes for the parts of a grown study


def sub_recipe(recipe: Recipe, domains: list[str], **changes: Any) -> Recipe:
    """The recipe restricted to `domains` (no rounds); `changes` set dotted keys, e.g.
    `{"budget.total_tokens": 10_000}`. Validated like any recipe."""
    data = recipe.model_dump(mode="json")
    data.update(train_domains=list(domains), rounds=[])
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return recipe_from_dict(data, "recipe (derived)")


def expert_recipe(recipe: Recipe) -> Recipe:
    """The recipe whose budget sizes every expert: round 1's for an incremental recipe."""
    return sub_recipe(recipe, recipe.rounds[0].domains) if recipe.rounds else recipe


def fresh_steps(recipe: Recipe, run_dir: Path) -> int:
    """Steps of a grown expert: those of a round-1 expert (total_steps - seed_steps)."""
    tok = Path(run_dir) / "tokenizer"
    budget = phases.plan_budget(recipe, phases.model_context(recipe, tok))
    return budget.total_steps - budget.seed_steps


# ---------------------------------------------------------------------------------------------
# The prior of a forest on a new domain, and the parents it picks


def forest_prior(
    forest_dir: Path, corpus: Corpus, tokenizer_dir: Path, domain: str, context: int, recipe: Recipe,
    models: list[torch.nn.Module] | None = None,
) -> dict[str, float]:
    """The forest's cached prior on the first `eval.prior_sequences` valid windows of `domain`."""
    forest = Forest(forest_dir)
    require(forest.names, "the forest has no experts to grow from", forest_dir)
    e = recipe.eval
    models = models if models is not None else load_experts(forest)
    with torch.inference_mode():
        prior, _batches, _windows = estimate_prior(
            models, corpus, tokenizer_dir, domain, context, e.prior_sequences, e.prior_batch, e.prior_alpha, e.posterior
        )
    return dict(zip(forest.names, prior.tolist()))


def choose_parents(prior: dict[str, float], top_k: int, init: str) -> list[dict[str, Any]]:
    """[{name, weight}]: the top-k experts by prior with weights renormalised to sum to 1
    (top-1 for `nearest`; ties broken by forest order)."""
    require(init in INITS, f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    k = 1 if init == "nearest" else top_k
    require(k >= 1, f"--top-k must be >= 1, got {top_k}")
    order = sorted(prior, key=lambda n: -prior[n])[:k]  # sorted() is stable: forest order on ties
    total = sum(prior[n] for n in order)
    require(total > 0, "the forest's prior on the new domain is zero for every chosen expert")
    return [{"name": n, "weight": prior[n] / total} for n in order]


def branch_grown_expert(
    recipe: Recipe,
    run_dir: Path,
    forest_dir: Path,
    domain: str,
    expert_dir: Path,
    *,
    top_k: int = 2,
    init: str = "mixture",
    models: list[torch.nn.Module] | None = None,
) -> Path:
    """Create the new domain's expert folder, ready to train (weights, job.json, grow.json).

    `recipe` sizes the expert (see `expert_recipe`); its corpus must hold `domain`. A folder
    already branched is left as it is. `models`: the forest's loaded experts, to reuse.
    """
    run_dir, expert_dir = Path(run_dir).resolve(), Path(expert_dir)
    if (expert_dir / phases.JOB_JSON).is_file():
        return expert_dir
    require(init in INITS, f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    tok = run_dir / "tokenizer"
    require((tok / "tokenizer.json").is_file(), "the run has no tokenizer/ folder", run_dir)
    corpus = Corpus(recipe.corpus)
    corpus.require([domain], "--domain")
    forest = Forest(forest_dir)
    if domain in forest.names:
        raise ElmError(f"the forest already has an expert named {domain!r}", forest_dir)
    context = phases.model_context(recipe, tok)
    prior = forest_prior(forest_dir, corpus, tok, domain, context, recipe, models)
    chosen = choose_parents(prior, top_k, init)
    parents: list[dict[str, Any]] | str = "seed" if init == "seed" else chosen
    job = phases.expert_job(
        recipe, run_dir, domain, {"kind": "domain", "domain": domain},
        parents=parents, fresh_steps=fresh_steps(recipe, run_dir),
    )
    if init == "seed":
        seed = phases.seed_dir(run_dir)
        require((seed / phases.SEED_JSON).is_file(), "--init seed needs the run's seed (seed/seed.json)", run_dir)
        # start_step is 0 (fresh_steps), so the seed's weights come with a fresh AdamW and schedule
        phases.branch_expert(expert_dir, job, from_seed=seed)
    else:
        phases.branch_expert(expert_dir, job, from_experts=[(forest.expert_dir(p["name"]), p["weight"]) for p in chosen])
    storage.write_json(
        expert_dir / GROW_JSON,
        {"domain": domain, "init": init, "top_k": top_k, "forest": str(Path(forest_dir).resolve()),
         "prior": prior, "parents": chosen if init != "seed" else "seed",
         "prior_windows": recipe.eval.prior_sequences, "posterior": recipe.eval.posterior},
    )
    return expert_dir


def default_expert_dir(run_dir: Path, domain: str, init: str) -> Path:
    return Path(run_dir) / ("experts" if init == "mixture" else f"experts_{init}init") / domain


def grow_expert(
    recipe: Recipe,
    run_dir: Path,
    forest_dir: Path,
    domain: str,
    top_k: int = 2,
    init: str = "mixture",
    expert_dir: Path | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Branch, train and merge one new domain's expert; returns its expert.json plus the prior.

    run_dir holds tokenizer/ (and seed/ for --init seed); the expert is sized by
    `expert_recipe(recipe)` and trained in `expert_dir` (default RUN/experts/<domain>, or
    RUN/experts_<init>init/<domain>). Rerunning after an interruption resumes.
    """
    rec = expert_recipe(recipe)
    expert_dir = Path(expert_dir) if expert_dir is not None else default_expert_dir(run_dir, domain, init)
    forest = Forest(forest_dir)
    if domain in forest.names and (expert_dir / EXPERT_JSON).is_file():
        log(f"{domain} is already in {forest_dir}")
    else:
        branch_grown_expert(rec, run_dir, forest_dir, domain, expert_dir, top_k=top_k, init=init)
        phases.train_pending(rec, [expert_dir], log)
        phases.merge_once(forest, expert_dir)
    meta = read_expert(expert_dir)
    return {**meta, "grow": read_json(expert_dir / GROW_JSON, GROW_JSON)}


# ---------------------------------------------------------------------------------------------
# Evaluation helpers shared by the rounds, the removal study and the router


def forest_scores(
    models: list[torch.nn.Module], test: torch.Tensor, valid: torch.Tensor, recipe: Recipe, average: bool = True
) -> tuple[dict[str, float], list[float]]:
    """NLL of the cached-prior ensemble (and of the posterior-weighted average) -> ({method: nll}, prior)."""
    from elmforest.results import averaged_model, batched_logprobs, ema_prior, mixture_nll, nll_of

    e = recipe.eval
    lp = batched_logprobs(models, test, e.batch_size)  # [n, N, T]
    vlp = batched_logprobs(models, valid, e.batch_size)  # [n, P, T]
    prior, _ = ema_prior(vlp, e.prior_batch, e.prior_alpha, e.posterior)
    out = {"ensemble_cached": mixture_nll(lp, prior, e.posterior)}
    if average:
        avg = averaged_model(models, prior.tolist())
        out["average_posterior"] = nll_of(batched_logprobs([avg], test, e.batch_size)[0])
    return out, prior.tolist()


def single_nll(model: torch.nn.Module, test: torch.Tensor, batch_size: int) -> float:
    from elmforest.results import batched_logprobs, nll_of

    return nll_of(batched_logprobs([model], test, batch_size)[0])


def _row(nll: dict[str, float], train: list[str], novel: list[str], flops: float | None, params: int) -> dict[str, Any]:
    """One results_table row from per-domain NLLs."""
    t = {d: math.exp(nll[d]) for d in train}
    n = {d: math.exp(nll[d]) for d in novel}
    return {"train": t, "novel": n, "train_mean": geo_mean(list(t.values())), "novel_mean": geo_mean(list(n.values())),
            "train_flops": flops, "inference_params": params}


# ---------------------------------------------------------------------------------------------
# Incremental rounds


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / "rounds" / str(r)


def _build_forest(forest_dir: Path, tok: Path, previous: Path | None, experts: list[Path]) -> Forest:
    """forest_dir = the experts of `previous` (copied) + `experts`; resumable."""
    meta = read_expert(experts[0] if experts else Forest(previous).expert_dir(Forest(previous).names[0]))
    forest = Forest.create(forest_dir, tok, meta["tokenizer_hash"], meta["arch_hash"])
    if previous is not None:
        prev = Forest(previous)
        for n in prev.names:
            phases.merge_once(forest, prev.expert_dir(n))
    for p in experts:
        phases.merge_once(forest, p)
    return forest


def _forest_tokens_flops(forest_dir: Path, seed: dict[str, Any]) -> tuple[int, float]:
    f = Forest(forest_dir)
    metas = [f.expert_meta(n) for n in f.names]
    return seed["tokens"] + sum(m["tokens"] for m in metas), seed["flops"] + sum(m["flops"] for m in metas)


def _dense_for_round(recipe: Recipe, out: Path, r: int, seen: list[str], forest_tokens: int, progress: bool) -> Path:
    """Round r's dense model: fresh, balanced over `seen`, floor(forest_tokens / B) steps of B tokens."""
    if r == 1:
        phases.train_seed(sub_recipe(recipe, recipe.rounds[0].domains), out, full=True, progress=progress)
        return phases.dense_dir(out)
    B = recipe.budget.batch_tokens
    rec = sub_recipe(recipe, seen, **{"budget.total_tokens": (forest_tokens // B) * B,
                                     "tokenizer.path": str((out / "tokenizer").resolve())})
    run = round_dir(out, r) / "dense_run"
    phases.train_seed(rec, run, full=True, progress=progress)  # its seed/ snapshot is a by-product
    return phases.dense_dir(run)


def _evaluate_round(
    recipe: Recipe, out: Path, r: int, seen: list[str], arms: dict[str, Path], dense: Path | None, log: Log
) -> dict[str, dict[str, Any]]:
    """Per-domain NLLs of every arm (cached in rounds/<r>/eval/<domain>.json)."""
    tok = out / "tokenizer"
    corpus = Corpus(recipe.corpus)
    context = phases.model_context(recipe, tok)
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
        test = domain_windows(corpus, tok, d, "test", context, e.max_tokens_per_domain)
        valid = domain_windows(corpus, tok, d, "valid", context, e.prior_sequences * context + 1)
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
    seed = read_json(phases.seed_dir(out) / phases.SEED_JSON, "seed.json")
    params = param_count(load_model(phases.seed_dir(out)))
    compute: dict[str, dict[str, float]] = {}
    for arm, p in arms.items():
        tokens, flops = _forest_tokens_flops(p, seed)
        compute[arm] = {"tokens": tokens, "flops": flops, "experts": len(Forest(p).names)}
    if dense is not None:
        dj = read_json(dense / "dense.json", "dense.json")
        compute["dense"] = {"tokens": dj["tokens"], "flops": dj["flops"]}
    methods: dict[str, Any] = {}
    if dense is not None:
        methods["dense"] = _row({d: s["nll"]["dense"] for d, s in scores.items()}, seen, recipe.novel_domains,
                                compute["dense"]["flops"], params)
    for arm in arms:
        n = compute[arm]["experts"]
        for kind, inf in (("ensemble_cached", n * params), ("average_posterior", params)):
            key = f"{arm}_{kind}"
            methods[key] = _row({d: s["nll"][key] for d, s in scores.items()}, seen, recipe.novel_domains,
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
    from elmforest.study import claim_run_dir

    out = Path(out)
    require(recipe.rounds, "the recipe has no rounds:")
    Corpus(recipe.corpus).require([*recipe.train_domains, *recipe.novel_domains], "recipe")
    claim_run_dir(recipe, out)
    first = sub_recipe(recipe, recipe.rounds[0].domains)
    log(f"grow: {len(recipe.rounds)} rounds: " + " | ".join(", ".join(rc.domains) for rc in recipe.rounds))
    phases.prepare_tokenizer(first, out)  # trained on round 1's domains only
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
            phases.train_seed(first, out, full=False, progress=progress)
            paths = []
            for d in rc.domains:
                job = phases.expert_job(first, out, d, {"kind": "domain", "domain": d})
                paths.append(phases.branch_expert(out / "experts" / d, job, from_seed=phases.seed_dir(out)))
            phases.train_pending(first, paths, log)
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
            phases.train_pending(first, [*grown, *seeded], log)
            arms["forest"] = _build_forest(rdir / "forest", tok, previous, grown).path
            arms["forest_seedinit"] = _build_forest(rdir / "forest_seedinit", tok, previous, seeded).path
        dense = None
        if recipe.arms.dense:
            tokens, _ = _forest_tokens_flops(arms["forest"], read_json(phases.seed_dir(out) / phases.SEED_JSON, "seed.json"))
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
    from elmforest.report import results_table

    return results_table(block["methods"], markdown=markdown)


def write_rounds_report(out: Path, results: dict[str, Any]) -> Path:
    """report.md of an incremental study: compute and a perplexity table per round, and a reading."""
    from elmforest.report import _change, _fmt_ppl

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
                    lines.append(f"- {label} domains: `{a}` {_fmt_ppl(x)} vs `{c}` {_fmt_ppl(y)} ({_change(x, y)}): "
                                 f"{'better' if x < y else 'not better'}.")
        if lines:
            parts += ["Reading:", "", *lines, ""]
    parts += ["## Notes", "", *[f"- {n}" for n in results.get("notes", [])], ""]
    path = Path(out) / "report.md"
    storage.write_text(path, "\n".join(parts) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Removal: a domain leaves the model when its expert does


def default_forest(run_dir: Path) -> Path:
    """RUN/forest, or the last round's forest of an incremental run."""
    run_dir = Path(run_dir)
    if (run_dir / "forest" / "forest.json").is_file():
        return run_dir / "forest"
    rounds = sorted((int(p.name) for p in (run_dir / "rounds").glob("*") if p.name.isdigit()), reverse=True)
    for r in rounds:
        if (round_dir(run_dir, r) / "forest" / "forest.json").is_file():
            return round_dir(run_dir, r) / "forest"
    raise ElmError("no forest in this run folder (forest/ or rounds/<r>/forest/)", run_dir)


def removal_study(
    recipe: Recipe, run_dir: Path, domain: str, forest_dir: Path | None = None, log: Log = print
) -> dict[str, Any]:
    """Remove `domain`'s expert from a copy of the forest and compare the cached-prior ensemble's
    perplexity before and after on that domain, the other forest domains and the novel domains.

    The copy lives in RUN/forget_<domain>/forest (the original is untouched); the table is
    written to RUN/forget_<domain>.json and returned.
    """
    run_dir = Path(run_dir)
    forest_dir = Path(forest_dir) if forest_dir is not None else default_forest(run_dir)
    before = Forest(forest_dir)
    names = before.names
    owner = [e.name for e in before.experts if e.domain == domain or e.name == domain]
    require(owner, f"no expert of domain {domain!r} in the forest (has: {', '.join(names)})", forest_dir)
    require(len(names) > len(owner), "removing it would leave no experts", forest_dir)
    copy = run_dir / f"forget_{domain}" / "forest"
    if copy.exists():
        shutil.rmtree(copy)
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(forest_dir, copy, ignore=shutil.ignore_patterns(".forest.lock"))
    after = Forest(copy)
    for n in owner:
        after.remove(n)
    tok = before.tokenizer_dir
    corpus = Corpus(recipe.corpus)
    context = phases.model_context(recipe, run_dir / "tokenizer")
    e = recipe.eval
    others = [x.domain for x in before.experts if x.name not in owner]
    domains = [domain, *[d for d in others if d in corpus.domains], *[d for d in recipe.novel_domains if d not in others]]
    m_before, m_after = load_experts(before), load_experts(after)
    table: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    priors: dict[str, dict[str, float]] = {}
    for d in domains:
        log(f"forget {domain}: evaluating {d}")
        test = domain_windows(corpus, tok, d, "test", context, e.max_tokens_per_domain)
        valid = domain_windows(corpus, tok, d, "valid", context, e.prior_sequences * context + 1)
        with torch.inference_mode():
            nb, _ = forest_scores(m_before, test, valid, recipe, average=False)
            na, prior = forest_scores(m_after, test, valid, recipe, average=False)
        table["before"][d] = math.exp(nb["ensemble_cached"])
        table["after"][d] = math.exp(na["ensemble_cached"])
        priors[d] = dict(zip(after.names, prior))
    novel = [d for d in recipe.novel_domains if d in domains]
    result = {
        "removed": domain,
        "experts_removed": owner,
        "forest": str(forest_dir),
        "forest_after": str(copy),
        "method": f"cached-prior ensemble ({e.posterior} posterior)",
        "domains": {"removed": domain, "kept": [d for d in others if d in domains], "novel": novel},
        "ppl": table,
        "novel_mean_before": geo_mean([table["before"][d] for d in novel]),
        "priors_after": priors,
    }
    storage.write_json(run_dir / f"forget_{domain}.json", result)
    return result


def removal_table(result: dict[str, Any]) -> str:
    """Plain-text table: domain, role, perplexity before and after, change."""
    from elmforest.report import _change, _fmt_ppl

    dom = result["domains"]
    roles = {result["removed"]: "removed", **{d: "kept" for d in dom["kept"]}, **{d: "novel" for d in dom["novel"]}}
    rows = [("domain", "role", "ppl before", "ppl after", "change")]
    for d, role in roles.items():
        b, a = result["ppl"]["before"][d], result["ppl"]["after"][d]
        rows.append((d, role, _fmt_ppl(b), _fmt_ppl(a), _change(a, b)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if result.get("novel_mean_before"):
        lines.append(f"novel domains' mean perplexity (before): {_fmt_ppl(result['novel_mean_before'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# c-BTM: route a clustered forest by tf-idf distance, and compare two runs side by side


def router_weights(router: Any, index: list[int], texts: list[str]) -> torch.Tensor:
    """[N, n] weights of the experts holding clusters `index` for each text, renormalised over
    those experts (rows sum to 1; the router caches each distinct text)."""
    w = torch.tensor([[float(router.weights_for(t)[c]) for c in index] for t in texts], dtype=torch.float64)
    return w / w.sum(1, keepdim=True)


def router_row(
    recipe: Recipe, run_dir: Path, clusterer_dir: Path, temperature: float | None = None, log: Log = print
) -> dict[str, Any]:
    """`cbtm_ensemble_router`: the clustered forest mixed with c-BTM's router weights.

    Window i (tokens i*C .. i*C+C) is routed by the decoded text of the window before it (tokens
    (i-1)*C .. i*C, all already seen when window i is predicted; no test token routes its own
    prediction); window 0 by its first token alone. Weights w_c = softmax(-|z - centre_c|^2 / T)
    are constant across the window: log p = logsumexp_c(log w_c + log p_c). Expert clusterC
    takes centre C. Cached in RUN/router.json.
    """
    from elmforest.cluster import DEFAULT_TEMPERATURE, ClusterModel, ClusterRouter
    from elmforest.results import batched_logprobs, nll_of
    from elmforest.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    cache = run_dir / "router.json"
    if cache.is_file():
        return read_json(cache, "router.json")
    temperature = temperature or DEFAULT_TEMPERATURE
    router = ClusterRouter(ClusterModel.load(clusterer_dir), temperature)
    forest = Forest(run_dir / "forest")
    index = []
    for n in forest.names:
        require(n.startswith("cluster") and n[7:].isdigit() and int(n[7:]) < router.model.k,
                f"expert {n!r} is not one of the clusterer's cluster0..cluster{router.model.k - 1}", forest.path)
        index.append(int(n[7:]))
    models = load_experts(forest)
    tok_dir = run_dir / "tokenizer"
    tokenizer = load_tokenizer(tok_dir)
    corpus = Corpus(recipe.corpus)
    context = phases.model_context(recipe, tok_dir)
    nll: dict[str, float] = {}
    for d in [*recipe.train_domains, *recipe.novel_domains]:
        log(f"router: evaluating {d}")
        test = domain_windows(corpus, tok_dir, d, "test", context, recipe.eval.max_tokens_per_domain)
        texts = [tokenizer.decode(test[0, :1].tolist())] + [tokenizer.decode(w.tolist()) for w in test[:-1]]
        w = router_weights(router, index, texts)  # [N, n]
        with torch.inference_mode():
            lp = batched_logprobs(models, test, recipe.eval.batch_size)  # [n, N, T]
        logw = w.T.log().unsqueeze(-1).expand(-1, -1, lp.shape[-1])  # [n, N, T]
        nll[d] = nll_of(mix_logprobs(lp, logw))
    params = param_count(models[0])
    seed = read_json(phases.seed_dir(run_dir) / phases.SEED_JSON, "seed.json")
    _, flops = _forest_tokens_flops(forest.path, seed)
    row = _row(nll, recipe.train_domains, recipe.novel_domains, flops, len(models) * params)
    result = {"cbtm_ensemble_router": row, "temperature": temperature, "clusterer": str(clusterer_dir)}
    storage.write_json(cache, result)
    return result


def compare_runs(run_a: Path, run_b: Path, extra_b: dict[str, Any] | None = None) -> str:
    """Two runs' results side by side: method, then train/novel means and each novel domain per run."""
    from elmforest.report import _fmt_ppl, method_rows

    def rows(run: Path) -> dict[str, Any]:
        res = read_json(Path(run) / "results.json", "results.json")
        require("rounds" not in res, "an incremental run; compare its rounds in report.md", run)
        return method_rows(res)

    a, b = rows(run_a), {**rows(run_b), **(extra_b or {})}
    novel = sorted({d for r in [*a.values(), *b.values()] for d in r.get("novel", {})})
    header = ["method", "A train", "B train", *[f"{d} A/B" for d in novel], "A novel", "B novel"]
    body = []
    for m in list(dict.fromkeys([*a, *b])):
        ra, rb = a.get(m, {}), b.get(m, {})
        body.append([m, _fmt_ppl(ra.get("train_mean")), _fmt_ppl(rb.get("train_mean")),
                     *[f"{_fmt_ppl(ra.get('novel', {}).get(d))}/{_fmt_ppl(rb.get('novel', {}).get(d))}" for d in novel],
                     _fmt_ppl(ra.get("novel_mean")), _fmt_ppl(rb.get("novel_mean"))])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    legend = f"A = {run_a}, B = {run_b}; perplexities, means are geometric means over domains"
    return "\n".join([legend, fmt.format(*header), *(fmt.format(*row) for row in body)])
