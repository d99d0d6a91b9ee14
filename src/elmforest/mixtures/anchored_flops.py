"""Honest training FLOPs of an anchored expert, counted and derived, beside a BTM expert's.

An anchored expert's forward runs the whole 2-expert mixture (the seed's MLP and the copy on every
token). Its backward computes weight gradients only for the copies and their router rows, but
activation gradients still flow through every frozen part between the loss and a trainable tensor:
the lm_head, and above layer 0 each layer's attention, the seed's MLP and the router. Nothing below
layer 0's mixture needs a gradient (the embeddings and layer 0's attention are frozen and feed it).

Per token, with L layers, a = attention weights per layer (q, k, v, o), m = 3*H*I (one MLP's
weights), c = the attention scores and weighted sum (forward), h = 2*H*V (the logits matmul,
forward), g = (2L+1)*H norm gains, and 2 FLOPs per multiply-add:

    BTM expert   3 * (2*L*(a + m) + h + 2g) + 3*L*c            (every tensor trains: backward = 2 x forward)
    anchored     forward   L*(2a + c + 4m + 4H) + h + 2g        (two MLPs and the 2-row router per layer)
                 backward  h                                    (lm_head: input gradient only)
                         + 2m + 2*H*I + 4H                      (layer 0: the copy's weight gradients, its
                                                                 down_proj input gradient, the router rows)
                         + (L-1) * (2a + 2c + 6m + 8H)          (each layer above: attention and seed-MLP
                                                                 input gradients, the copy's input and weight
                                                                 gradients, the router's both)
                         + 2*(2L-1)*H                           (input gradients of the norms above layer 0)

Two conventions fill in c, h and g. "counter" is what `torch.utils.flop_counter.FlopCounterMode`
sees: every matmul, the full T x T attention (c = 4*T*P, P = heads x head size), the logits matmul
(h = 2*H*V), no elementwise work (g = 0). "kaplan" is the study's FLOPs axis
(`models.flops_per_token`): non-embedding weights with the norm gains counted as weights, c = 2*T*H,
h = 0; for a BTM expert it equals `models.flops_per_token(config, T)` exactly.
`measured_step_flops` counts one real training step with the counter (eager attention, so the
attention matmuls are visible to it on every device; CPU SDPA kernels are not counted by it).
`anchored.train_anchored_expert` hands the "kaplan" anchored figure to the training loop
(`train(..., flops_per_token=...)`), so train/metrics.jsonl and train.json count anchored.json's `flops`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from elmforest.errors import require
from elmforest.models.factory import measured_flops_per_token

CONVENTIONS = ("counter", "kaplan")


def step_flops_per_token(config: PretrainedConfig, context: int, *, anchored: bool, convention: str = "counter") -> int:
    """Training FLOPs per token (forward + backward) of a llama-family config trained at `context`
    tokens: a BTM expert (`anchored=False`) or its anchored expert; the module docstring's formula."""
    require(convention in CONVENTIONS, f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    L, H, I, V, T = (
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size, context,
    )
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    P, K = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    a = H * P + 2 * H * K + P * H  # q, k, v, o weights
    m = 3 * H * I
    if convention == "counter":
        c, h, g, g_back = 4 * T * P, 2 * H * V, 0, 0
    else:
        c, h, g, g_back = 2 * T * H, 0, (2 * L + 1) * H, (2 * L - 1) * H
    if not anchored:
        return 3 * (2 * L * (a + m) + h + 2 * g) + 3 * L * c
    forward = L * (2 * a + c + 4 * m + 4 * H) + h + 2 * g
    backward = h + (2 * m + 2 * H * I + 4 * H) + (L - 1) * (2 * a + 2 * c + 6 * m + 8 * H) + 2 * g_back
    return forward + backward


def measured_step_flops(model: PreTrainedModel, batch: torch.Tensor) -> int:
    """FLOPs of one training step's forward and backward (next-token cross-entropy) on `batch`
    [B, T+1], counted by FlopCounterMode (`models.measured_flops_per_token`, which leaves the
    caller's gradients as they were); the optimizer is not involved (its update is no matmul)."""
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    return round(measured_flops_per_token(model, batch.shape[1] - 1, ids=batch) * tokens)


def anchored_training_flops(seed: PreTrainedModel, anchored: PreTrainedModel, batch: torch.Tensor) -> dict[str, Any]:
    """Per-token training FLOPs of an anchored expert (`anchored`, e.g. `anchored.anchor` of a copy
    of the seed) and of a BTM expert branched from the same llama `seed` (left untouched), on
    windows `batch` [B, T+1]:

    {"context": T, "measured": {"anchored", "btm_expert"} (FlopCounterMode, one real step),
     "analytic": the same from the formula, "kaplan": the study's axis, "anchored_over_btm": the
     measured ratio}."""
    T = batch.shape[1] - 1
    tokens = batch.shape[0] * T
    plain = copy.deepcopy(seed).requires_grad_(True)
    measured = {
        "anchored": measured_step_flops(anchored, batch) / tokens,
        "btm_expert": measured_step_flops(plain, batch) / tokens,
    }
    formula = {
        conv: {
            "anchored": step_flops_per_token(seed.config, T, anchored=True, convention=conv),
            "btm_expert": step_flops_per_token(seed.config, T, anchored=False, convention=conv),
        }
        for conv in CONVENTIONS
    }
    return {
        "context": T,
        "measured": measured,
        "analytic": formula["counter"],
        "kaplan": formula["kaplan"],
        "anchored_over_btm": measured["anchored"] / measured["btm_expert"],
    }
