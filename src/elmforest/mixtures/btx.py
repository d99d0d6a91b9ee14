"""BTX: Branch-Train-MiX (Sukhbaatar et al. 2024) — experts mixed into one Mixtral MoE model.

After BTM has trained n llama-family experts, BTX builds one sparse mixture-of-experts model:
  - every layer's feed-forward block becomes a Mixtral sparse MoE block whose expert i is
    expert model i's MLP, copied exactly;
  - every other parameter (embeddings, attention, norms, lm_head) is the weighted average of
    the experts' (uniform by default), as in BTM parameter averaging;
  - a new router per layer (`mlp.gate`, a bias-free [n, hidden] linear map) starts small and
    random, and is then fine-tuned (`finetune_router`), with Mixtral's load-balancing loss,
    through the one training loop (`train.loop.train`, the aux loss its extra loss term, the MoE's
    own FLOPs per token its count): resumable and bit-identical on resume.

Mixtral's expert MLP is exactly Llama's:  down(act(gate(h)) * up(h))  (w1=gate, w3=up, w2=down
in Mixtral's old naming). In transformers 5.x the experts are stored fused, one 3-D tensor per
layer: `experts.gate_up_proj[i] = cat([gate_i, up_i])` of shape [2*I, H] (the forward splits its
output in two halves, gate first) and `experts.down_proj[i] = down_i` of shape [H, I]. The
router softmaxes its logits, keeps the top-k and renormalises them to sum to 1, so with
identical experts the MoE block equals the dense MLP whatever the router says.

GPT-2 experts cannot be exported: their MLP is ungated (GELU(h W + b) W' + b', with biases),
and they use LayerNorm with bias, biased attention and learned absolute positions, none of which
a MixtralForCausalLM can represent. Only llama-family experts are accepted.

`assemble_mixtral` builds a Mixtral from parts (shared tensors, each expert's MLP per layer, the
router rows); BTX and the anchored mixtures (`elmforest.mixtures.anchored`) both go through it.
`save_moe` writes a standard Hugging Face folder: `AutoModelForCausalLM.from_pretrained(dir)`
loads a MixtralForCausalLM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel

from elmforest import storage
from elmforest.errors import ElmError, require
from elmforest.models.factory import non_embedding_params
from elmforest.train.spec import ExtraLoss, FlopsPerToken, TrainSpec
from elmforest.train.loop import train
from elmforest.train.state import read_metrics

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


def mixtral_config(base, n_experts: int, top_k: int) -> MixtralConfig:
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


# One expert's feed-forward block in one layer, in Mixtral's fused form: (gate_up [2I, H], down [H, I]).
ExpertMLP = tuple[torch.Tensor, torch.Tensor]


def llama_mlps(state: Mapping[str, torch.Tensor], layers: int) -> list[ExpertMLP]:
    """A llama model's MLP in every layer as (cat([gate, up]) [2I, H], down [H, I])."""
    out = []
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp."
        gate_up = torch.cat([state[prefix + "gate_proj.weight"], state[prefix + "up_proj.weight"]])
        out.append((gate_up, state[prefix + "down_proj.weight"]))
    return out


def mixtral_mlps(state: Mapping[str, torch.Tensor], layers: int, expert: int) -> list[ExpertMLP]:
    """Expert `expert`'s MLP in every layer of a Mixtral state dict."""
    return [
        (state[f"model.layers.{layer}.mlp.experts.gate_up_proj"][expert], state[f"model.layers.{layer}.mlp.experts.down_proj"][expert])
        for layer in range(layers)
    ]


@torch.no_grad()
def assemble_mixtral(
    config: MixtralConfig,
    shared: Mapping[str, torch.Tensor],
    experts: Sequence[Sequence[ExpertMLP]],
    routers: Sequence[torch.Tensor],
) -> MixtralForCausalLM:
    """A MixtralForCausalLM (CPU, float32, eval mode) from its parts.

    shared: every tensor outside the MoE blocks (embeddings, attention, norms, lm_head) under its
    llama name, which is also its Mixtral name. experts[i][l]: expert i's MLP in layer l as
    (gate_up [2I, H], down [H, I]). routers[l]: layer l's router rows [n, H], row i for expert i.
    """
    n, layers = config.num_local_experts, config.num_hidden_layers
    require(len(experts) == n, f"{len(experts)} experts given for a {n}-expert Mixtral")
    require(all(len(e) == layers for e in experts) and len(routers) == layers, f"every expert and router needs {layers} layers")
    moe = MixtralForCausalLM(config)  # built on the CPU in float32, filled below
    target: dict[str, torch.Tensor] = {}
    for key in moe.state_dict():
        if ".mlp." in key:
            layer = int(key.split(".")[2])  # model.layers.<l>.mlp...
            if key.endswith(".mlp.gate.weight"):  # [n, H]
                target[key] = routers[layer]
            elif key.endswith(".mlp.experts.gate_up_proj"):  # [n, 2I, H]
                target[key] = torch.stack([e[layer][0] for e in experts])
            elif key.endswith(".mlp.experts.down_proj"):  # [n, H, I]
                target[key] = torch.stack([e[layer][1] for e in experts])
        elif key == "lm_head.weight" and key not in shared and config.tie_word_embeddings:
            target[key] = shared["model.embed_tokens.weight"]  # a tied alias dropped on save
        elif key in shared:
            target[key] = shared[key]
        else:
            raise ElmError(f"Mixtral tensor {key!r} has no counterpart in the llama model")
    moe.load_state_dict({k: v.float() for k, v in target.items()}, strict=True)
    return moe.eval()


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
    config = mixtral_config(base, n, top_k)
    dtype, device = next(models[0].parameters()).dtype, next(models[0].parameters()).device
    states = [m.state_dict() for m in models]
    layers = config.num_hidden_layers
    # embeddings, attention, norms, lm_head: the weighted average, summed in float64
    shared = {k: sum(float(wi) * s[k].double() for wi, s in zip(w, states)) for k in states[0] if ".mlp." not in k}
    generator = torch.Generator().manual_seed(seed)  # routers: new, small random, [n, H] per layer
    routers = [torch.randn(n, config.hidden_size, generator=generator) * config.initializer_range for _ in range(layers)]
    moe = assemble_mixtral(config, shared, [llama_mlps(s, layers) for s in states], routers)
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


