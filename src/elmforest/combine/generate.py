"""Sampling text from a domain-posterior ensemble (or from one model).

At each step the next-token distribution is the ensemble mixture

    log p(x) = logsumexp_j(log w_j + log p_j(x | ids)),

with w the posterior over the experts given everything so far (prompt included), computed by
`ensemble.next_log_weights` from each expert's log-probs of the tokens already in the text (the
first prompt token has no context and is never scored). After a token is chosen, each active
expert's log-prob of it joins the history, so the posterior follows the text as it grows.

With use_cache=True each expert keeps its own KV cache: the prompt costs one forward pass per
expert, then every new token costs one single-token step per active expert. use_cache=False
recomputes every expert over the whole sequence at each step (slow; the reference the cached
path is tested against).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from elmforest.combine.ensemble import NO_MIXING, Mixing, check_posterior, next_log_weights, normalise_prior
from elmforest.errors import require
from elmforest.combine.evaluate import model_device


def _cache_kwarg(model: nn.Module) -> str:
    """transformers 5.x names the forward argument `cache`; 4.x named it `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model: nn.Module, ids: list[int], cache: Any, use_cache: bool = True) -> tuple[torch.Tensor, Any]:
    """Run `ids` (appended to `cache`, if any) -> (log-probs [len(ids), V] float32 CPU, cache)."""
    x = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    out = model(x, use_cache=use_cache, **{_cache_kwarg(model): cache})
    new_cache = getattr(out, "cache", None)
    if new_cache is None:  # transformers 4.x
        new_cache = getattr(out, "past_key_values", None)
    return torch.log_softmax(out.logits[0].float(), dim=-1).cpu(), new_cache


def _score_sequence(model: nn.Module, ids: list[int], use_cache: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One pass over the whole sequence -> (log p(ids[t] | ids[:t]) for t >= 1 [len-1],
    next-token log-probs [V], the KV cache or None)."""
    logp, cache = _forward(model, ids, None, use_cache)
    targets = torch.tensor(ids[1:], dtype=torch.long)
    history = logp[:-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return history, logp[-1], cache


def _choose(
    mix: torch.Tensor, greedy: bool, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """Pick the next token from mixture log-probs [V]: argmax, or a temperature / nucleus sample."""
    if greedy:
        return int(torch.argmax(mix))
    probs = torch.softmax(mix / temperature, dim=-1)
    if top_p < 1.0:
        # nucleus: the smallest set of most likely tokens whose mass reaches top_p (>= 1 token)
        sorted_p, order = torch.sort(probs, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        sorted_p[mass_before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


@torch.inference_mode()
def generate(
    models: Sequence[nn.Module] | nn.Module,
    tokenizer: Any | None,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    prior: torch.Tensor | Sequence[float] | None = None,
    posterior: str = "one_step",
    use_cache: bool = True,
    seed: int = 0,
    mixing: Mixing = NO_MIXING,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Continue `prompt_ids` with up to `max_new_tokens` tokens from the ensemble -> new ids only.

    models: one causal LM or a list of experts; prior: over the experts (uniform when None;
    experts with zero prior never run); posterior: a mode of `ensemble.POSTERIORS`, with `mixing`'s
    temperature, floor and decay (a seed member is just one more model in `models`). Generation
    stops early after the tokenizer's EOS token (kept in the output) when a tokenizer is given.
    Sampling draws from a torch.Generator seeded with `seed`, so a call is reproducible.
    `stop`, when given, sees the new ids after every token and ends generation when it returns
    True (lm-eval's `until` strings: `combine.harness`).
    """
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        models = [models]
    models = list(models)
    check_posterior(posterior)
    p = normalise_prior(prior, len(models))
    experts = [models[j] for j in range(len(models)) if p[j] > 0]
    log_prior = p[p > 0].log()
    ids = [int(i) for i in prompt_ids]
    require(len(ids) >= 1, "generation needs a prompt of at least one token")
    require(max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {max_new_tokens}")
    require(greedy or temperature > 0, f"temperature must be > 0, got {temperature}")
    require(0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}")
    for m in experts:
        m.eval()
        limit = _max_positions(m)
        require(
            limit is None or len(ids) + max_new_tokens <= limit,
            f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) exceeds the model's {limit} positions",
        )
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    generator = torch.Generator().manual_seed(seed)

    def score_all() -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
        scored = [_score_sequence(m, ids, use_cache) for m in experts]
        history = torch.stack([s[0] for s in scored])  # [k, len(ids) - 1]
        next_lp = torch.stack([s[1] for s in scored])  # [k, V]
        return history, next_lp, [s[2] for s in scored]

    history, next_lp, caches = score_all()
    new: list[int] = []
    while len(new) < max_new_tokens:
        logw = next_log_weights(history, log_prior, posterior, mixing)  # [k]
        mix = torch.logsumexp(logw[:, None] + next_lp.double(), dim=0)  # [V]
        token = _choose(mix, greedy, temperature, top_p, generator)
        ids.append(token)
        new.append(token)
        if token == eos or len(new) == max_new_tokens or (stop is not None and stop(new)):
            break
        if use_cache:
            history = torch.cat([history, next_lp[:, token : token + 1]], dim=1)
            stepped = [_forward(m, [token], c) for m, c in zip(experts, caches)]
            next_lp = torch.stack([s[0][-1] for s in stepped])
            caches = [s[1] for s in stepped]
        else:
            history, next_lp, caches = score_all()
    return new
