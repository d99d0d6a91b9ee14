"""Scoring with a forest: the pieces `elmforest ensemble / average / eval / generate` and the
study runner share.

    check_forest_consistency  every expert shares the forest's tokenizer and architecture
    resolve_corpus            --corpus, else the corpus recorded in the experts' expert.json
    split_windows             a domain split's evaluation windows, spread over the whole split
    ExpertPool, Members       a forest's experts loaded on first use (top-k loads only k), plus the seed
    forest_prior, tuned_prior the cached prior of a domain as a record; `--mix auto` chooses the mixing settings
    ensemble_scores           perplexity of a domain-posterior ensemble on fixed windows

Every method is scored on the same windows: max_tokens // context windows drawn (seeded) from a
domain's whole split by `evaluate.spread_windows`, cut at the model's context length. Every
number starts from the members' log-probs on those windows (`logprobs.expert_logprobs`, in
batches of the pool's `batch_size`) and is a re-weighting of that table, exactly as the study
computes it: the cached prior (`prior.cached_prior`: `sequences` (100) valid windows, batches of
4, a moving average with alpha 0.3; `prior.PriorRecord` is its on-disk form), then the mixture
(`mixing.mixture_logprobs`). With the study's settings (`eval.*` of its recipe) `elmforest
ensemble` and `eval` give its results.json numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elmforest.data.corpus import Corpus
from elmforest.combine.ensemble import NO_MIXING, SEED_MEMBER, Mixing, check_posterior, normalise_prior, top_k_prior
from elmforest.combine.logprobs import EVAL_BATCH, Member, expert_logprobs, mean_nll
from elmforest.combine.mixing import TUNED_POSTERIOR, mixture_logprobs, tune_mixing
from elmforest.combine.prior import PriorRecord, cached_prior, ema_batches, updating_logprobs
from elmforest.errors import ElmError, require
from elmforest.combine.evaluate import EvalWindows, document_sums, spread_windows, window_seed
from elmforest.combine.forest import Forest, read_expert, read_json
from elmforest.data.tokenizer import load_tokenizer, tokenizer_hash
from elmforest.data.tokens import token_array

PRIOR_MODES = ("cached", "updating", "uniform")


# --- forests, models, corpora -------------------------------------------------------------


def model_context(config: Any) -> int:
    """Context length of a model config (a PretrainedConfig or config.json as a dict):
    GPT-2's n_positions or Llama's max_position_embeddings."""
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k, None)
    for key in ("n_positions", "max_position_embeddings"):
        value = get(key)
        if isinstance(value, int) and value > 0:
            return value
    raise ElmError("model config has neither n_positions nor max_position_embeddings")


def folder_context(model_dir: str | Path) -> int:
    """Context length from a model folder's config.json, without loading the weights."""
    path = Path(model_dir) / "config.json"
    config = read_json(path, "model config")
    try:
        return model_context(config)
    except ElmError as e:
        raise ElmError(str(e), path) from None


def check_forest_consistency(forest: Forest) -> dict[str, dict[str, Any]]:
    """Check every expert shares the forest's tokenizer and architecture -> {name: expert.json}.

    Compares forest.json's tokenizer_hash / arch_hash (and an adapter forest's base_sha256) with
    each expert.json and with the hash of the forest's tokenizer folder; a mismatch names the
    expert and its file. Experts trained with
    different tokenizers cannot be mixed token by token, nor averaged tensor by tensor.
    """
    jpath = forest.path / "forest.json"
    require(forest.experts, "the forest has no experts; merge some with `elmforest merge`", jpath)
    want_tok, want_arch = forest.data["tokenizer_hash"], forest.data["arch_hash"]
    have_tok = tokenizer_hash(forest.tokenizer_dir)
    require(
        have_tok == want_tok,
        f"tokenizer folder hashes to {have_tok} but forest.json records tokenizer_hash {want_tok}",
        forest.tokenizer_dir,
    )
    metas = {}
    for name in forest.names:
        meta = read_expert(forest.expert_dir(name))
        epath = forest.expert_dir(name) / "expert.json"
        require(
            meta["tokenizer_hash"] == want_tok,
            f"expert {name!r} has tokenizer_hash {meta['tokenizer_hash']} but the forest's is {want_tok}",
            epath,
        )
        require(
            meta["arch_hash"] == want_arch,
            f"expert {name!r} has arch_hash {meta['arch_hash']} but the forest's is {want_arch}",
            epath,
        )
        require(
            meta.get("base_sha256") == forest.base_sha256,
            f"expert {name!r} has base_sha256 {meta.get('base_sha256')} but the forest's is {forest.base_sha256}",
            epath,
        )
        metas[name] = meta
    return metas


def forest_context(forest: Forest) -> int:
    """The experts' context length (they share one architecture, so the first one's, or their base's)."""
    return folder_context(forest.config_dir)


