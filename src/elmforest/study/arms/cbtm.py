"""c-BTM at several cluster counts: how the forest's gain moves with the number of experts.

    cbtm_k<k>   one arm per arms.cluster_counts entry k:
                RUN/cbtm/k<k>/corpus            the train domains' pooled documents in k clusters, as
                                                `elmforest corpus cluster` makes them (tf-idf, SVD, L2,
                                                k-means balanced by UTF-8 bytes; `cbtm.cluster`); cached
                RUN/cbtm/k<k>/experts/cluster<j> -> RUN/cbtm/k<k>/forest
                                                k experts branched from the run's seed, each at 1/k of the
                                                dense batch for the remaining steps (compute-matched)
                RUN/cbtm/k<k>/router.json       the routing temperatures chosen on validation windows

Each k's forest is scored on the study's test windows of every train and novel domain, like every
method, two ways (rows of results.json):

    cbtm_k<k>_cached        the cached prior per evaluation domain (BTM's inference; all k experts run)
    cbtm_k<k>_router_top1   c-BTM's own inference: each window weighted by its context's distance to
    cbtm_k<k>_router_top2   the cluster centres, w = softmax(-|z - c|^2 / T), top-1, top-2 or all
    cbtm_k<k>_router        experts (`cbtm.cluster_router`); T is chosen per k and per top setting from
                            arms.cluster_temperatures on the train domains' validation windows (the
                            cached prior's), pooled: the router never sees a domain label, nor test data

k = 1 is the dense arm; the metadata forest (btm, one expert per train domain) stands beside.
results.json["cluster_sweep"] gathers, per k, the rows, the experts each runs per token, the chosen
temperatures, the clustering's adjusted Rand index and, with arms.dense_multiples, compute_to_match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator

from elmforest import storage
from elmforest.btm import seed as seeding
from elmforest.cbtm.balanced_kmeans import squared_distances
from elmforest.cbtm.cluster import CLUSTER_JSON, ClusterModel, cluster_corpus
from elmforest.cbtm.cluster_router import choose_temperature, routed_logprobs, routing_weights, window_texts
from elmforest.combine.bootstrap import compute_to_match
from elmforest.combine.forest import read_json
from elmforest.combine.logprobs import expert_logprobs
from elmforest.combine.scoring import split_windows
from elmforest.data.corpus import MANIFEST, Corpus
from elmforest.data.tokenizer import load_tokenizer
from elmforest.data.tokens import token_array
from elmforest.errors import ElmError, require
from elmforest.study.arms.base import ArmFields, StageContext
from elmforest.study.arms.dense import dense_multiples
from elmforest.study.arms.forests import ForestArm, train_forest
from elmforest.study.methods import StudyMethod, cached_score

ROUTER_JSON = "router.json"
TOPS = {"router_top1": 1, "router_top2": 2, "router": None}  # row suffix -> experts kept per window (None: all)


class ClusterFields(ArmFields):
    cluster_counts: list[int] = Field(
        default_factory=list,
        description="A c-BTM sweep: one forest per count k, its experts trained on k clusters of the train domains' "
        "pooled documents at 1/k of the dense batch each (rows cbtm_k<k>_*; budget.batch_tokens must split into k).",
    )
    cluster_temperatures: list[float] = Field(
        default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0],
        description="Routing temperatures the c-BTM router chooses from on validation windows (c-BTM evaluates at 0.1).",
    )

    @field_validator("cluster_counts")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if any(k < 2 for k in v):
            raise ValueError("each cluster count must be at least 2 (k = 1 is the dense arm)")
        if len(set(v)) != len(v):
            raise ValueError("duplicate cluster count")
        return sorted(v)

    @field_validator("cluster_temperatures")
    @classmethod
    def _temperatures(cls, v: list[float]) -> list[float]:
        if not v or any(not t > 0 for t in v):
            raise ValueError("give at least one temperature, each > 0")
        return v


def cluster_count(name: str) -> int:
    return int(name.removeprefix("cbtm_k"))


def cluster_home(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / "cbtm" / f"k{k}"


def cluster_names(k: int) -> list[str]:
    return [f"cluster{j}" for j in range(k)]


def row_name(k: int, inference: str) -> str:
    return f"cbtm_k{k}_{inference}"


def inferences(k: int) -> list[str]:
    """The rows of one k: the cached prior, then the router keeping 1, 2 (when k > 2) and all experts."""
    return ["cached", *[s for s, top in TOPS.items() if top is None or top < k]]


def experts_per_token(k: int, inference: str) -> int:
    return k if inference == "cached" else TOPS[inference] or k


def cluster_recipe(recipe: Any, run_dir: Path, k: int) -> Any:
    """The recipe the k experts are made from: the clustered corpus, its k clusters as the domains
    (so each expert gets 1/k of the dense batch), everything else the study's."""
    return recipe.model_copy(update={"corpus": str(cluster_home(run_dir, k) / "corpus"), "train_domains": cluster_names(k)})


