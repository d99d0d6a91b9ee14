"""Removal: a domain leaves the model when its expert does (`elmforest forget`).

BTM's experts share no parameters after branching, so removing a domain's expert removes what
the forest learned from that domain's data (and nothing else). `removal_study` shows it: on a
copy of the forest without the expert, the cached-prior ensemble's perplexity on that domain
rises towards a novel domain's level, while the other domains barely move.

    RUN/forget_<domain>/forest/           the copy without the domain's expert(s)
    RUN/forget_<domain>.json              perplexity before and after, per domain, and the new priors
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elmforest.btm.seed import model_context

from elmforest import storage
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError, require
from elmforest.combine.forest import Forest
from elmforest.study.forest_eval import forest_scores
from elmforest.combine.evaluate import geo_mean
from elmforest.study.rounds import round_dir
from elmforest.combine.scoring import domain_windows, load_experts


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
    recipe: Recipe, run_dir: Path, domain: str, forest_dir: Path | None = None, log: Callable[[str], Any] = print
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
    context = model_context(recipe, run_dir / "tokenizer")
    e = recipe.eval
    others = [x.domain for x in before.experts if x.name not in owner]
    domains = [domain, *[d for d in others if d in corpus.domains], *[d for d in recipe.novel_domains if d not in others]]
    m_before, m_after = load_experts(before), load_experts(after)
    table: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    priors: dict[str, dict[str, float]] = {}
    for d in domains:
        log(f"forget {domain}: evaluating {d}")
        test = domain_windows(corpus, tok, d, "test", context, e.max_tokens_per_domain, e.window_seed)
        valid = domain_windows(corpus, tok, d, "valid", context, e.prior_sequences * context, e.window_seed)
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
    from elmforest.study.report import fmt_change, fmt_ppl

    dom = result["domains"]
    roles = {result["removed"]: "removed", **{d: "kept" for d in dom["kept"]}, **{d: "novel" for d in dom["novel"]}}
    rows = [("domain", "role", "ppl before", "ppl after", "change")]
    for d, role in roles.items():
        b, a = result["ppl"]["before"][d], result["ppl"]["after"][d]
        rows.append((d, role, fmt_ppl(b), fmt_ppl(a), fmt_change(a, b)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    if result.get("novel_mean_before"):
        lines.append(f"novel domains' mean perplexity (before): {fmt_ppl(result['novel_mean_before'])}")
    return "\n".join(lines)
