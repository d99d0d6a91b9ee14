"""Scoring with a forest: the pieces `elmforest ensemble / average / eval / generate` and the
study runner share.

    check_forest_consistency  every expert shares the forest's tokenizer and architecture
    resolve_corpus            --corpus, else the corpus recorded in the experts' expert.json
    split_windows             a domain split's evaluation windows, spread over the whole split
    estimate_prior            the cached prior over experts from a domain's valid windows
    ExpertPool, Members       a forest's experts loaded on first use (top-k loads only k), plus the seed
    forest_prior, tuned_prior the cached prior as a record; `--mix auto` chooses the mixing settings
    ensemble_scores           perplexity of a domain-posterior ensemble on fixed windows

Every method is scored on the same windows: max_tokens // context windows drawn (seeded) from a
domain's whole split by `evaluate.spread_windows`, cut at the model's context length. The cached
prior follows the reference code: `sequences` (100) valid windows, batches of 4, an exponential
moving average with alpha 0.3 (see `ensemble.cached_prior`); `PriorRecord` is its on-disk form

    {"domain", "experts": {member: weight}, "posterior", "batches", "windows", "alpha",
     "mixing": {"temperature", "floor", "decay", "with_seed"}}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elmforest import storage
from elmforest.data.corpus import Corpus
from elmforest.combine.ensemble import (
    NO_MIXING,
    Ensemble,
    Mixing,
    cached_prior,
    check_posterior,
    normalise_prior,
    top_k_prior,
    updating_logprobs,
)
from elmforest.combine.mixing import SEED_MEMBER, TUNED_POSTERIOR, ema_prior, tune_mixing
from elmforest.errors import ElmError, require
from elmforest.combine.evaluate import EvalWindows, document_sums, perplexity, spread_windows, token_logprobs, window_seed
from elmforest.combine.forest import Forest, read_expert, read_json
from elmforest.data.tokenizer import load_tokenizer, tokenizer_hash
from elmforest.data.tokens import token_array

PRIOR_MODES = ("cached", "updating", "uniform")
EVAL_BATCH = 8  # windows per forward pass when scoring; the same everywhere so numbers match


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

    Compares forest.json's tokenizer_hash / arch_hash with each expert.json and with the hash of
    the forest's tokenizer folder; a mismatch names the expert and its file. Experts trained with
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
        metas[name] = meta
    return metas


def forest_context(forest: Forest) -> int:
    """The experts' context length (they share one architecture, so the first one's)."""
    return folder_context(forest.expert_dir(forest.names[0]))


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


def load_experts(forest: Forest, names: Sequence[str] | None = None, device: str = "cpu") -> list[nn.Module]:
    """Load experts by name (all of them by default), checksums verified, in eval mode on `device`."""
    from elmforest.models.factory import load_model  # transformers import: only when models are needed

    return [load_model(forest.expert_dir(n)).to(device).eval() for n in (forest.names if names is None else names)]


class ExpertPool:
    """A forest's experts, each loaded on first use and then kept.

    A top-k ensemble only touches k experts, so only k are ever loaded; `logprobs` scores every
    expert without keeping the ones not yet loaded (one model in memory at a time).
    """

    def __init__(self, forest: Forest, device: str = "cpu"):
        self.forest = forest
        self.device = device
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

    def logprobs(self, windows: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
        """Every expert's log p(x_t | x_<t) on `windows` [N, T+1] -> float32 [n, N, T] (CPU)."""
        rows = []
        for name in self.names:
            model = self._models[name] if name in self._models else load_experts(self.forest, [name], self.device)[0]
            rows.append(
                torch.cat([token_logprobs(model, windows[s : s + batch_size]) for s in range(0, len(windows), batch_size)])
            )
            del model
        return torch.stack(rows)


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


ExpertsLike = Sequence[nn.Module] | Callable[[torch.Tensor], torch.Tensor] | ExpertPool


