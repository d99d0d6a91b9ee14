"""Growing a forest: a new domain joins a trained forest as a new expert (BTM's incremental training).

A new domain's expert starts from what the forest already knows about that domain:

    prior   = cached_prior(forest experts, eval.prior_sequences valid windows of NEW, drawn from its whole split)
    parents = the top-k experts by prior, weights renormalised:  w_j = prior_j / sum_{top-k} prior
    init    = sum_j w_j * theta_j       --init mixture  (the paper's "branch from a weighted average")
            = theta_seed                --init seed     (the round-1 seed, the equal-compute control)
            = theta_{argmax prior}      --init nearest  (top-1)

and then trains with a fresh AdamW and a schedule of its own for exactly the steps and batch of a
round-1 expert (total_steps - seed_steps steps of B/n tokens, n = round-1 domains), so every
expert of a grown forest costs the same. The finished expert is merged into the forest
(`grow_expert`, `elmforest grow`). `elmforest.study.rounds` runs this round by round for an incremental
recipe; `elmforest.study.removal` takes a domain out again.

    RUN/experts/<domain>/                 the grown expert (--init seed: experts_seedinit/<domain>/,
                                          --init nearest: experts_nearestinit/<domain>/)
      grow.json                           the prior, the chosen parents and weights, the settings
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elmforest.train.budget import plan_budget
from elmforest.btm.experts import branch_expert, expert_job, merge_once, train_pending
from elmforest.btm.jobs import JOB_JSON
from elmforest.btm.seed import SEED_JSON, model_context, seed_dir
from elmforest import storage
from elmforest.config import Recipe, recipe_from_dict
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError, require
from elmforest.combine.forest import EXPERT_JSON, Forest, read_expert, read_json
from elmforest.combine.logprobs import expert_logprobs
from elmforest.combine.prior import cached_prior
from elmforest.combine.scoring import ExpertPool, prior_windows

INITS = ("mixture", "seed", "nearest")
GROW_JSON = "grow.json"
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
    budget = plan_budget(recipe, model_context(recipe, tok))
    return budget.total_steps - budget.seed_steps


# ---------------------------------------------------------------------------------------------
# The prior of a forest on a new domain, and the parents it picks


def forest_prior(
    forest_dir: Path, corpus: Corpus, tokenizer_dir: Path, domain: str, context: int, recipe: Recipe,
    models: list[torch.nn.Module] | None = None,
) -> dict[str, float]:
    """The forest's cached prior on `eval.prior_sequences` valid windows of `domain` (drawn from the whole
    split), computed as the study computes it: the experts' log-probs in batches of `eval.batch_size`,
    then `prior.cached_prior` with `eval.prior_batch`, `eval.prior_alpha` and `eval.posterior`."""
    forest = Forest(forest_dir)
    require(forest.names, "the forest has no experts to grow from", forest_dir)
    e = recipe.eval
    windows = prior_windows(corpus, tokenizer_dir, domain, context, e.prior_sequences, e.window_seed)
    members = models if models is not None else [ExpertPool(forest).loader(n) for n in forest.names]  # one loaded at a time
    lp = expert_logprobs(members, windows, e.batch_size)
    prior = cached_prior(lp, e.prior_batch, e.prior_alpha, e.posterior)
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
    if (expert_dir / JOB_JSON).is_file():
        return expert_dir
    require(init in INITS, f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    tok = run_dir / "tokenizer"
    require((tok / "tokenizer.json").is_file(), "the run has no tokenizer/ folder", run_dir)
    corpus = Corpus(recipe.corpus)
    corpus.require([domain], "--domain")
    forest = Forest(forest_dir)
    if domain in forest.names:
        raise ElmError(f"the forest already has an expert named {domain!r}", forest_dir)
    context = model_context(recipe, tok)
    prior = forest_prior(forest_dir, corpus, tok, domain, context, recipe, models)
    chosen = choose_parents(prior, top_k, init)
    parents: list[dict[str, Any]] | str = "seed" if init == "seed" else chosen
    job = expert_job(
        recipe, run_dir, domain, {"kind": "domain", "domain": domain},
        parents=parents, fresh_steps=fresh_steps(recipe, run_dir),
    )
    if init == "seed":
        seed = seed_dir(run_dir)
        require((seed / SEED_JSON).is_file(), "--init seed needs the run's seed (seed/seed.json)", run_dir)
        # start_step is 0 (fresh_steps), so the seed's weights come with a fresh AdamW and schedule
        branch_expert(expert_dir, job, from_seed=seed)
    else:
        branch_expert(expert_dir, job, from_experts=[(forest.expert_dir(p["name"]), p["weight"]) for p in chosen])
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
        train_pending(rec, [expert_dir], log)
        merge_once(forest, expert_dir)
    meta = read_expert(expert_dir)
    return {**meta, "grow": read_json(expert_dir / GROW_JSON, GROW_JSON)}