def recorded_corpus(metas: Iterable[Mapping[str, Any]]) -> str | None:
    """The corpus recorded in expert.json's `recipe.corpus` (the first expert that records one)."""
    for meta in metas:
        recipe = meta.get("recipe")
        if isinstance(recipe, Mapping) and isinstance(recipe.get("corpus"), str) and recipe["corpus"]:
            return recipe["corpus"]
    return None


def resolve_corpus(corpus: str | Path | None, metas: Iterable[Mapping[str, Any]], where: str | Path) -> Corpus:
    """The corpus to score on: the one given, else the one the experts were trained on."""
    if corpus is None:
        corpus = recorded_corpus(metas)
        if corpus is None:
            raise ElmError("no --corpus given and no expert.json records recipe.corpus; pass --corpus", where)
    return Corpus(corpus)


def load_expert(forest: Forest, name: str) -> nn.Module:
    """One expert as a plain causal LM, checksums verified: a full expert's folder, or an adapter
    expert's LoRA merged into the forest's base (W = W0 + scale * B @ A, `models.adapters.merged_adapter_model`),
    so every scorer runs it like any model, as fast as one."""
    if forest.base_dir is None:
        from elmforest.models.factory import load_model  # transformers import: only when models are needed

        return load_model(forest.expert_dir(name))
    from elmforest.models.adapters import merged_adapter_model

    return merged_adapter_model(forest.base_dir, forest.expert_dir(name))


def load_experts(forest: Forest, names: Sequence[str] | None = None, device: str = "cpu") -> list[nn.Module]:
    """Load experts by name (all of them by default; `load_expert`), in eval mode on `device`."""
    return [load_expert(forest, n).to(device).eval() for n in (forest.names if names is None else names)]


