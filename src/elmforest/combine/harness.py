"""An elmforest target as a model for lm-evaluation-harness (lm-eval 0.4.x), registered as `elmforest`.

    lm_eval.simple_evaluate(model="elmforest", model_args={"pretrained": FOREST, "prior": "cached:legal"}, ...)
    elmforest lm-eval FOREST --tasks lambada_openai --prior cached:legal       (the command: cli/harness.py)

A target is a forest folder (its domain-posterior ensemble) or any model folder elmforest writes
(a mixture of one). The harness asks three things, answered here with the ensemble's own pieces
(`combine.ensemble`, `combine.scoring`, `combine.generate`), so the numbers are those of
`elmforest ensemble / eval / generate`:

    loglikelihood(context, continuation)  sum over the continuation's tokens of the mixture's
        log p(x_t | x_<t) = logsumexp_j(log w_j(t) + log p_j(x_t | x_<t)), the posterior w run over
        the whole sequence the model reads (context + continuation, left-truncated to the context
        length like lm-eval's `hf` model); is_greedy: every continuation token is the argmax of the
        mixture's full next-token distribution. Batched: requests sorted longest first, padded on
        the right (a causal model and a posterior that looks only backwards never see the padding).
    loglikelihood_rolling(text)  the harness's own rolling windows (lm_eval.utils.
        get_rolling_token_windows, context_len=1): [EOS] + the text's tokens cut into windows of
        the model's context length, each token predicted exactly once; every window but the last
        predicts `context` tokens from the one token before it onwards, which is exactly the
        study's window grid (`evaluate.spread_windows`: windows of context + 1 tokens overlapping
        by one, stride context) laid over [EOS] + text; the last, partial window keeps a full
        context of earlier tokens and scores only the tokens not yet predicted (the study drops
        that tail). The posterior restarts in every window, as in the study.
    generate_until(context, gen_kwargs)  `combine.generate.generate`: per-expert KV caches, the
        posterior following the text, stopping at EOS, at max_gen_toks (default 256) or as soon as
        the decoded continuation holds one of the `until` strings (cut there, as lm-eval expects);
        greedy unless gen_kwargs ask for do_sample. One request at a time; the prompt is
        left-truncated so prompt + max_gen_toks fit the context.

Priors (`prior`): "updating" (the default: BTM's prior for text of no known domain) is the
reference code's moving average carried across the scored sequences in the order they are scored
(longest first, then the harness's order), in groups of the recipe's prior batch: each sequence is
weighted with the prior reached after the groups before its own, then
prior <- (1 - alpha) prior + alpha * (mean posterior over the group's positions); generation uses
the prior reached so far. "cached:DOMAIN": the cached prior estimated on DOMAIN's valid windows
(`scoring.forest_prior`, the recipe's prior_sequences / prior_batch / prior_alpha / window_seed),
frozen. "flat": the same 1/n prior for every request, the posterior moving with each request's own
tokens (with `posterior=full_prefix`, each request's text picks its experts: the best setting on
the demo's local tasks, README). "uniform": fixed 1/n weights, no per-token update (the study's
btm_ensemble_uniform).
`load_prior=FILE` takes a prior saved by `elmforest ensemble --save-prior` with its mixing
settings. `top_k` keeps the k largest cached-prior entries and loads only those experts. The
posterior defaults to the recipe's `eval.posterior` recorded in expert.json (else one_step).

`local_task_yaml` writes an lm-eval task over a local JSONL file (multiple choice or rolling),
for offline evaluation with --include_path.

Why an `lm_eval.api.model.LM` and not a transformers model class: the mixture is scored in float64
from each expert's exact log-probs and runs only the top-k experts, the cached prior needs the
corpus, and generation reuses the tested per-expert KV-cache loop; a transformers class would have
to re-implement the cache and generation interfaces of each transformers version for the same
numbers.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import nn
from tqdm import tqdm

from elmforest.combine.ensemble import NO_MIXING, Mixing, check_posterior, normalise_prior, posterior_log_weights, top_k_prior
from elmforest.combine.evaluate import model_device
from elmforest.combine.forest import Forest, read_json
from elmforest.combine.logprobs import EVAL_BATCH
from elmforest.combine.prior import load_prior
from elmforest.combine.scoring import (
    ExpertPool,
    Members,
    check_forest_consistency,
    forest_context,
    forest_prior,
    model_context,
    recorded_seed_dir,
    resolve_corpus,
)
from elmforest.errors import ElmError, require

# lm-eval fills its model registry (hf, vllm, ...) on first use only while the registry is empty:
# load its own entries before adding ours, or registering `elmforest` would hide them.
importlib.import_module("lm_eval.models")

DEFAULT_PRIOR = "updating"
PRIOR_HELP = "updating | flat | uniform | cached:DOMAIN"


# --- the target: members, prior, posterior ---------------------------------------------------


@dataclass
class HarnessTarget:
    """What the harness model runs: the members with non-zero prior, in order, and how they mix."""

    path: Path
    kind: str  # "forest" or "model"
    models: list[nn.Module]
    names: list[str]
    prior: torch.Tensor  # float64 [k] over `models`, normalised
    prior_mode: str  # "updating", "flat", "uniform", "cached:DOMAIN" or "file:PATH"
    posterior: str
    mixing: Mixing
    tokenizer: Any
    context: int
    prior_batch: int = 4
    alpha: float = 0.3
    prior_record: dict[str, Any] | None = field(default=None)

    def info(self) -> dict[str, Any]:
        """What results.json's config records about the model."""
        return {
            "elmforest_target": str(self.path), "elmforest_kind": self.kind, "elmforest_members": self.names,
            "elmforest_prior_mode": self.prior_mode, "elmforest_prior": dict(zip(self.names, self.prior.tolist())),
            "elmforest_posterior": self.posterior, "elmforest_mixing": self.mixing.to_json(),
            "elmforest_prior_record": self.prior_record,
        }


