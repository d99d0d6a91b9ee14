"""The study's evaluation: every method scored on the same test windows of every domain.

Each expert's per-token log-probs on a domain's windows are computed once ([n, N, T]) and every
ensemble variant (uniform, cached prior, top-k, either posterior) is a re-weighting of those
numbers, so the variants differ only in their weights, never in the tokens they score.
Results per domain are cached in RUN/eval/<domain>.json, so an interrupted evaluation resumes.

The mixtures inside one model (`elmforest.mixtures`) are scored on the same windows: DEMix
(`demix_cached`) with its own cached prior over domains, estimated on the same valid windows
with the same settings as the forests' priors, and BTX (`btx`) as one model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elmforest import mixtures, storage
from elmforest.averaging import average_state_dicts
from elmforest.config import Recipe
from elmforest.corpus import Corpus
from elmforest.errors import ElmError
from elmforest.demix import demix_cached_prior, demix_logprobs, load_demix
from elmforest.ensemble import cached_prior, expert_logprobs, mix_logprobs, posterior_log_weights, top_k_prior
from elmforest.forest import Forest, read_json
from elmforest.models import load_model
from elmforest.scoring import domain_windows
from elmforest.tokens import token_array

OTHER_POSTERIOR = {"one_step": "full_prefix", "full_prefix": "one_step"}


def nll_of(logprobs: torch.Tensor) -> float:
    """Mean negative log-likelihood per predicted token (nats)."""
    return float(-logprobs.double().mean())


def batched_logprobs(models: list[torch.nn.Module], windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Each model's log-probs of every window's targets -> float32 [n, N, T]."""
    with torch.inference_mode():
        parts = [expert_logprobs(models, windows[i : i + batch_size]) for i in range(0, len(windows), batch_size)]
    return torch.cat(parts, dim=1)


def ema_prior(valid_lp: torch.Tensor, batch_size: int, alpha: float, posterior: str) -> tuple[torch.Tensor, int]:
    """The reference code's cached prior from precomputed valid log-probs [n, P, T].

    `cached_prior` takes a function of the windows; the windows here are row indices into the
    precomputed log-probs, so no expert runs twice."""
    rows = torch.arange(valid_lp.shape[1]).unsqueeze(1)  # [P, 1] "windows" = row numbers
    prior = cached_prior(lambda idx: valid_lp[:, idx[:, 0]], rows, batch_size, alpha, posterior)
    return prior, math.ceil(valid_lp.shape[1] / batch_size)


def mixture_nll(lp: torch.Tensor, prior: torch.Tensor, posterior: str) -> float:
    """NLL of the domain-posterior mixture over the experts with non-zero prior."""
    active = (prior > 0).nonzero().flatten()
    sub = lp[active]
    logw = posterior_log_weights(sub, prior[active].log(), posterior)
    return nll_of(mix_logprobs(sub, logw))


