"""DEMix: domain-expert feed-forward layers inside one model (Gururangan et al. 2021).

A DEMix model is an ordinary Hugging Face causal LM (GPT-2 or Llama family) whose every
layer's `mlp` has been swapped for a `DomainMLP` holding one copy of that MLP per training
domain. Attention, norms and embeddings stay shared. Nothing else changes, so the plain loop

    set_domains(model, domain_ids)            # LongTensor[B]: the domain of each sequence
    loss = model(input_ids=x, labels=y).loss  # exactly as for a dense model

trains it: each sequence only goes through its own domain's MLPs, so only those receive
gradients (the paper's "domain-expert" training, with the batch built domain-balanced).

At inference the domain is unknown. DEMix mixes the experts' *FFN outputs* at every layer with
the domain posterior P(D=j | x_<t), computed exactly as a BTM ensemble computes it:

    P(D=j | x_<t) ∝ P(D=j) * p_j(x_<t)

where p_j is the likelihood of the context with only domain j's MLPs active (one forward pass
per domain), then runs one more forward pass with the MLP outputs mixed by those weights.
`one_step` uses only the previous token's probability for p_j(x_<t) (the released code);
`full_prefix` uses the whole prefix (the paper's formula). The n single-domain passes are the
experts of a forest (`DomainView`), scored by `logprobs.expert_logprobs`, and the posterior and
the cached prior are `elmforest.combine`'s own (`ensemble.posterior_log_weights`,
`prior.cached_prior`), so a DEMix model and a BTM forest are weighted by exactly the same rule.

On disk (`save_demix`): `config.json` (the *dense* base model's config), `model.safetensors`
(the DEMix weights, keys `...mlp.experts.<j>....`) and `demix.json`
(`{"format", "n_domains", "domains", "model_type"}`); `load_demix` rebuilds the model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from elmforest.models import checkpoint

from elmforest import storage
from elmforest.combine.ensemble import PriorLike, normalise_prior, posterior_log_weights
from elmforest.combine.evaluate import token_logprobs
from elmforest.combine.logprobs import expert_logprobs
from elmforest.combine.prior import cached_prior
from elmforest.errors import ElmError, require

DEMIX_FORMAT = "elmforest-demix/1"


class DomainMLP(nn.Module):
    """n copies of one transformer layer's MLP, one per domain, behind a routing state.

    Routing state (set through `set_domains` / `set_mixture`, on every layer at once):
    - `domain_ids: LongTensor[B]` (training): row b goes through `experts[domain_ids[b]]` only;
      rows are grouped per domain so each expert runs once per batch on its own rows.
    - `weights: Tensor[n] | Tensor[B, n] | Tensor[B, T, n]` (inference): the output is
      sum_j w_j * expert_j(h). An expert is only run on the positions where its weight is
      non-zero, so a top-k mixture costs k expert MLPs, not n.
    """

    def __init__(self, mlps: Sequence[nn.Module]):
        super().__init__()
        require(len(mlps) >= 1, "DEMix needs at least one domain expert MLP")
        self.experts = nn.ModuleList(mlps)
        self.domain_ids: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] = []  # (domain, its rows), from set_domains
        self.weights: torch.Tensor | None = None

    @property
    def n_domains(self) -> int:
        return len(self.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # [B, T, H] -> [B, T, H]
        if self.domain_ids is not None:
            return self._route(hidden_states)
        if self.weights is not None:
            return self._mix(hidden_states, self.weights)
        raise ValueError("DEMix model has no routing: call set_domains(model, ids) or set_mixture(model, w) first")

    def _route(self, h: torch.Tensor) -> torch.Tensor:
        if self.domain_ids.shape != (h.shape[0],):
            raise ValueError(f"domain_ids has shape {tuple(self.domain_ids.shape)}, expected ({h.shape[0]},)")
        if len(self.groups) == 1:  # the common case (domain-pure micro-batches): no gather/scatter
            return self.experts[self.groups[0][0]](h)
        out = torch.zeros_like(h)
        for d, rows in self.groups:  # each expert runs once, on its own rows [B_d, T, H]
            out = out.index_copy(0, rows, self.experts[d](h[rows]).to(out.dtype))
        return out

    def _mix(self, h: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        B, T, H = h.shape
        n = self.n_domains
        if weights.shape[-1] != n or weights.dim() > 3:
            raise ValueError(
                f"mixture weights have shape {tuple(weights.shape)}, expected [n], [B, n] or [B, T, n] with n={n}"
            )
        if weights.dim() == 2:
            weights = weights[:, None, :]  # [B, 1, n]
        w = weights.to(h.dtype).expand(B, T, n).reshape(B * T, n)  # [B*T, n]
        h_flat = h.reshape(B * T, H)
        out = torch.zeros_like(h_flat)
        for j in range(n):
            keep = w[:, j] != 0  # [B*T]
            if not bool(keep.any()):
                continue  # zero weight everywhere: this expert costs nothing
            if bool(keep.all()):
                out = out + w[:, j, None] * self.experts[j](h_flat)
            else:
                rows = keep.nonzero().squeeze(1)
                out = out.index_add(0, rows, w[rows, j, None] * self.experts[j](h_flat[rows]))
        return out.reshape(B, T, H)


def _layers(model: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks, each with an `.mlp`: GPT-2 `transformer.h`, Llama `model.layers`."""
    transformer = getattr(model, "transformer", None)
    if transformer is not None and hasattr(transformer, "h"):
        return transformer.h
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner.layers
    raise ElmError(f"DEMix supports GPT-2 and Llama causal LMs; got {type(model).__name__}")


