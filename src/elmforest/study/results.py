"""The study's evaluation: every method scored on the same test windows of every domain.

Windows are spread over each domain's whole test split (`evaluate.spread_windows`, seeded by
`eval.window_seed`, the same for every method and every training seed); the cached priors are
estimated on windows spread over the valid split the same way. Each expert's per-token log-probs
on a domain's windows are computed once ([n, N, T]) and every ensemble variant (uniform, cached
prior, top-k, either posterior, tuned mixing) is a re-weighting of those numbers, so the variants
differ only in their weights, never in the tokens they score. The methods themselves live in the
`methods.STUDY_METHODS` registry; the arms that train the models (and which methods a recipe
lists) in `elmforest.study.arms`, which the caller passes in.

Per domain, RUN/eval/<domain>.json holds every method's mean NLL and its per-document NLL sums
(the units the bootstrap resamples), the documents and tokens scored, and the priors used. An
interrupted evaluation resumes; a cached domain that lacks a method the recipe asks for is
re-scored for that method, and a method still missing is an error naming it and the domain.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from elmforest import storage
from elmforest.combine.averaging import average_state_dicts
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.mixtures.demix import demix_cached_prior, demix_logprobs
from elmforest.combine.logprobs import expert_logprobs, mean_nll
from elmforest.errors import ElmError
from elmforest.combine.evaluate import EvalWindows, document_sums
from elmforest.combine.forest import read_json
from elmforest.study.methods import StudyMethod
from elmforest.combine.mixing import TunedMixing, tune_mixing
from elmforest.combine.prior import cached_prior, ema_batches
from elmforest.combine.scoring import prior_windows, split_windows
from elmforest.data.tokens import token_array

EVAL_FORMAT = "elmforest-eval/2"  # per-document sums, windows spread over the split


def unigram_logprobs(train_arrays: list[np.ndarray], vocab: int, windows: torch.Tensor) -> torch.Tensor:
    """A unigram model of the pooled train tokens (add-one smoothed) on the same targets -> [N, T]."""
    counts = np.ones(vocab, dtype=np.float64)
    for a in train_arrays:
        counts += np.bincount(np.asarray(a), minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    return torch.from_numpy(logp[windows[:, 1:].numpy()]).float()


def averaged_model(models: list[torch.nn.Module], weights: list[float] | None) -> torch.nn.Module:
    """One in-memory model whose parameters are the (uniform when weights is None) weighted mean."""
    merged = average_state_dicts([m.state_dict() for m in models], weights, "uniform" if weights is None else "weighted")
    out = load_model_like(models[0])
    out.load_state_dict(merged)
    return out.eval()


def load_model_like(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh model of the same class and config (weights to be loaded by the caller)."""
    return type(model)(model.config)