def _recorded_eval(metas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The `eval` section of the recipe recorded in the experts' expert.json ({} when none)."""
    for meta in metas:
        recipe = meta.get("recipe")
        if isinstance(recipe, dict) and isinstance(recipe.get("eval"), dict):
            return recipe["eval"]
    return {}


def parse_prior(prior: str | None) -> tuple[str, str | None]:
    """"updating" / "flat" / "uniform" / "cached:DOMAIN" -> (mode, domain or None); refuses anything else."""
    text = (prior or DEFAULT_PRIOR).strip()
    mode, _, domain = text.partition(":")
    if mode == "cached":
        require(domain != "", f"prior {text!r}: a cached prior needs its domain, cached:DOMAIN")
        return mode, domain
    require(mode in ("updating", "flat", "uniform") and not domain, f"prior {text!r}: choose one of {PRIOR_HELP}")
    return mode, None


def check_harness_args(
    target: str | Path, prior: str | None, top_k: int | None, load_prior_file: str | Path | None
) -> str:
    """The cheap checks of a target and its prior options (before any model loads) -> "forest" or "model"."""
    path = Path(target)
    mode, _domain = parse_prior(prior)
    if top_k is not None:
        require(int(top_k) >= 1, f"top_k must be >= 1, got {top_k}")
    if (path / "forest.json").exists():
        require(top_k is None or mode == "cached" or load_prior_file is not None,
                f"top_k needs a cached prior (cached:DOMAIN or load_prior), not {mode}")
        require(load_prior_file is None or prior is None,
                f"load_prior brings its own prior; drop prior {prior!r}")
        return "forest"
    require(path.is_dir() and (path / "config.json").is_file(),
            "neither a forest (no forest.json) nor a model folder (no config.json)", path)
    require(mode != "cached" and top_k is None and load_prior_file is None,
            "a cached prior, top-k or prior file is for forests, not a single model", path)
    return "model"


def open_harness_target(
    target: str | Path,
    prior: str | None = None,
    posterior: str | None = None,
    top_k: int | None = None,
    corpus: str | Path | None = None,
    load_prior_file: str | Path | None = None,
    device: str = "cpu",
) -> HarnessTarget:
    """Open a forest (ensemble) or a model folder (a mixture of one) for the harness."""
    from elmforest.data.tokenizer import load_tokenizer
    from elmforest.models.factory import load_model

    path = Path(target)
    kind = check_harness_args(path, prior, top_k, load_prior_file)
    mode, domain = parse_prior(prior)
    top_k = None if top_k is None else int(top_k)
    if kind == "model":
        model = load_model(path).to(device).eval()
        meta = [read_json(path / "expert.json", "expert.json")] if (path / "expert.json").is_file() else []
        post = posterior or _recorded_eval(meta).get("posterior", "one_step")
        check_posterior(post)
        return HarnessTarget(path, "model", [model], [path.name], normalise_prior(None, 1), mode, post, NO_MIXING,
                             load_tokenizer(path), model_context(model.config))

    forest = Forest(path)
    metas = check_forest_consistency(forest)
    recorded = _recorded_eval(list(metas.values()))
    post = posterior or recorded.get("posterior", "one_step")
    check_posterior(post)
    batch, alpha = int(recorded.get("prior_batch", 4)), float(recorded.get("prior_alpha", 0.3))
    members = Members(ExpertPool(forest, device), recorded_seed_dir(metas.values()))
    context = forest_context(forest)
    mixing, record = NO_MIXING, None
    if load_prior_file is not None:
        record = load_prior(load_prior_file, forest.names)
        mode = f"file:{load_prior_file}"
        if record.mix != Mixing() or record.posterior == "decayed":  # a tuned record: its own settings
            post, mixing = record.posterior, record.mix
    elif mode == "cached":
        corp = resolve_corpus(corpus, metas.values(), path / "forest.json")
        record = forest_prior(members, corp, domain, context, int(recorded.get("prior_sequences", 100)), batch, alpha,
                              post, int(recorded.get("window_seed", 0)))
        mode = f"cached:{domain}"
    names = members.names(mixing.with_seed)
    if record is None:
        weights = normalise_prior(None, len(names))
    else:
        weights = record.vector(names)
        weights = top_k_prior(weights, top_k) if top_k is not None else weights
    used = [n for n, w in zip(names, weights.tolist()) if w > 0]
    return HarnessTarget(
        path, "forest", members.models(used), used, weights[weights > 0], mode,
        "uniform" if mode == "uniform" else post, mixing, load_tokenizer(forest.tokenizer_dir), context, batch, alpha,
        record.to_json() if record is not None else None,
    )


# --- the mixture over padded batches --------------------------------------------------------


class PriorWalk:
    """The prior each scored sequence is weighted with (see the module docstring).

    Fixed (`updating` False): the target's prior for every sequence. Updating: the moving average
    over groups of `batch` sequences in the order they are scored.
    """

    def __init__(self, prior: torch.Tensor, updating: bool, batch: int, alpha: float):
        self.prior = prior.clone()
        self.updating = updating
        self.batch = batch
        self.alpha = alpha
        self._sum = torch.zeros_like(prior)
        self._positions = 0
        self._seen = 0

    def log_prior(self) -> torch.Tensor:
        return self.prior.log()

    def observe(self, weights: torch.Tensor) -> None:
        """A scored sequence's posterior weights [k, T]; closes the group after `batch` sequences."""
        if not self.updating:
            return
        self._sum += weights.sum(dim=-1).cpu()
        self._positions += weights.shape[-1]
        self._seen += 1
        if self._seen % self.batch == 0:
            self._close()

    def _close(self) -> None:
        self.prior = (1 - self.alpha) * self.prior + self.alpha * self._sum / self._positions
        self._sum = torch.zeros_like(self.prior)
        self._positions = 0


@torch.inference_mode()
def score_sequences(
    target: HarnessTarget, walk: PriorWalk, rows: Sequence[Sequence[int]], spans: Sequence[int]
) -> list[tuple[float, bool]]:
    """Mixture log-likelihood of the last `spans[i]` tokens of each `rows[i]` (all scored in one
    padded batch, row i weighted with the prior `walk` gives it) -> [(sum log p, is_greedy)].

    rows[i] holds n_i + 1 tokens: the model reads the first n_i and predicts tokens 1..n_i.
    """
    lengths = [len(r) - 1 for r in rows]
    require(all(n >= 1 for n in lengths), "every scored sequence needs at least two tokens")
    T = max(lengths)
    tokens = torch.zeros((len(rows), T + 1), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    targets = tokens[:, 1:]  # [B, T]
    scored = torch.zeros((len(rows), T), dtype=torch.bool)  # the continuation's positions
    for i, (n, span) in enumerate(zip(lengths, spans)):
        scored[i, n - span : n] = True
    target_lp, scored_lp = [], []
    for model in target.models:
        logits = model(tokens[:, :-1].to(model_device(model))).logits.float()  # [B, T, V]
        logp = torch.log_softmax(logits, dim=-1).cpu()
        target_lp.append(logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1))  # [B, T]
        scored_lp.append(logp[scored])  # [M, V]: full distributions at the continuation positions
    lp = torch.stack(target_lp)  # [k, B, T]
    full = torch.stack(scored_lp).double()  # [k, M, V]
    out, offset = [], 0
    for i, (n, span) in enumerate(zip(lengths, spans)):
        row_lp = lp[:, i : i + 1, :n]  # [k, 1, n]: the posterior sees only this row's real tokens
        logw = posterior_log_weights(row_lp, walk.log_prior(), target.posterior, target.mixing)  # [k, 1, n]
        walk.observe(logw[:, 0].exp())
        mix = torch.logsumexp(logw + row_lp.double(), dim=0)[0]  # [n]
        dist = torch.logsumexp(logw[:, 0, n - span :, None] + full[:, offset : offset + span], dim=0)  # [span, V]
        greedy = bool((dist.argmax(-1) == targets[i, n - span : n]).all())
        out.append((float(mix[n - span :].sum()), greedy))
        offset += span
    return out


def rolling_windows(token_ids: Sequence[int], prefix_token: int, context: int) -> list[tuple[list[int], int]]:
    """The windows `loglikelihood_rolling` scores for a text's tokens -> [(tokens read + predicted,
    how many final tokens it scores)]: lm-eval's rolling windows (context_len 1) made disjoint."""
    windows = get_rolling_token_windows(list(token_ids), prefix_token, context, 1)
    return [(list(a) + list(b), len(b)) for a, b in map(make_disjoint_window, windows)]


# --- the lm-eval model ----------------------------------------------------------------------


def _batch_size(value: Any) -> int:
    """lm-eval's batch_size: an integer, or "auto" / "auto:N" (-> elmforest's scoring batch)."""
    if value is None or str(value).startswith("auto"):
        return EVAL_BATCH
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ElmError(f"batch_size {value!r} is not an integer or 'auto'") from None
    require(size >= 1, f"batch_size must be >= 1, got {size}")
    return size


@register_model("elmforest")
class ElmforestLM(TemplateLM):
    """lm-eval's model for an elmforest forest or model folder (model_args: pretrained, the folder, as
    for lm-eval's `hf` model, so outputs land under its name; prior, posterior, top_k, corpus,
    load_prior; lm-eval's batch_size and device)."""

    def __init__(
        self,
        pretrained: str,
        prior: str | None = None,
        posterior: str | None = None,
        top_k: int | None = None,
        corpus: str | None = None,
        load_prior: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        **unused: Any,
    ):
        super().__init__()
        require(not unused, f"unknown model_args for elmforest: {', '.join(sorted(unused))}")
        from elmforest.train.budget import resolve_device

        self.target = open_harness_target(pretrained, prior, posterior, top_k, corpus, load_prior,
                                          resolve_device(device or "auto"))
        self.tokenizer = self.target.tokenizer
        self.batch_size = _batch_size(batch_size)
        self.walk = PriorWalk(self.target.prior, self.target.prior_mode == "updating", self.target.prior_batch,
                              self.target.alpha)

    # -- tokens -----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The token before a document: BOS when the tokenizer has one (as lm-eval's `hf`), else EOS
        (elmforest's token caches put EOS between documents)."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.target.context

    @property
    def device(self) -> str:
        return str(model_device(self.target.models[0]))

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def get_model_info(self) -> dict[str, Any]:
        return self.target.info()

    # -- scoring ----------------------------------------------------------------------------
    def _score(self, rows: list[list[int]], spans: list[int], desc: str, quiet: bool) -> list[tuple[float, bool]]:
        """Score every (row, span) in batches, longest first -> results in the given order."""
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        with tqdm(total=len(rows), desc=desc, disable=quiet) as bar:
            for s in range(0, len(order), self.batch_size):
                chunk = order[s : s + self.batch_size]
                for i, res in zip(chunk, score_sequences(self.target, self.walk, [rows[i] for i in chunk],
                                                          [spans[i] for i in chunk])):
                    results[i] = res
                bar.update(len(chunk))
        return [r for r in results if r is not None]

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        rows, spans = [], []
        for _, context_enc, continuation_enc in requests:
            require(0 < len(continuation_enc) <= self.max_length,
                    f"a continuation of {len(continuation_enc)} tokens does not fit the context of {self.max_length}")
            rows.append((list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :])
            spans.append(len(continuation_enc))
        results = self._score(rows, spans, "elmforest loglikelihood", disable_tqdm)
        for (pair, _, _), res in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        rows, spans, owner = [], [], []
        for r, req in enumerate(requests):
            for row, span in rolling_windows(self.tok_encode(req.args[0]), self.prefix_token_id, self.max_length):
                rows.append(row)
                spans.append(span)
                owner.append(r)
        sums = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, self._score(rows, spans, "elmforest rolling windows", disable_tqdm) if rows else []):
            sums[r] += lp
        for req, total in zip(requests, sums):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return sums

    # -- generation -------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        from elmforest.combine.generate import generate

        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            eos_text = self.tokenizer.decode([self.eot_token_id])
            until = [u for u in until if u] + ([eos_text] if eos_text and eos_text not in until else [])
            max_new = min(int(kwargs.pop("max_gen_toks", 256)), self.max_length - 1)
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            ids = (self.tok_encode(context) or [self.prefix_token_id])[-(self.max_length - max_new) :]

            def stop(new: list[int]) -> bool:
                text = self.tok_decode(new)
                return any(u in text for u in until)

            new = generate(self.target.models, self.tokenizer, ids, max_new, temperature=temperature or 1.0,
                           top_p=top_p, greedy=not sample, prior=self.walk.prior, posterior=self.target.posterior,
                           mixing=self.target.mixing, stop=stop)
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out


# --- local tasks ----------------------------------------------------------------------------

# lm-eval's aggregation and direction of the metrics local tasks use (spelled out, so lm-eval
# does not warn that it picks defaults).
_METRICS = {
    "acc": ("mean", True), "acc_norm": ("mean", True), "acc_mutual_info": ("mean", True),
    "word_perplexity": ("weighted_perplexity", False), "byte_perplexity": ("weighted_perplexity", False),
    "bits_per_byte": ("bits_per_byte", False),
}
_FIELDS = {  # output_type -> the JSONL fields a document holds, as lm-eval's templates
    "multiple_choice": {"doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}"},
    "loglikelihood_rolling": {"doc_to_text": "", "doc_to_target": "{{text}}"},
}


def local_task_yaml(name: str, data_file: str | Path, output_type: str, metrics: Sequence[str]) -> str:
    """An lm-eval task over a local JSONL file, offline (`dataset_path: json`): multiple_choice
    documents hold {"context", "choices", "label"} (lm-eval puts " " between context and choice),
    loglikelihood_rolling documents hold {"text"}. Put the file in a folder passed as --include_path."""
    require(output_type in _FIELDS, f"output_type {output_type!r}: choose one of {', '.join(_FIELDS)}")
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(Path(data_file).resolve()))}", "test_split: test", f"output_type: {output_type}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in _FIELDS[output_type].items()]
    lines.append("metric_list:")
    for metric in metrics:
        require(metric in _METRICS, f"metric {metric!r}: choose one of {', '.join(_METRICS)}")
        aggregation, higher = _METRICS[metric]
        lines += [f"  - metric: {metric}", f"    aggregation: {aggregation}", f"    higher_is_better: {str(higher).lower()}"]
    return "\n".join([*lines, "metadata:", "  version: 1.0", ""])