class ClusterArm(ForestArm):
    """A family: one c-BTM forest per arms.cluster_counts entry."""

    name = "cbtm_k<k>"
    fields = ClusterFields

    def instances(self, recipe: Any) -> list[str]:
        return [f"cbtm_k{k}" for k in recipe.arms.cluster_counts]

    def validate(self, recipe: Any) -> None:
        for k in recipe.arms.cluster_counts:
            if recipe.budget.batch_tokens % k:
                raise ValueError(f"arms.cluster_counts: k={k} experts at 1/k of the batch need budget.batch_tokens="
                                 f"{recipe.budget.batch_tokens} to be a multiple of k (of k x context, in fact)")

    def folder(self, run_dir: Path, name: str) -> Path:
        return cluster_home(run_dir, cluster_count(name)) / "forest"

    def seed_folder(self, run_dir: Path, name: str) -> Path:
        return seeding.seed_dir(Path(run_dir))

    def stage(self, name: str) -> str:
        return f"cbtm_k{cluster_count(name)}"

    def announce(self, recipe: Any, name: str) -> str:
        k = cluster_count(name)
        return f"[5/9] c-BTM forest: {k} clusters of the train documents, {k} experts at 1/{k} of the batch"

    def train(self, ctx: StageContext, name: str) -> None:
        k = cluster_count(name)
        home, recipe = cluster_home(ctx.out, k), ctx.recipe
        b = recipe.budget.batch_tokens
        require(b % (k * ctx.context) == 0, f"arms.cluster_counts: k={k} experts at 1/k of the batch need "
                f"budget.batch_tokens={b} to be a multiple of k x context = {k} x {ctx.context}")
        corpus_dir = home / "corpus"
        if not (corpus_dir / MANIFEST).is_file():
            ctx.log(f"clustering the train domains' documents into {k} clusters -> {corpus_dir}")
            cluster_corpus(ctx.corpus, list(recipe.train_domains), k, corpus_dir, seed=recipe.optim.seed)
        clustered = Corpus(corpus_dir)
        for c in cluster_names(k):  # tokenise once here, not in every expert's worker
            for split in ("train", "valid"):
                if clustered.documents(c, split) != 0:  # a cluster may get no valid document
                    token_array(clustered, ctx.tokenizer, c, split)
        sub = cluster_recipe(recipe, ctx.out, k)
        jobs = [(c, {"kind": "domain", "domain": c}) for c in cluster_names(k)]
        train_forest(ctx, sub, jobs, home, "experts", "forest", seed=seeding.seed_dir(ctx.out))

    def provide(self, models: Any, name: str) -> None:
        super().provide(models, name)
        if name in models.forests:
            clusterer = ClusterModel.load(cluster_home(models.run_dir, cluster_count(name)) / "corpus" / "clusterer")
            index = [int(n.removeprefix("cluster")) for n in models.forests[name][0]]
            models.extras[name] = {"clusterer": clusterer, "index": index}

    def methods(self, recipe: Any, name: str) -> list[StudyMethod]:
        k = cluster_count(name)
        out = []
        for inf in inferences(k):
            score = cached_score(name) if inf == "cached" else router_score(name, TOPS[inf])
            n = experts_per_token(k, inf)
            what = "its cached prior per domain" if inf == "cached" else (
                f"c-BTM's router (context distance to the centres, {'all' if TOPS[inf] is None else f'top-{n}'}"
                " experts, temperature chosen on validation windows)")
            out.append(StudyMethod(row_name(k, inf), name, f"c-BTM with {k} cluster experts mixed by {what}",
                                   score, lambda s, n=n: s.model * n))
        return out

    def summarize(self, recipe: Any, run_dir: Path, boot: Any, results: dict[str, Any]) -> dict[str, Any]:
        return {"cluster_sweep": sweep_section(recipe, Path(run_dir), boot, results)}

    def report(self, results: dict[str, Any], plots: Path) -> list[str]:
        from elmforest.study.cluster_sweep import sweep_report

        return sweep_report(results, plots)


# ----------------------------------------------------------------------------- routing


def routing_text(models: Any, domain: str, split: str, starts: torch.Tensor) -> list[str]:
    tokenizer = models.extras.setdefault("tokenizer", load_tokenizer(models.tok))
    return window_texts(tokenizer, token_array(models.corpus, models.tok, domain, split), starts.tolist(), models.context)