class StudyModels:
    """Every trained arm of one study run, loaded once (on the CPU) for scoring all domains.

    `provide` (`elmforest.study.arms.provide_models`) lets each trained arm load what it lends the
    evaluation into `singles` (one model per name: seed, dense, dense_x2, btx, ...), `forests`
    ({arm: (expert names, experts)}: btm, random, btm_seed<f>, cbtm_k<k>), `demix` or `extras`
    (anything else its methods read, keyed by the arm)."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        tokenizer_dir: Path,
        context: int,
        methods: list[StudyMethod],
        provide: Callable[["StudyModels"], None],
        log: Callable[[str], None],
    ):
        from elmforest.train.budget import resolve_device

        self.recipe, self.run_dir, self.tok, self.context, self.log = recipe, Path(run_dir), tokenizer_dir, context, log
        self.corpus = Corpus(recipe.corpus)
        self.device = resolve_device(recipe.optim.device)
        self.methods = methods
        self.singles: dict[str, torch.nn.Module] = {}
        self.forests: dict[str, tuple[list[str], list[torch.nn.Module]]] = {}
        self.demix: Any = None
        self.extras: dict[str, Any] = {}  # what an arm's own methods need beside its models (a c-BTM clusterer)
        provide(self)
        self.uniform_average = averaged_model(self.forests["btm"][1], None) if "btm" in self.forests else None
        vocab = len(read_json(tokenizer_dir / "tokenizer.json", "tokenizer")["model"]["vocab"]) + 1
        self.train_arrays = [token_array(self.corpus, tokenizer_dir, d, "train") for d in recipe.train_domains]
        self.vocab = max(vocab, max(int(a.max()) for a in self.train_arrays) + 1)

    def test_windows(self, domain: str) -> EvalWindows:
        e = self.recipe.eval
        try:
            return split_windows(self.corpus, self.tok, domain, "test", self.context, e.max_tokens_per_domain, e.window_seed)
        except ElmError as err:
            raise ElmError(f"domain {domain!r} test split: {err.detail}", self.corpus.path) from None

    def valid_windows(self, domain: str) -> torch.Tensor:
        e = self.recipe.eval
        try:
            return prior_windows(self.corpus, self.tok, domain, self.context, e.prior_sequences, e.window_seed)
        except ElmError as err:
            raise ElmError(f"domain {domain!r} valid split: {err.detail}", self.corpus.path) from None


class DomainEval:
    """One domain's shared pieces, each computed on first use: what the method registry scores from."""

    def __init__(self, models: StudyModels, domain: str):
        self.models, self.recipe, self.domain = models, models.recipe, domain
        self.test = models.test_windows(domain)
        self.valid = models.valid_windows(domain)
        self.priors: dict[str, Any] = {}
        self._lp: dict[tuple[str, str], torch.Tensor] = {}
        self._prior: dict[tuple[str, str], torch.Tensor] = {}
        self._tuned: dict[str, TunedMixing] = {}

    def _windows(self, split: str) -> torch.Tensor:
        return self.test.tokens if split == "test" else self.valid

    def _logprobs(self, key: tuple[str, str], models: list[torch.nn.Module]) -> torch.Tensor:
        if key not in self._lp:
            e = self.recipe.eval
            self._lp[key] = expert_logprobs(models, self._windows(key[1]), e.batch_size, self.models.device)
        return self._lp[key]

    def single_lp(self, name: str, split: str = "test") -> torch.Tensor:
        """One model's log-probs [N, T] (seed, dense, dense_x<k>, btx)."""
        if name not in self.models.singles:
            raise ElmError(f"study method needs the trained model {name!r}, which this run does not have", self.models.run_dir)
        return self._logprobs((name, split), [self.models.singles[name]])[0]

    def forest_lp(self, arm: str, split: str = "test") -> torch.Tensor:
        """Every expert's log-probs [n, N, T] of a forest arm (btm, random)."""
        if arm not in self.models.forests:
            raise ElmError(f"study method needs the {arm!r} forest, which this run does not have", self.models.run_dir)
        return self._logprobs((f"forest:{arm}", split), self.models.forests[arm][1])

    def cached_prior(self, arm: str, posterior: str) -> torch.Tensor:
        """The forest's cached prior on this domain's valid windows (recorded under priors[arm])."""
        key = (arm, posterior)
        if key not in self._prior:
            e = self.recipe.eval
            prior = cached_prior(self.forest_lp(arm, "valid"), e.prior_batch, e.prior_alpha, posterior)
            self._prior[key] = prior
            if posterior == e.posterior:
                names = self.models.forests[arm][0]
                self.priors[arm] = {"experts": dict(zip(names, prior.tolist())), "batches": ema_batches(len(self.valid), e.prior_batch),
                                    "posterior": posterior}
        return self._prior[key]

    def tuned(self, arm: str) -> TunedMixing:
        """Mixing settings chosen on the valid windows (never test), recorded under priors[<arm>_tuned]."""
        if arm not in self._tuned:
            e = self.recipe.eval
            seed = self.single_lp("seed", "valid") if "seed" in self.models.singles else None
            names = self.models.forests[arm][0]
            self._tuned[arm] = tune_mixing(names, self.forest_lp(arm, "valid"), seed, e.prior_batch, e.prior_alpha)
            self.priors[f"{arm}_tuned"] = self._tuned[arm].to_json()
        return self._tuned[arm]

    def average_lp(self, weights: str) -> torch.Tensor:
        """The forest's parameter average (uniform, or weighted by the cached prior) on the test windows."""
        models = self.models.forests["btm"][1]
        if weights == "uniform":
            avg = self.models.uniform_average
        else:
            avg = averaged_model(models, self.cached_prior("btm", self.recipe.eval.posterior).tolist())
        return self._logprobs((f"average:{weights}", "test"), [avg])[0]

    def demix_lp(self) -> torch.Tensor:
        """DEMix with its own cached prior over domains (same valid windows and settings as the forests')."""
        if self.models.demix is None:
            raise ElmError("study method needs the DEMix model, which this run does not have", self.models.run_dir)
        model, domains = self.models.demix
        e, test = self.recipe.eval, self.test.tokens
        with torch.inference_mode():
            prior = demix_cached_prior(model, self.valid, e.prior_batch, e.prior_alpha, e.posterior)
            lp = torch.cat([demix_logprobs(model, test[i : i + e.batch_size], prior, e.posterior)
                            for i in range(0, len(test), e.batch_size)])  # [N, T]
        self.priors["demix"] = {"experts": dict(zip(domains, prior.tolist())),
                                "batches": ema_batches(len(self.valid), e.prior_batch), "posterior": e.posterior}
        return lp