def domain_mlps(model: PreTrainedModel) -> list[DomainMLP]:
    """Every layer's DomainMLP (raises if the model is not a DEMix model)."""
    mlps = [block.mlp for block in _layers(model)]
    require(all(isinstance(m, DomainMLP) for m in mlps), "model is not a DEMix model: call to_demix first")
    return mlps


def n_domains(model: PreTrainedModel) -> int:
    return domain_mlps(model)[0].n_domains


def to_demix(model: PreTrainedModel, n_domains: int) -> PreTrainedModel:
    """Swap every layer's MLP, in place, for a DomainMLP of `n_domains` copies of it; returns `model`.

    Every domain expert starts as an exact copy of the dense MLP (DEMix initialised from a
    dense checkpoint); from scratch they simply start from the same random init.
    """
    require(n_domains >= 1, f"n_domains must be >= 1, got {n_domains}")
    for block in _layers(model):
        require(not isinstance(block.mlp, DomainMLP), "model is already a DEMix model")
        block.mlp = DomainMLP([copy.deepcopy(block.mlp) for _ in range(n_domains)])
    return model


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def set_domains(model: PreTrainedModel, domain_ids: torch.Tensor) -> None:
    """Route sequence b of the next forward passes through domain `domain_ids[b]`'s MLPs only."""
    n = n_domains(model)
    ids = torch.as_tensor(domain_ids, dtype=torch.long)
    if ids.dim() != 1:
        raise ValueError(f"domain_ids must be 1-D [B], got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"domain ids must lie in [0, {n}), got {ids.tolist()}")
    # Group the rows once per batch (one host sync), not once per layer.
    groups = [(d, (ids == d).nonzero().squeeze(1)) for d in torch.unique(ids).tolist()]
    for mlp in domain_mlps(model):
        device = _device(mlp)
        mlp.domain_ids, mlp.weights = ids.to(device), None
        mlp.groups = [(d, rows.to(device)) for d, rows in groups]


def set_mixture(model: PreTrainedModel, weights: torch.Tensor) -> None:
    """Mix the domain MLP outputs with `weights` ([n], [B, n] or [B, T, n]; rows sum to 1)."""
    for mlp in domain_mlps(model):
        mlp.domain_ids, mlp.groups, mlp.weights = None, [], weights.to(_device(mlp))


def clear_routing(model: PreTrainedModel) -> None:
    for mlp in domain_mlps(model):
        mlp.domain_ids, mlp.groups, mlp.weights = None, [], None


# ---------------------------------------------------------------------------------------------
# Inference: the domain posterior, computed by the combine layer's own functions


class DomainView(nn.Module):
    """A DEMix model with only domain j's MLPs active: the j-th expert of the forest it stands for.

    Its forward pass routes every sequence through domain j and clears the routing after, so
    `expert_logprobs` scores a DEMix model's domains exactly as it scores a forest's experts.
    """

    def __init__(self, model: PreTrainedModel, domain: int):
        super().__init__()
        self.model, self.domain = model, domain

    def forward(self, input_ids: torch.Tensor) -> Any:
        set_domains(self.model, torch.full((input_ids.shape[0],), self.domain, dtype=torch.long))
        try:
            return self.model(input_ids)
        finally:
            clear_routing(self.model)


def domain_views(model: PreTrainedModel) -> list[DomainView]:
    """The n single-domain views of a DEMix model, in domain order."""
    return [DomainView(model, j) for j in range(n_domains(model))]


def domain_logprobs(model: PreTrainedModel, tokens: torch.Tensor, domains: Sequence[int]) -> torch.Tensor:
    """log p_j(x_t | x_<t) with only domain j's MLPs active, for j in `domains`: [B, T+1] -> [k, B, T].

    One forward pass per domain: exactly what an ensemble of the n "domain-j" models computes.
    """
    return expert_logprobs([DomainView(model, j) for j in domains], tokens, batch_size=len(tokens))


@torch.no_grad()
def demix_posterior(
    model: PreTrainedModel, tokens: torch.Tensor, prior: PriorLike, posterior: str = "one_step"
) -> torch.Tensor:
    """Per-position domain weights P(D=j | x_<t) for predicting tokens[:, 1:]: [B, T+1] -> [B, T, n].

    As `ensemble.posterior_log_weights` defines them (position 1 gets the prior; one_step adds
    the previous token's log-prob, full_prefix all previous ones). Domains with prior 0 are not
    run and get weight exactly 0, so a top-k prior costs k passes.
    """
    n = n_domains(model)
    p = normalise_prior(prior, n)  # float64 [n]
    active = [j for j in range(n) if p[j] > 0]
    lp = expert_logprobs(domain_views(model), tokens, batch_size=len(tokens), prior=p)  # [k, B, T]: active only
    w_active = posterior_log_weights(lp, p[active].log(), posterior).exp()  # [k, B, T]
    weights = torch.zeros(*lp.shape[1:], n, dtype=torch.float32, device=lp.device)  # [B, T, n]
    weights[..., active] = w_active.permute(1, 2, 0).float()
    return weights


@torch.no_grad()
def demix_logprobs(
    model: PreTrainedModel, tokens: torch.Tensor, prior: PriorLike, posterior: str = "one_step"
) -> torch.Tensor:
    """DEMix inference: log p(x_t | x_<t) for t = 1..T: tokens [B, T+1] -> float32 [B, T].

    k passes with one domain active give the per-position posterior (as a BTM ensemble computes
    it); one more pass mixes every layer's FFN outputs with those weights. Cost: k + 1 forward
    passes for a prior with k non-zero entries. A log-prob function for `evaluate`:
    `lambda t: demix_logprobs(model, t, prior)`. Leaves the model in eval mode, unrouted.
    """
    weights = demix_posterior(model, tokens, prior, posterior)  # [B, T, n]
    try:
        set_mixture(model, weights)
        return token_logprobs(model, tokens)
    finally:
        clear_routing(model)


@torch.no_grad()
def demix_cached_prior(
    model: PreTrainedModel,
    valid_windows: torch.Tensor | np.ndarray,
    batch_size: int = 4,
    alpha: float = 0.3,
    posterior: str = "one_step",
) -> torch.Tensor:
    """The cached domain prior (float64 [n]) estimated on validation windows ([N, T+1] token ids).

    `prior.cached_prior` with the n single-domain passes as the experts (scored in batches of
    `batch_size`): start uniform; per batch, average the posterior weights (under the current
    prior) over the batch's windows and positions, then prior <- (1 - alpha) * prior + alpha *
    mean (alpha = 0.3). The last value is frozen and used as the prior on the test split.
    """
    windows = torch.as_tensor(np.asarray(valid_windows, dtype=np.int64))  # [N, T+1]
    lp = expert_logprobs(domain_views(model), windows, batch_size)  # [n, N, T]
    return cached_prior(lp, batch_size, alpha, posterior)


# ---------------------------------------------------------------------------------------------
# On disk


def save_demix(model: PreTrainedModel, out: str | Path, domains: Sequence[str] | None = None) -> None:
    """Write `config.json`, `model.safetensors` (with checksum) and `demix.json` into folder `out`.

    Each file is written atomically through `checkpoint.save_weights` / `storage`; `demix.json`
    comes last, so a folder holding it is complete. `domains` names the n domains in order.
    """
    out = Path(out)
    n = n_domains(model)
    names = list(domains) if domains is not None else [f"domain{j}" for j in range(n)]
    require(len(names) == n, f"got {len(names)} domain names for a DEMix model with {n} domains")
    checkpoint.save_weights(model, out)
    meta = {"format": DEMIX_FORMAT, "n_domains": n, "domains": names, "model_type": model.config.model_type}
    storage.write_json(out / "demix.json", meta)


def load_demix(path: str | Path) -> tuple[PreTrainedModel, list[str]]:
    """Rebuild a DEMix model saved by `save_demix`; returns (model in eval mode, domain names)."""
    path = Path(path)
    meta_path = path / "demix.json"
    require(meta_path.is_file(), "missing demix.json (not a DEMix folder)", path)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ElmError(f"not valid JSON ({e.msg})", meta_path) from e
    fmt = meta.get("format")
    require(fmt == DEMIX_FORMAT, f"field 'format' must be {DEMIX_FORMAT!r}, got {fmt!r}", meta_path)
    n = meta.get("n_domains")
    require(isinstance(n, int) and n >= 1, f"field 'n_domains' must be a positive integer, got {n!r}", meta_path)
    names = meta.get("domains")
    require(isinstance(names, list) and len(names) == n, f"field 'domains' must list {n} names", meta_path)
    weights_path = path / checkpoint.WEIGHTS_NAME
    checkpoint.verify_weights(weights_path)  # missing, truncated or corrupted -> ElmError
    model = to_demix(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)), n)
    checkpoint.load_weights_into(model, load_file(str(weights_path)), weights_path)
    return model.eval(), [str(s) for s in names]
