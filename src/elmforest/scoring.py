"""Scoring with a forest: the pieces `elmforest ensemble / average / eval / generate` and the
study runner share.

    check_forest_consistency  every expert shares the forest's tokenizer and architecture
    resolve_corpus            --corpus, else the corpus recorded in the experts' expert.json
    domain_windows            the fixed evaluation windows of one domain's split
    estimate_prior            the cached prior over experts from a domain's first valid windows
    ExpertPool                a forest's experts, loaded on first use (so top-k loads only k)
    ensemble_scores           perplexity of a domain-posterior ensemble on fixed windows

Every method is scored on the same windows: the first `max_tokens` tokens of a domain's split,
cut by `evaluate.eval_windows` at the model's context length. The cached prior follows the
reference code: the first `sequences` (100) valid windows, batches of 4, an exponential moving
average with alpha 0.3 (see `ensemble.cached_prior`); `PriorRecord` is its on-disk form

    {"domain", "experts": {name: weight}, "posterior", "batches", "windows", "alpha"}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elmforest import storage
from elmforest.corpus import Corpus
from elmforest.ensemble import Ensemble, cached_prior, check_posterior, normalise_prior, top_k_prior, updating_logprobs
from elmforest.errors import ElmError, require
from elmforest.evaluate import eval_windows, perplexity, token_logprobs
from elmforest.forest import Forest, read_expert, read_json
from elmforest.tokenizer import tokenizer_hash
from elmforest.tokens import token_array

PRIOR_MODES = ("cached", "updating", "uniform")
# Posteriors that update on the text; a cached prior is always estimated with one of them (the
# "prior" and "uniform" modes never move away from their start, so they would estimate nothing).
UPDATING_POSTERIORS = ("one_step", "full_prefix")
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
    from elmforest.models import load_model  # transformers import: only when models are needed

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


def domain_windows(
    corpus: Corpus, tokenizer_dir: str | Path, domain: str, split: str, context: int, max_tokens: int | None
) -> torch.Tensor:
    """The evaluation windows [N, context+1] over the first `max_tokens` tokens of a split."""
    corpus.require([domain])
    return eval_windows(token_array(corpus, Path(tokenizer_dir), domain, split), context, max_tokens)


def prior_windows(corpus: Corpus, tokenizer_dir: str | Path, domain: str, context: int, sequences: int) -> torch.Tensor:
    """The first `sequences` validation windows of a domain (fewer if the split is short)."""
    require(sequences >= 1, f"prior sequences must be >= 1, got {sequences}")
    # sequences windows of context tokens overlap by one: sequences * context + 1 tokens
    return domain_windows(corpus, tokenizer_dir, domain, "valid", context, sequences * context + 1)[:sequences]


ExpertsLike = Sequence[nn.Module] | Callable[[torch.Tensor], torch.Tensor] | ExpertPool


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
) -> tuple[torch.Tensor, int, int]:
    """The cached prior over experts for `domain` -> (prior float64 [n], EMA batches, windows).

    experts: models, a log-prob function tokens [B, T+1] -> [n, B, T], or an ExpertPool (scored
    one expert at a time, so memory holds one model, not n). posterior: the mode used inside the
    moving average; "prior"/"uniform" fall back to "one_step", since they cannot move the prior.
    """
    check_posterior(posterior)
    if posterior not in UPDATING_POSTERIORS:
        posterior = "one_step"
    windows = prior_windows(corpus, tokenizer_dir, domain, context, sequences)
    if isinstance(experts, ExpertPool):
        table = experts.logprobs(windows)  # [n, N, T], each expert run once over all windows
        # cached_prior walks its input in batches; give it window indices [N, 1] and look the
        # precomputed log-probs up, so the moving average sees exactly the same batches.
        experts_fn: Any = lambda idx: table[:, idx[:, 0]]  # noqa: E731
        walk = torch.arange(len(windows)).unsqueeze(1)
    else:
        experts_fn, walk = experts, windows
    prior = cached_prior(experts_fn, walk, batch_size=batch, alpha=alpha, posterior=posterior)
    return prior, math.ceil(len(windows) / batch), len(windows)


@dataclass
class PriorRecord:
    """A cached prior as saved by `--save-prior`: weights by expert name plus how it was made."""

    domain: str
    experts: dict[str, float]
    posterior: str
    batches: int
    windows: int
    alpha: float = 0.3

    def vector(self, names: Sequence[str]) -> torch.Tensor:
        """The prior in `names` order (experts the record does not name get 0), normalised."""
        return normalise_prior([self.experts.get(n, 0.0) for n in names], len(names))

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "experts": dict(self.experts),
            "posterior": self.posterior,
            "batches": self.batches,
            "windows": self.windows,
            "alpha": self.alpha,
        }


def forest_prior(
    pool: ExpertPool,
    corpus: Corpus,
    domain: str,
    context: int,
    sequences: int = 100,
    batch: int = 4,
    alpha: float = 0.3,
    posterior: str = "one_step",
) -> PriorRecord:
    """Estimate the cached prior of a forest's experts on `domain` (see `estimate_prior`)."""
    prior, batches, windows = estimate_prior(
        pool, corpus, pool.forest.tokenizer_dir, domain, context, sequences, batch, alpha, posterior
    )
    used = posterior if posterior in UPDATING_POSTERIORS else "one_step"
    return PriorRecord(domain, dict(zip(pool.names, prior.tolist())), used, batches, windows, alpha)