def unigram_nll(train_arrays: list[np.ndarray], vocab: int, windows: torch.Tensor) -> float:
    """A unigram model of the pooled train tokens (add-one smoothed) scored on the same targets."""
    counts = np.ones(vocab, dtype=np.float64)
    for a in train_arrays:
        counts += np.bincount(np.asarray(a), minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    return float(-logp[windows[:, 1:].numpy()].mean())


class Scorer:
    """Scores one study's arms on one domain at a time."""

    def __init__(self, recipe: Recipe, run_dir: Path, tokenizer_dir: Path, context: int, log: Callable[[str], None]):
        self.recipe, self.run_dir, self.tok, self.context, self.log = recipe, Path(run_dir), tokenizer_dir, context, log
        self.corpus = Corpus(recipe.corpus)
        self.e = recipe.eval
        self.singles: dict[str, torch.nn.Module] = {}
        for name, folder in (("seed", "seed"), ("dense", "dense")):
            if (self.run_dir / folder / "model.safetensors").is_file() and (name == "seed" or recipe.arms.dense):
                self.singles[name] = load_model(self.run_dir / folder).eval()
        self.forests: dict[str, tuple[list[str], list[torch.nn.Module]]] = {}
        for arm, folder in (("btm", "forest"), ("random", "random_forest")):
            if (self.run_dir / folder / "forest.json").is_file():
                f = Forest(self.run_dir / folder)
                self.forests[arm] = (f.names, [load_model(f.expert_dir(n)).eval() for n in f.names])
        self.demix: tuple[torch.nn.Module, list[str]] | None = None
        if recipe.arms.demix and (mixtures.demix_dir(self.run_dir) / mixtures.DEMIX_RUN_JSON).is_file():
            self.demix = load_demix(mixtures.demix_dir(self.run_dir))
        if recipe.arms.btx and (mixtures.btx_dir(self.run_dir) / mixtures.MIX_JSON).is_file():
            self.singles["btx"] = load_model(mixtures.btx_dir(self.run_dir)).eval()  # a Mixtral folder
        self.uniform_average = None
        if "btm" in self.forests:
            models = self.forests["btm"][1]
            self.uniform_average = averaged_model(models, None)
        vocab = len(read_json(tokenizer_dir / "tokenizer.json", "tokenizer")["model"]["vocab"]) + 1
        self.train_arrays = [token_array(self.corpus, tokenizer_dir, d, "train") for d in recipe.train_domains]
        self.vocab = max(vocab, max(int(a.max()) for a in self.train_arrays) + 1)

    def windows(self, domain: str, split: str, max_tokens: int) -> torch.Tensor:
        try:
            return domain_windows(self.corpus, self.tok, domain, split, self.context, max_tokens)
        except ElmError as e:
            raise ElmError(f"domain {domain!r} {split} split: {e}", self.corpus.path) from None

    def score_domain(self, domain: str) -> dict[str, Any]:
        """NLL of every method on one domain's test windows, plus the cached priors used."""
        e = self.e
        test = self.windows(domain, "test", e.max_tokens_per_domain)
        valid = self.windows(domain, "valid", e.prior_sequences * self.context + 1)
        out: dict[str, Any] = {"tokens": int(test[:, 1:].numel()), "valid_windows": len(valid), "nll": {}, "priors": {}}
        nll = out["nll"]
        with torch.inference_mode():
            for name, model in self.singles.items():
                nll[name] = nll_of(batched_logprobs([model], test, e.batch_size)[0])
            other = OTHER_POSTERIOR[e.posterior]
            for arm, (names, models) in self.forests.items():
                lp = batched_logprobs(models, test, e.batch_size)  # [n, N, T]
                vlp = batched_logprobs(models, valid, e.batch_size)  # [n, P, T]
                prior, batches = ema_prior(vlp, e.prior_batch, e.prior_alpha, e.posterior)
                prior_other, _ = ema_prior(vlp, e.prior_batch, e.prior_alpha, other)
                out["priors"][arm] = {"experts": dict(zip(names, prior.tolist())), "batches": batches,
                                      "posterior": e.posterior}
                nll[f"{arm}_ensemble_cached"] = mixture_nll(lp, prior, e.posterior)
                if arm != "btm":
                    continue
                n = len(models)
                uniform = torch.full((n,), 1.0 / n, dtype=torch.float64)
                nll["btm_ensemble_uniform"] = mixture_nll(lp, uniform, "uniform")
                nll[f"btm_ensemble_cached_{other}"] = mixture_nll(lp, prior_other, other)
                for k in (1, 2):
                    if k <= n:  # top-n is the full cached ensemble
                        nll[f"btm_ensemble_cached_top{k}"] = mixture_nll(lp, top_k_prior(prior, k), e.posterior)
                nll["btm_average_uniform"] = nll_of(batched_logprobs([self.uniform_average], test, e.batch_size)[0])
                posterior_avg = averaged_model(models, prior.tolist())
                nll["btm_average_posterior"] = nll_of(batched_logprobs([posterior_avg], test, e.batch_size)[0])
            if self.demix is not None:
                model, domains = self.demix
                prior = demix_cached_prior(model, valid, e.prior_batch, e.prior_alpha, e.posterior)
                out["priors"]["demix"] = {"experts": dict(zip(domains, prior.tolist())),
                                          "batches": math.ceil(len(valid) / e.prior_batch), "posterior": e.posterior}
                lp = torch.cat([demix_logprobs(model, test[i : i + e.batch_size], prior, e.posterior)
                                for i in range(0, len(test), e.batch_size)])  # [N, T]
                nll["demix_cached"] = nll_of(lp)
        nll["unigram"] = unigram_nll(self.train_arrays, self.vocab, test)
        return out


def averaged_model(models: list[torch.nn.Module], weights: list[float] | None) -> torch.nn.Module:
    """One in-memory model whose parameters are the (uniform when weights is None) weighted mean."""
    merged = average_state_dicts([m.state_dict() for m in models], weights, "uniform" if weights is None else "weighted")
    out = load_model_like(models[0])
    out.load_state_dict(merged)
    return out.eval()


def load_model_like(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh model of the same class and config (weights to be loaded by the caller)."""
    return type(model)(model.config)


def evaluate_study(
    recipe: Recipe, run_dir: Path, tokenizer_dir: Path, context: int, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Score every arm on every train and novel domain; per-domain results are cached on disk."""
    run_dir = Path(run_dir)
    cache = run_dir / "eval"
    domains = [*recipe.train_domains, *recipe.novel_domains]
    scores: dict[str, dict[str, Any]] = {}
    scorer: Scorer | None = None
    for d in domains:
        path = cache / f"{d}.json"
        if path.is_file():
            scores[d] = read_json(path, "evaluation cache")
            continue
        if scorer is None:
            scorer = Scorer(recipe, run_dir, tokenizer_dir, context, log)
        log(f"evaluating {d}")
        scores[d] = scorer.score_domain(d)
        storage.write_json(path, scores[d])
    return scores