class ExpertPool:
    """A forest's experts, each loaded on first use and then kept, and how they are scored.

    A top-k ensemble only touches k experts, so only k are ever loaded; `logprobs` scores experts
    without keeping the ones not yet loaded (one model in memory at a time), `batch_size` windows
    per forward pass (the study's `eval.batch_size` gives its numbers).
    """

    def __init__(self, forest: Forest, device: str = "cpu", batch_size: int = EVAL_BATCH):
        require(batch_size >= 1, f"batch size must be >= 1, got {batch_size}")
        self.forest = forest
        self.device = device
        self.batch_size = batch_size
        self._models: dict[str, nn.Module] = {}

    @property
    def names(self) -> list[str]:
        return self.forest.names

    def get(self, name: str) -> nn.Module:
        if name not in self._models:
            self._models[name] = load_experts(self.forest, [name], self.device)[0]
        return self._models[name]

    def models(self, names: Sequence[str] | None = None) -> list[nn.Module]:
        return [self.get(n) for n in (self.names if names is None else names)]

    def loader(self, name: str) -> Member:
        """The expert if loaded, else a function loading it (for `expert_logprobs`, which drops it after its pass)."""
        return self._models[name] if name in self._models else lambda: load_experts(self.forest, [name], self.device)[0]

    def logprobs(self, windows: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        """The experts' (all, or those named) log p(x_t | x_<t) on `windows` [N, T+1] -> float32 [k, N, T]."""
        return expert_logprobs([self.loader(n) for n in (self.names if names is None else names)], windows, self.batch_size)


# --- windows and priors -------------------------------------------------------------------


def split_windows(
    corpus: Corpus,
    tokenizer_dir: str | Path,
    domain: str,
    split: str,
    context: int,
    max_tokens: int | None,
    seed: int = 0,
) -> EvalWindows:
    """The evaluation windows of one domain's split, spread over the whole split (see
    `evaluate.spread_windows`): max_tokens // context windows (all of them when None), drawn with
    `window_seed(seed, domain, split)`, each predicted token labelled with its document."""
    corpus.require([domain])
    array = token_array(corpus, Path(tokenizer_dir), domain, split)
    count = None if max_tokens is None else max(1, int(max_tokens) // context)
    return spread_windows(array, context, count, window_seed(seed, domain, split), eos_id(tokenizer_dir))


def domain_windows(
    corpus: Corpus,
    tokenizer_dir: str | Path,
    domain: str,
    split: str,
    context: int,
    max_tokens: int | None,
    seed: int = 0,
) -> torch.Tensor:
    """The evaluation windows [N, context+1] of a split (`split_windows` without document labels)."""
    return split_windows(corpus, tokenizer_dir, domain, split, context, max_tokens, seed).tokens


def prior_windows(
    corpus: Corpus, tokenizer_dir: str | Path, domain: str, context: int, sequences: int, seed: int = 0
) -> torch.Tensor:
    """`sequences` validation windows of a domain spread over its valid split (fewer if it is short)."""
    require(sequences >= 1, f"prior sequences must be >= 1, got {sequences}")
    return domain_windows(corpus, tokenizer_dir, domain, "valid", context, sequences * context, seed)


@functools.lru_cache(maxsize=64)
def _eos_id(tokenizer_dir: str, stamp: str) -> int | None:
    eos = load_tokenizer(Path(tokenizer_dir)).eos_token_id
    return None if eos is None else int(eos)


def eos_id(tokenizer_dir: str | Path) -> int | None:
    """The tokenizer's end-of-text id (documents end with it in token arrays), cached by content."""
    return _eos_id(str(tokenizer_dir), tokenizer_hash(Path(tokenizer_dir)))


class Members:
    """The mixture's members: a forest's experts (loaded lazily) and, when mixing asks, its seed."""

    def __init__(self, pool: ExpertPool, seed_dir: str | Path | None = None):
        self.pool = pool
        self.seed_dir = Path(seed_dir) if seed_dir else None
        self._seed: nn.Module | None = None

    def names(self, with_seed: bool) -> list[str]:
        return [*self.pool.names, SEED_MEMBER] if with_seed else list(self.pool.names)

    def seed(self) -> nn.Module:
        from elmforest.models.factory import load_model

        require(self.seed_dir is not None, "mixing with the seed needs --seed-dir (or experts that record their seed_checkpoint)")
        if self._seed is None:
            self._seed = load_model(self.seed_dir).to(self.pool.device).eval()
        return self._seed

    def models(self, names: Sequence[str]) -> list[nn.Module]:
        return [self.seed() if n == SEED_MEMBER else self.pool.get(n) for n in names]

    def logprobs(self, windows: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """The named members' log-probs on `windows` -> [k, N, T] (experts not yet loaded one at a time)."""
        loaders = [self.seed if n == SEED_MEMBER else self.pool.loader(n) for n in names]
        return expert_logprobs(loaders, windows, self.pool.batch_size)


def recorded_seed_dir(metas: Iterable[Mapping[str, Any]]) -> Path | None:
    """The seed folder the experts record (`seed_checkpoint` in expert.json), if one exists."""
    for meta in metas:
        path = meta.get("seed_checkpoint")
        if isinstance(path, str) and (Path(path) / "config.json").is_file():
            return Path(path)
    return None


def forest_prior(
    pool: ExpertPool | Members,
    corpus: Corpus,
    domain: str,
    context: int,
    sequences: int = 100,
    batch: int = 4,
    alpha: float = 0.3,
    posterior: str = "one_step",
    window_seed: int = 0,
    mixing: Mixing = NO_MIXING,
) -> PriorRecord:
    """The cached prior of a forest's members (the experts, and the seed when `mixing.with_seed`)
    on `sequences` valid windows of `domain` spread over the split (`prior.cached_prior` on their
    log-probs) -> its record. posterior: the mode used inside the moving average; one that does
    not update ("prior", "uniform") falls back to "one_step", since it cannot move the prior."""
    members = pool if isinstance(pool, Members) else Members(pool)
    used = posterior if check_posterior(posterior).updates else "one_step"
    names = members.names(mixing.with_seed)
    windows = prior_windows(corpus, members.pool.forest.tokenizer_dir, domain, context, sequences, window_seed)
    prior = cached_prior(members.logprobs(windows, names), batch, alpha, used, mixing)
    return PriorRecord(domain, dict(zip(names, prior.tolist())), used, ema_batches(len(windows), batch), len(windows),
                       alpha, mixing.to_json())


def tuned_prior(
    members: Members,
    corpus: Corpus,
    domain: str,
    context: int,
    sequences: int = 100,
    batch: int = 4,
    alpha: float = 0.3,
    window_seed: int = 0,
) -> PriorRecord:
    """`--mix auto`: choose temperature, floor, decay and the seed on `domain`'s valid windows
    (`mixing.tune_mixing`, the same grid as the study's `btm_ensemble_tuned`) -> the prior record."""
    windows = prior_windows(corpus, members.pool.forest.tokenizer_dir, domain, context, sequences, window_seed)
    expert_lp = members.pool.logprobs(windows)
    seed_lp = members.logprobs(windows, [SEED_MEMBER])[0] if members.seed_dir is not None else None
    tuned = tune_mixing(list(members.pool.names), expert_lp, seed_lp, batch, alpha)
    return PriorRecord(domain, dict(zip(tuned.members, tuned.prior.tolist())), TUNED_POSTERIOR,
                       ema_batches(len(windows), batch), len(windows), alpha, tuned.mixing.to_json())


# --- ensemble scoring ---------------------------------------------------------------------


def ensemble_prior(names: Sequence[str], prior_mode: str, cached: PriorRecord | None, top_k: int | None) -> torch.Tensor:
    """The prior an ensemble runs with (float64 [n]): the cached one (top-k'd) or uniform."""
    if prior_mode not in PRIOR_MODES:
        raise ElmError(f"unknown prior {prior_mode!r}; choose one of {', '.join(PRIOR_MODES)}")
    if prior_mode != "cached":
        require(top_k is None, f"--top-k needs --prior cached (a {prior_mode} prior ranks no experts)")
        return normalise_prior(None, len(names))
    require(cached is not None, "a cached prior is needed (estimate one or pass --load-prior)")
    prior = cached.vector(names)
    return top_k_prior(prior, top_k) if top_k is not None else prior


def logprob_scores(logprobs: torch.Tensor, windows: EvalWindows | None = None, resamples: int = 1000) -> dict[str, Any]:
    """{"ppl", "nll", "tokens"} of a [N, T] table of log-probs (as `evaluate.perplexity`); with the
    windows' document labels also "documents" and "ppl_ci", a 95% bootstrap interval over documents."""
    nll = mean_nll(logprobs)
    out: dict[str, Any] = {"ppl": math.exp(nll), "nll": nll, "tokens": logprobs.numel()}
    if windows is not None:
        import numpy as np

        from elmforest.combine.bootstrap import Bootstrap, DomainDocs

        _, sums, tokens = document_sums(logprobs, windows.docs)
        docs = DomainDocs(np.array(tokens, dtype=np.float64), {"m": np.array([sums], dtype=np.float64)})
        out["documents"] = len(tokens)
        out["ppl_ci"] = Bootstrap({"d": docs}, {"all": ["d"]}, resamples).domain_ci("m", "d")
    return out


def ensemble_logprobs(
    members: Members | ExpertPool,
    windows: torch.Tensor,
    prior_mode: str = "cached",
    posterior: str = "one_step",
    cached: PriorRecord | None = None,
    top_k: int | None = None,
    prior_batch: int = 4,
    alpha: float = 0.3,
    mixing: Mixing = NO_MIXING,
) -> tuple[torch.Tensor, list[str]]:
    """The forest ensemble's log-probs on `windows` [N, T+1] -> ([N, T], names of the members run).

    cached: the record's prior (top-k keeps its k largest entries and runs only those members)
    updated per position by `posterior` with `mixing`. uniform: fixed 1/k weights (no per-token
    update: the study's btm_ensemble_uniform). updating: the moving-average prior carried across
    the test windows in batches of `prior_batch` (all members run). Members are the experts plus
    the seed when `mixing.with_seed`. The members' log-probs on the windows are computed once
    and re-weighted (`mixing.mixture_logprobs`), as the study does.
    """
    members = members if isinstance(members, Members) else Members(members)
    check_posterior(posterior)
    names = members.names(mixing.with_seed)
    if prior_mode == "updating":
        require(top_k is None, "--top-k needs --prior cached (an updating prior ranks no experts up front)")
        return updating_logprobs(members.logprobs(windows, names), prior_batch, alpha, posterior, mixing=mixing), names
    if prior_mode == "uniform":
        posterior = "uniform"  # fixed 1/k weights: the same meaning as the study's btm_ensemble_uniform
    prior = ensemble_prior(names, prior_mode, cached, top_k)
    used = [n for n, w in zip(names, prior.tolist()) if w > 0]
    return mixture_logprobs(members.logprobs(windows, used), prior[prior > 0], posterior, mixing), used


def ensemble_scores(
    pool: ExpertPool | Members,
    windows: torch.Tensor | EvalWindows,
    prior_mode: str = "cached",
    posterior: str = "one_step",
    cached: PriorRecord | None = None,
    top_k: int | None = None,
    prior_batch: int = 4,
    alpha: float = 0.3,
    mixing: Mixing = NO_MIXING,
) -> tuple[dict[str, Any], list[str]]:
    """Perplexity of the forest's ensemble (see `ensemble_logprobs`) -> (scores, members run);
    with EvalWindows the scores carry the documents and a 95% interval over them."""
    tokens = windows.tokens if isinstance(windows, EvalWindows) else windows
    lp, used = ensemble_logprobs(pool, tokens, prior_mode, posterior, cached, top_k, prior_batch, alpha, mixing)
    return logprob_scores(lp, windows if isinstance(windows, EvalWindows) else None), used


def model_scores(model: nn.Module, windows: torch.Tensor | EvalWindows, batch_size: int = EVAL_BATCH) -> dict[str, Any]:
    """Perplexity of one causal LM on `windows` (the same log-probs as an expert's in an ensemble)."""
    tokens = windows.tokens if isinstance(windows, EvalWindows) else windows
    lp = expert_logprobs([model], tokens, batch_size)[0]
    return logprob_scores(lp, windows if isinstance(windows, EvalWindows) else None)