def load_balancing(coef: float) -> ExtraLoss | None:
    """`coef` x Mixtral's load-balancing loss as the training loop's extra loss term (None for 0).

    The loop asks the forward for the router logits (output_router_logits=True), and the Mixtral
    returns `aux_loss` = n * sum_i f_i * P_i over the logits of every layer pooled (Switch
    Transformer; f_i the fraction of tokens with expert i among their top-k, P_i expert i's mean
    router probability); the loop back-propagates (cross-entropy + coef * aux_loss) / micro-batches
    and logs the cross-entropy alone. With top_k == n the aux loss is the constant n (no signal).
    """
    if coef == 0:
        return None
    return ExtraLoss(term=lambda out: coef * out.aux_loss, forward_kwargs={"output_router_logits": True})


def finetune_flops_per_token(moe: MixtralForCausalLM, train_all: bool) -> FlopsPerToken:
    """Training FLOPs per token of a BTX fine-tune at a block length, Kaplan's convention: the MoE's
    forward (`moe_flops_per_token`) x 3 when every tensor trains, x 2 when only the routers do
    (activation gradients still flow through every layer; the frozen weights' gradients are skipped)."""
    passes = 3 if train_all else 2

    def per_token(block: int) -> int:
        return passes * moe_flops_per_token(moe, block)["moe"]

    return per_token


def router_spec(steps: int, lr: float, device: str = "cpu", threads: int | None = None, checkpoint_every: int = 50) -> TrainSpec:
    """Router fine-tuning's hyper-parameters: AdamW betas (0.9, 0.95), no weight decay, gradient
    norm clipped to 1.0, constant `lr` (no warm-up or decay), one micro-batch per step, every
    step logged (metrics.jsonl holds each step's cross-entropy)."""
    return TrainSpec(
        lr=lr, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=0, total_steps=steps, final_lr_fraction=1.0,
        grad_clip=1.0, micro_batches=1, threads=threads, log_every=1, checkpoint_every=checkpoint_every,
        device=device,
    )


def finetune_router(
    moe: MixtralForCausalLM,
    sampler,
    spec: TrainSpec,
    out_dir: str | Path,
    *,
    context: int,
    train_all: bool = False,
    aux_loss_coef: float = 0.01,
    stop_at_step: int | None = None,
    progress: bool = False,
) -> dict:
    """Fine-tune a Mixtral MoE in place; by default only the routers. Returns metrics.

    Runs through the one training loop (`train.loop.train`) into `out_dir`: a killed or stopped
    fine-tune continues from out_dir's last checkpoint (weights, AdamW, step, sampler, RNG), bit-
    identically to a run that never stopped; out_dir then holds the Mixtral folder (config.json,
    model.safetensors) beside train_state.pt and metrics.jsonl. sampler: any `train.spec.Sampler`
    of [B, context+1] windows; spec: e.g. `router_spec(steps, lr)`. Loss per step: cross-entropy
    + aux_loss_coef * Mixtral's load-balancing loss (Switch Transformer: n * sum_i f_i * P_i, f_i
    the fraction of tokens with expert i among their top-k and P_i its mean router probability,
    pooled over all layers), the loop's extra loss term (`load_balancing`). With top_k == n the aux
    loss is the constant n (no signal). `losses` in the result are the per-step cross-entropies
    (without the aux term).

    Compute, honestly: router-only training still runs the full forward and back-propagates
    through every layer's activations (the routers sit in every layer, down to the first),
    skipping only the frozen weights' gradients: about 2x the forward FLOPs per token, against
    3x for train_all. Each forward is the MoE's (top_k expert MLPs + routers per token), more
    than one dense expert's; both per-token figures are returned. The loop counts the same
    figure (`finetune_flops_per_token`), so metrics.jsonl's flops and MFU agree with `flops`.
    """
    per_token = finetune_flops_per_token(moe, train_all)
    routers = {id(p) for p in router_parameters(moe)}
    flags = {p: p.requires_grad for p in moe.parameters()}
    was_training = moe.training
    for p in moe.parameters():  # frozen weights get no .grad: their weight-gradient matmuls are skipped
        p.requires_grad_(train_all or id(p) in routers)
    trained = sum(p.numel() for p in moe.parameters() if p.requires_grad)
    try:
        result = train(
            moe, sampler, spec, out_dir, stop_at_step=stop_at_step, progress=progress,
            extra_loss=load_balancing(aux_loss_coef), flops_per_token=per_token,
        )
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        moe.train(was_training)
    losses = [row["loss"] for row in read_metrics(Path(out_dir) / "metrics.jsonl")]
    fwd = moe_flops_per_token(moe, context)
    return {
        "steps": result["steps"],
        "tokens": result["tokens"],
        "train_all": train_all,
        "trained_params": trained,
        "flops": per_token(context) * result["tokens"],  # the loop's count: blocks of `context` tokens
        "flops_per_token_moe_forward": fwd["moe"],
        "flops_per_token_dense_expert_forward": fwd["dense_expert"],
        "loss_first": losses[0] if losses else None,
        "loss_last": result["final_loss"],
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