def score_domain(models: StudyModels, domain: str, methods: list[StudyMethod], cached: dict[str, Any] | None) -> dict[str, Any]:
    """Score `methods` on one domain, adding to what `cached` (an earlier eval/<domain>.json) holds."""
    ev = DomainEval(models, domain)
    ids, _, tokens = document_sums(torch.zeros(ev.test.docs.shape), ev.test.docs)
    out = cached or {
        "format": EVAL_FORMAT,
        "tokens": ev.test.n_tokens,
        "documents": len(ids),
        "split_documents": ev.test.split_documents,
        "valid_windows": len(ev.valid),
        "doc_ids": ids,
        "doc_tokens": tokens,
        "nll": {},
        "doc_nll": {},
        "priors": {},
    }
    if out["doc_ids"] != ids:
        raise ElmError(f"cached evaluation of {domain!r} scored other documents; delete RUN/eval to re-score", models.run_dir)
    todo = [m for m in methods if m.name not in out["nll"]]
    for m in todo:
        try:
            lp = m.score(ev)
        except ElmError as err:
            raise ElmError(f"study method {m.name!r} cannot be scored on domain {domain!r}: {err.detail}", err.path) from None
        _, sums, _ = document_sums(lp, ev.test.docs)
        out["nll"][m.name] = mean_nll(lp)
        out["doc_nll"][m.name] = sums
        if m.valid is not None:
            out.setdefault("valid_nll", {})[m.name] = m.valid(ev)
    if "unigram" not in out["nll"]:
        lp = unigram_logprobs(models.train_arrays, models.vocab, ev.test.tokens)
        out["nll"]["unigram"], out["doc_nll"]["unigram"] = mean_nll(lp), document_sums(lp, ev.test.docs)[1]
    out["priors"].update(ev.priors)
    return out


def evaluate_study(
    recipe: Recipe,
    run_dir: Path,
    tokenizer_dir: Path,
    context: int,
    methods: list[StudyMethod],
    provide: Callable[[StudyModels], None],
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Score `methods` (`arms.study_methods`) on every train and novel domain with the models
    `provide` (`arms.provide_models`) loads; per-domain results are cached on disk."""
    run_dir = Path(run_dir)
    cache = run_dir / "eval"
    scores: dict[str, dict[str, Any]] = {}
    models: StudyModels | None = None
    for d in [*recipe.train_domains, *recipe.novel_domains]:
        path = cache / f"{d}.json"
        cached = read_json(path, "evaluation cache") if path.is_file() else None
        if cached is not None and cached.get("format") != EVAL_FORMAT:
            cached = None  # an older protocol (first-N tokens): score again
        if cached is not None and all(m.name in cached["nll"] for m in methods):
            scores[d] = cached
            continue
        if models is None:
            models = StudyModels(recipe, run_dir, tokenizer_dir, context, methods, provide, log)
        missing = [m.name for m in methods if cached is not None and m.name not in cached["nll"]]
        log(f"evaluating {d}" + (f" (adding {', '.join(missing)})" if missing else ""))
        scores[d] = score_domain(models, d, methods, cached)
        storage.write_json(path, scores[d])
    for d, s in scores.items():
        lost = [m.name for m in methods if m.name not in s["nll"]]
        if lost:
            raise ElmError(f"study method {lost[0]!r} has no score on domain {d!r}", cache / f"{d}.json")
    return scores