def distances(models: Any, arm: str, texts: list[str]) -> Any:
    """[N, n] squared distances of the texts to the centres of the forest's experts (forest order)."""
    own = models.extras[arm]
    return squared_distances(own["clusterer"].transform(texts), own["clusterer"].centres)[:, own["index"]]


def chosen_temperatures(models: Any, arm: str) -> dict[str, Any]:
    """{row suffix: {"temperature": T, "valid_nll": {T: NLL}}}: the temperature of each top setting
    with the lowest routed NLL on the train domains' validation windows (the cached prior's),
    pooled; cached in RUN/cbtm/k<k>/router.json and recomputed when its settings differ."""
    own = models.extras[arm]
    if "chosen" in own:
        return own["chosen"]
    recipe, e = models.recipe, models.recipe.eval
    k = cluster_count(arm)
    path = cluster_home(models.run_dir, k) / ROUTER_JSON
    settings = {"temperatures": list(recipe.arms.cluster_temperatures), "domains": list(recipe.train_domains),
                "prior_sequences": e.prior_sequences, "window_seed": e.window_seed, "experts": models.forests[arm][0]}
    cached = read_json(path, ROUTER_JSON) if path.is_file() else None
    if cached is None or cached.get("settings") != settings:
        lps, d2s = [], []
        for d in recipe.train_domains:
            windows = split_windows(models.corpus, models.tok, d, "valid", models.context,
                                    e.prior_sequences * models.context, e.window_seed)
            lps.append(expert_logprobs(models.forests[arm][1], windows.tokens, e.batch_size, models.device))
            d2s.append(distances(models, arm, routing_text(models, d, "valid", windows.starts)))
        lp, d2 = torch.cat(lps, dim=1), np.concatenate(d2s)
        chosen = {}
        for suffix in inferences(k)[1:]:
            t, nll = choose_temperature(lp, d2, settings["temperatures"], TOPS[suffix])
            chosen[suffix] = {"temperature": t, "valid_nll": {f"{x:g}": v for x, v in nll.items()}}
        cached = {"settings": settings, "valid_windows": int(lp.shape[1]), "chosen": chosen}
        storage.write_json(path, cached)
    own["chosen"] = cached["chosen"]
    return own["chosen"]


def router_score(arm: str, top_k: int | None):
    suffix = next(s for s, t in TOPS.items() if t == top_k)

    def score(ev: Any) -> torch.Tensor:
        models = ev.models
        if arm not in models.extras:
            raise ElmError(f"study method needs the {arm!r} forest and its clusterer, which this run does not have",
                           models.run_dir)
        t = chosen_temperatures(models, arm)[suffix]["temperature"]
        d2 = distances(models, arm, routing_text(models, ev.domain, "test", ev.test.starts))
        return routed_logprobs(ev.forest_lp(arm), routing_weights(d2, t, top_k))

    return score


# ----------------------------------------------------------------------------- results.json


def sweep_section(recipe: Any, run_dir: Path, boot: Any, results: dict[str, Any]) -> dict[str, Any]:
    """results.json["cluster_sweep"]: per k, its rows, experts run per token, the chosen temperatures,
    the clustering's adjusted Rand index and compute_to_match of every row (with dense multiples)."""
    multiples = dense_multiples(recipe)
    dense = {1.0: "dense", **{m: name for name, m in multiples.items()}} if multiples else None
    parts = [p for p in ("train", "novel") if (recipe.train_domains if p == "train" else recipe.novel_domains)]
    per_k: dict[str, Any] = {}
    for k in recipe.arms.cluster_counts:
        home = cluster_home(run_dir, k)
        if not (home / ROUTER_JSON).is_file():
            continue
        rows = {inf: row_name(k, inf) for inf in inferences(k) if row_name(k, inf) in results}
        entry: dict[str, Any] = {
            "rows": rows,
            "experts_per_token": {inf: experts_per_token(k, inf) for inf in rows},
            "temperature": {s: c["temperature"] for s, c in read_json(home / ROUTER_JSON, ROUTER_JSON)["chosen"].items()},
            "adjusted_rand_index": read_json(home / "corpus" / CLUSTER_JSON, CLUSTER_JSON).get("adjusted_rand_index"),
        }
        if dense is not None:
            entry["compute_to_match"] = {inf: {p: compute_to_match(boot, row, dense, p) for p in parts}
                                         for inf, row in rows.items()}
        per_k[str(k)] = entry
    return {"counts": list(recipe.arms.cluster_counts), "k": per_k,
            "references": {"dense": "dense", "metadata_forest": "btm_ensemble_cached",
                           "metadata_experts": len(recipe.train_domains)}}


__all__ = ["ClusterArm", "ClusterFields", "cluster_recipe", "row_name"]