def _window_table(experts: ExpertsLike, windows: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """(a log-prob function, the windows to walk): an ExpertPool is scored once, one expert at a time,
    and `cached_prior` then walks window indices into that table, so it sees exactly the same batches."""
    if isinstance(experts, ExpertPool):
        table = experts.logprobs(windows)  # [n, N, T], each expert run once over all windows
        return (lambda idx: table[:, idx[:, 0]]), torch.arange(len(windows)).unsqueeze(1)
    return experts, windows


def estimate_prior(
    experts: ExpertsLike,
    corpus: Corpus,
    tokenizer_dir: str | Path,
    domain: str,
    context: int,
    sequences: int = 100,
    batch: int = 4,
    alpha: float = 0.3,
    posterior: str = "one_step",
    window_seed: int = 0,
    mixing: Mixing = NO_MIXING,
) -> tuple[torch.Tensor, int, int]:
    """The cached prior over experts for `domain` -> (prior float64 [n], EMA batches, windows).

    experts: models, a log-prob function tokens [B, T+1] -> [n, B, T], or an ExpertPool (scored
    one expert at a time, so memory holds one model, not n). posterior: the mode used inside the
    moving average; one that does not update ("prior", "uniform") falls back to "one_step", since
    it cannot move the prior. The windows are `sequences` valid windows spread over the split.
    """
    if not check_posterior(posterior).updates:
        posterior = "one_step"
    windows = prior_windows(corpus, tokenizer_dir, domain, context, sequences, window_seed)
    fn, walk = _window_table(experts, windows)
    prior = cached_prior(fn, walk, batch_size=batch, alpha=alpha, posterior=posterior, mixing=mixing)
    return prior, math.ceil(len(windows) / batch), len(windows)


@dataclass
class PriorRecord:
    """A cached prior as saved by `--save-prior`: weights by member name plus how it was made.

    Members are the forest's experts, and `seed` when the mixing lets the seed join; `mixing`
    holds the temperature, floor, decay and with_seed the prior was estimated (and is to be used) with.
    """

    domain: str
    experts: dict[str, float]
    posterior: str
    batches: int
    windows: int
    alpha: float = 0.3
    mixing: dict[str, Any] | None = None

    def vector(self, names: Sequence[str]) -> torch.Tensor:
        """The prior in `names` order (members the record does not name get 0), normalised."""
        return normalise_prior([self.experts.get(n, 0.0) for n in names], len(names))

    @property
    def mix(self) -> Mixing:
        return Mixing.from_json(self.mixing)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "experts": dict(self.experts),
            "posterior": self.posterior,
            "batches": self.batches,
            "windows": self.windows,
            "alpha": self.alpha,
            "mixing": self.mix.to_json(),
        }


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

    def logprobs(self, windows: torch.Tensor, with_seed: bool) -> torch.Tensor:
        """[members, N, T] on `windows`: every expert (one at a time), then the seed."""
        lp = self.pool.logprobs(windows)
        if not with_seed:
            return lp
        seed = self.seed()
        rows = [token_logprobs(seed, windows[s : s + EVAL_BATCH]) for s in range(0, len(windows), EVAL_BATCH)]
        return torch.cat([lp, torch.cat(rows).cpu().unsqueeze(0)])


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
    """Estimate the cached prior of a forest's members on `domain` (see `estimate_prior`)."""
    members = pool if isinstance(pool, Members) else Members(pool)
    used = posterior if check_posterior(posterior).updates else "one_step"
    names = members.names(mixing.with_seed)
    windows = prior_windows(corpus, members.pool.forest.tokenizer_dir, domain, context, sequences, window_seed)
    table = members.logprobs(windows, mixing.with_seed)
    prior = ema_prior(table, batch, alpha, used, mixing)
    return PriorRecord(domain, dict(zip(names, prior.tolist())), used, math.ceil(len(windows) / batch), len(windows),
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
    seed_lp = members.logprobs(windows, True)[-1] if members.seed_dir is not None else None
    tuned = tune_mixing(list(members.pool.names), expert_lp, seed_lp, batch, alpha)
    return PriorRecord(domain, dict(zip(tuned.members, tuned.prior.tolist())), TUNED_POSTERIOR,
                       math.ceil(len(windows) / batch), len(windows), alpha, tuned.mixing.to_json())


def save_prior(path: str | Path, record: PriorRecord) -> None:
    """Write a prior record as JSON (atomically)."""
    storage.write_json(path, record.to_json())


def load_prior(path: str | Path, names: Sequence[str]) -> PriorRecord:
    """Read a prior record; every member it names must be one of `names` (the forest's) or the seed."""
    path = Path(path)
    data = read_json(path, "prior file")
    experts = data.get("experts")
    require(isinstance(experts, dict) and experts, "field 'experts' must be a non-empty {name: weight} object", path)
    unknown = [k for k in experts if k not in names and k != SEED_MEMBER]
    require(not unknown, f"unknown expert(s) {', '.join(map(repr, unknown))}; the forest has {', '.join(names)}", path)
    for k, w in experts.items():
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        require(ok, f"experts.{k} must be a non-negative number, got {w!r}", path)
    require(sum(experts.values()) > 0, "field 'experts' has all-zero weights", path)
    mixing = data.get("mixing")
    require(mixing is None or isinstance(mixing, dict), "field 'mixing' must be an object", path)
    try:
        mix = Mixing.from_json(mixing)
    except (ElmError, TypeError, ValueError) as e:
        raise ElmError(f"field 'mixing': {getattr(e, 'detail', e)}", path) from None
    require(mix.with_seed == (SEED_MEMBER in experts), "field 'mixing.with_seed' disagrees with a 'seed' entry in 'experts'", path)
    return PriorRecord(
        domain=str(data.get("domain", "")),
        experts={k: float(v) for k, v in experts.items()},
        posterior=str(data.get("posterior", "")),
        batches=int(data.get("batches", 0)),
        windows=int(data.get("windows", 0)),
        alpha=float(data.get("alpha", 0.3)),
        mixing=mix.to_json(),
    )


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
    nll = -float(logprobs.double().sum()) / logprobs.numel()
    out: dict[str, Any] = {"ppl": math.exp(nll), "nll": nll, "tokens": logprobs.numel()}
    if windows is not None:
        import numpy as np

        from elmforest.combine.bootstrap import Bootstrap, DomainDocs

        _, sums, tokens = document_sums(logprobs, windows.docs)
        docs = DomainDocs(np.array(tokens, dtype=np.float64), {"m": np.array([sums], dtype=np.float64)})
        out["documents"] = len(tokens)
        out["ppl_ci"] = Bootstrap({"d": docs}, {"all": ["d"]}, resamples).domain_ci("m", "d")
    return out


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(windows[s : s + EVAL_BATCH]).cpu() for s in range(0, len(windows), EVAL_BATCH)])


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
    the seed when `mixing.with_seed`.
    """
    members = members if isinstance(members, Members) else Members(members)
    check_posterior(posterior)
    names = members.names(mixing.with_seed)
    if prior_mode == "updating":
        require(top_k is None, "--top-k needs --prior cached (an updating prior ranks no experts up front)")
        lp = updating_logprobs(members.models(names), windows, batch_size=prior_batch, alpha=alpha,
                               posterior=posterior, mixing=mixing)
        return lp, names
    if prior_mode == "uniform":
        posterior = "uniform"  # fixed 1/k weights: the same meaning as the study's btm_ensemble_uniform
    prior = ensemble_prior(names, prior_mode, cached, top_k)
    used = [n for n, w in zip(names, prior.tolist()) if w > 0]
    ens = Ensemble(members.models(used), prior[prior > 0], posterior, mixing)
    return _batched(ens.logprobs, windows), used


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


def model_scores(model: nn.Module, windows: torch.Tensor | EvalWindows) -> dict[str, Any]:
    """Perplexity of one causal LM on `windows` (same batching as the ensemble)."""
    if isinstance(windows, EvalWindows):
        return logprob_scores(_batched(lambda t: token_logprobs(model, t), windows.tokens), windows)
    return perplexity(model, windows, EVAL_BATCH)
