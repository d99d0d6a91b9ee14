"""BTX: Branch-Train-MiX (Sukhbaatar et al. 2024) — experts mixed into one Mixtral MoE model.

After BTM has trained n llama-family experts, BTX builds one sparse mixture-of-experts model:
  - every layer's feed-forward block becomes a Mixtral sparse MoE block whose expert i is
    expert model i's MLP, copied exactly;
  - every other parameter (embeddings, attention, norms, lm_head) is the weighted average of
    the experts' (uniform by default), as in BTM parameter averaging;
  - a new router per layer (`mlp.gate`, a bias-free [n, hidden] linear map) starts small and
    random, and is then fine-tuned (`finetune_router`), with Mixtral's load-balancing loss.

Mixtral's expert MLP is exactly Llama's:  down(act(gate(h)) * up(h))  (w1=gate, w3=up, w2=down
in Mixtral's old naming). In transformers 5.x the experts are stored fused, one 3-D tensor per
layer: `experts.gate_up_proj[i] = cat([gate_i, up_i])` of shape [2*I, H] (the forward splits its
output in two halves, gate first) and `experts.down_proj[i] = down_i` of shape [H, I]. The
router softmaxes its logits, keeps the top-k and renormalises them to sum to 1, so with
identical experts the MoE block equals the dense MLP whatever the router says.

GPT-2 experts cannot be exported: their MLP is ungated (GELU(h W + b) W' + b', with biases),
and they use LayerNorm with bias, biased attention and learned absolute positions, none of which
a MixtralForCausalLM can represent. Only llama-family experts are accepted.

`save_moe` writes a standard Hugging Face folder: `AutoModelForCausalLM.from_pretrained(dir)`
loads a MixtralForCausalLM.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

from elmforest import storage
from elmforest.errors import ElmError, require
from elmforest.models import non_embedding_params

# Llama config fields the experts must share (same architecture) and that carry into Mixtral.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
)


def _check_experts(models: Sequence[PreTrainedModel]) -> None:
    require(len(models) >= 1, "BTX needs at least one expert")
    for i, m in enumerate(models):
        kind = getattr(m.config, "model_type", type(m).__name__)
        if kind != "llama":
            raise ElmError(
                f"BTX export needs llama-family experts; expert {i} is {kind!r} (a GPT-2 MLP is ungated "
                "with biases, and its LayerNorms, biased attention and learned positions have no "
                "Mixtral counterpart): train the forest with a llama architecture"
            )
    base = models[0].config
    for i, m in enumerate(models[1:], start=1):
        for field in _SHARED_FIELDS:
            a, b = getattr(base, field, None), getattr(m.config, field, None)
            require(
                a == b,
                f"BTX experts must share one architecture: config field {field!r} is {a!r} in expert 0 "
                f"but {b!r} in expert {i}",
            )
    for field, what in (("attention_bias", "attention projections"), ("mlp_bias", "expert MLPs")):
        require(not getattr(base, field, False), f"BTX: Mixtral {what} have no biases; the experts have {field}=true")


def _mixtral_config(base, n_experts: int, top_k: int) -> MixtralConfig:
    """A Mixtral config with the experts' dense architecture and n experts per layer."""
    return MixtralConfig(
        **{f: getattr(base, f) for f in _SHARED_FIELDS if f not in ("attention_bias", "mlp_bias")},
        initializer_range=base.initializer_range,
        attention_dropout=base.attention_dropout,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        sliding_window=None,  # full causal attention, like llama
        num_local_experts=n_experts,
        num_experts_per_tok=top_k,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


@torch.no_grad()
def mix_experts(
    models: Sequence[PreTrainedModel], weights: Sequence[float] | None = None, top_k: int = 2, seed: int = 0
) -> MixtralForCausalLM:
    """Mix llama-family experts into one MixtralForCausalLM (BTX), on expert 0's device and dtype, in eval mode.

    weights: one non-negative number per expert for the averaged (non-MLP) parameters; they
    are normalised to sum to 1 (None: uniform). top_k: experts used per token (1..n).
    seed: the routers' initialisation, N(0, initializer_range^2) from this seed.
    """
    _check_experts(models)
    n = len(models)
    require(1 <= top_k <= n, f"top_k must lie in [1, {n}] for {n} experts, got {top_k}")
    w = torch.tensor([1.0] * n if weights is None else list(weights), dtype=torch.float64)
    require(w.shape == (n,), f"got {w.numel()} weights for {n} experts")
    ok = bool((w >= 0).all()) and float(w.sum()) > 0
    require(ok, f"weights must be non-negative and not all zero, got {w.tolist()}")
    w = w / w.sum()

    base = models[0].config
    config = _mixtral_config(base, n, top_k)
    dtype, device = next(models[0].parameters()).dtype, next(models[0].parameters()).device
    moe = MixtralForCausalLM(config)  # built on the CPU in float32, filled below
    states = [m.state_dict() for m in models]
    generator = torch.Generator().manual_seed(seed)
    target: dict[str, torch.Tensor] = {}
    for key, param in moe.state_dict().items():
        if key.endswith(".mlp.gate.weight"):  # the router, [n, H]: new, small random
            target[key] = torch.randn(param.shape, generator=generator) * config.initializer_range
        elif key.endswith(".mlp.experts.gate_up_proj"):  # [n, 2I, H]: expert i's [gate_i; up_i]
            prefix = key.removesuffix("experts.gate_up_proj")
            gate_up = [torch.cat([s[prefix + "gate_proj.weight"], s[prefix + "up_proj.weight"]]) for s in states]
            target[key] = torch.stack(gate_up)
        elif key.endswith(".mlp.experts.down_proj"):  # [n, H, I]: expert i's down
            prefix = key.removesuffix("experts.down_proj")
            target[key] = torch.stack([s[prefix + "down_proj.weight"] for s in states])
        else:  # embeddings, attention, norms, lm_head: the weighted average, summed in float64
            if key not in states[0]:
                raise ElmError(f"BTX: Mixtral tensor {key!r} has no counterpart in the llama experts")
            target[key] = sum(float(wi) * s[key].double() for wi, s in zip(w, states))
    moe.load_state_dict({k: v.to(dtype) for k, v in target.items()}, strict=True)
    return moe.to(device=device, dtype=dtype).eval()


def router_parameters(moe: MixtralForCausalLM) -> list[torch.nn.Parameter]:
    """The routers (`model.layers.*.mlp.gate.weight`), the only new parameters of a BTX model."""
    return [p for name, p in moe.named_parameters() if name.endswith(".mlp.gate.weight")]


def moe_flops_per_token(moe: MixtralForCausalLM, context: int) -> dict[str, int]:
    """Forward FLOPs per token of the MoE and, for comparison, of one dense expert.

    The convention of `models.flops_per_token` (Kaplan et al.): 2 FLOPs per multiply-add with
    every non-embedding weight a token touches, plus 2 * n_layer * n_ctx * d_model for the
    attention scores; embeddings and the logits matmul are not counted. A token touches the
    attention, the router [n, H] and top_k of the n expert MLPs (3 * H * I weights each), so

        N_moe   = N_all - n_layer * (n - top_k) * 3 * H * I
        N_dense = N_all - n_layer * ((n - 1) * 3 * H * I + n * H)     (one expert, no router)

    With top_k = 2 every token costs one MLP more than in a dense expert: the honest extra
    compute of BTX at training and at inference. Training multiplies by 3 (`flops_per_token`).
    """
    cfg = moe.config
    L, H, I = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    n, k = cfg.num_local_experts, cfg.num_experts_per_tok
    n_all = non_embedding_params(moe)  # every expert and router
    attention_scores = 2 * L * context * H
    n_moe = n_all - L * (n - k) * 3 * H * I
    n_dense = n_all - L * ((n - 1) * 3 * H * I + n * H)
    return {"moe": 2 * n_moe + attention_scores, "dense_expert": 2 * n_dense + attention_scores}


def finetune_router(
    moe: MixtralForCausalLM,
    batches: Iterable[torch.Tensor],
    steps: int,
    lr: float,
    train_all: bool = False,
    aux_loss_coef: float = 0.01,
) -> dict:
    """Fine-tune a BTX model; by default only the routers. Returns metrics.

    batches: token windows LongTensor[B, T+1] (inputs [:, :-1], targets [:, 1:]), cycled if
    fewer than `steps`. Loss per step: cross-entropy + aux_loss_coef * Mixtral's
    load-balancing loss (Switch Transformer: n * sum_i f_i * P_i, f_i the fraction of top-k
    slots routed to expert i and P_i its mean router probability, pooled over all layers).
    AdamW, betas (0.9, 0.95), no weight decay, gradient norm clipped to 1.0, constant lr.
    `losses` in the result are the cross-entropies (without the aux term), one per step. With
    top_k == n every token uses every expert and the aux loss is the constant n (no signal).

    Compute, honestly: router-only training still runs the full forward and back-propagates
    through every layer's activations (the routers sit in every layer, down to the first),
    skipping only the frozen weights' gradients: about 2x the forward FLOPs per token, against
    3x for train_all. Each forward is the MoE's (top_k expert MLPs + routers per token), more
    than one dense expert's; both per-token figures are returned.
    """
    require(steps >= 1, f"steps must be >= 1, got {steps}")
    require(lr > 0, f"lr must be > 0, got {lr}")
    routers = router_parameters(moe)
    trained = list(moe.parameters()) if train_all else routers
    router_ids = {id(p) for p in routers}
    frozen_flags = {p: p.requires_grad for p in moe.parameters()}
    was_training = moe.training
    for p in moe.parameters():  # frozen weights get no .grad: their weight-gradient matmuls are skipped
        p.requires_grad_(train_all or id(p) in router_ids)
    optimizer = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    device = next(moe.parameters()).device
    losses, aux_losses, tokens, seq_len = [], [], 0, 0
    moe.train()
    try:
        for _step, batch in zip(range(steps), itertools.cycle(batches)):
            batch = batch.to(device)
            x, y = batch[:, :-1], batch[:, 1:]  # [B, T] each
            out = moe(input_ids=x, output_router_logits=True)
            ce = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())
            loss = ce + aux_loss_coef * out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            losses.append(float(ce.detach()))
            aux_losses.append(float(out.aux_loss.detach()))
            tokens += y.numel()
            seq_len = y.shape[1]
    finally:
        for p, flag in frozen_flags.items():
            p.requires_grad_(flag)
        moe.train(was_training)
    fwd = moe_flops_per_token(moe, seq_len)
    passes = 3 if train_all else 2  # forward + backward (activation grads [+ weight grads])
    return {
        "steps": len(losses),
        "tokens": tokens,
        "train_all": train_all,
        "trained_params": sum(p.numel() for p in trained),
        "flops": passes * fwd["moe"] * tokens,
        "flops_per_token_moe_forward": fwd["moe"],
        "flops_per_token_dense_expert_forward": fwd["dense_expert"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "aux_loss_last": aux_losses[-1],
        "losses": losses,
    }


def save_moe(moe: MixtralForCausalLM, out: str | Path) -> None:
    """Write `moe` as a standard Hugging Face folder (config.json + safetensors), atomically.

    `out` must not exist yet; `AutoModelForCausalLM.from_pretrained(out)` loads it back.
    """
    out = Path(out)
    require(not out.exists(), "already exists; choose a new folder for the BTX model", out)
    with storage.atomic_dir(out) as tmp:
        moe.save_pretrained(tmp)