def save_prior(path: str | Path, record: PriorRecord) -> None:
    """Write a prior record as JSON (atomically)."""
    storage.write_json(path, record.to_json())


def load_prior(path: str | Path, names: Sequence[str]) -> PriorRecord:
    """Read a prior record; every expert it names must be one of `names` (the forest's)."""
    path = Path(path)
    data = read_json(path, "prior file")
    experts = data.get("experts")
    require(isinstance(experts, dict) and experts, "field 'experts' must be a non-empty {name: weight} object", path)
    unknown = [k for k in experts if k not in names]
    require(not unknown, f"unknown expert(s) {', '.join(map(repr, unknown))}; the forest has {', '.join(names)}", path)
    for k, w in experts.items():
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        require(ok, f"experts.{k} must be a non-negative number, got {w!r}", path)
    require(sum(experts.values()) > 0, "field 'experts' has all-zero weights", path)
    return PriorRecord(
        domain=str(data.get("domain", "")),
        experts={k: float(v) for k, v in experts.items()},
        posterior=str(data.get("posterior", "")),
        batches=int(data.get("batches", 0)),
        windows=int(data.get("windows", 0)),
        alpha=float(data.get("alpha", 0.3)),
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


def logprob_scores(logprobs: torch.Tensor) -> dict[str, float]:
    """{"ppl", "nll", "tokens"} of a [N, T] table of log-probs (as `evaluate.perplexity`)."""
    nll = -float(logprobs.double().sum()) / logprobs.numel()
    return {"ppl": math.exp(nll), "nll": nll, "tokens": logprobs.numel()}


def ensemble_scores(
    pool: ExpertPool,
    windows: torch.Tensor,
    prior_mode: str = "cached",
    posterior: str = "one_step",
    cached: PriorRecord | None = None,
    top_k: int | None = None,
    prior_batch: int = 4,
    alpha: float = 0.3,
) -> tuple[dict[str, float], list[str]]:
    """Perplexity of the forest's ensemble on `windows` -> (scores, names of the experts run).

    cached / uniform: a fixed prior (top-k keeps its k largest entries and runs only those
    experts) updated per position by `posterior`. updating: the moving-average prior carried
    across the test windows in batches of `prior_batch` (all experts run).
    """
    check_posterior(posterior)
    if prior_mode == "updating":
        require(top_k is None, "--top-k needs --prior cached (an updating prior ranks no experts up front)")
        lp = updating_logprobs(pool.models(), windows, batch_size=prior_batch, alpha=alpha, posterior=posterior)
        return logprob_scores(lp), list(pool.names)
    prior = ensemble_prior(pool.names, prior_mode, cached, top_k)
    used = [n for n, w in zip(pool.names, prior.tolist()) if w > 0]
    ens = Ensemble(pool.models(used), prior[prior > 0], posterior)
    return perplexity(ens.logprobs, windows, EVAL_BATCH), used


def model_scores(model: nn.Module, windows: torch.Tensor) -> dict[str, float]:
    """Perplexity of one causal LM on `windows` (same batching as the ensemble)."""
    return perplexity(model, windows, EVAL_BATCH)
