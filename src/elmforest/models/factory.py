"""The model factory: named sizes, Hugging Face configs, fresh models, loading, parameter and FLOP counts.

Every model is a plain Hugging Face causal LM (`GPT2LMHeadModel` or `LlamaForCausalLM`), so an
expert folder loads anywhere with `AutoModelForCausalLM.from_pretrained`. Sizes follow the GPT-3
paper's table (as BTM uses them); `tiny` and `demo` are CPU sizes for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from elmforest import storage
from elmforest.models.checkpoint import save_weights, verify_weights
from elmforest.config import ModelConfig
from elmforest.errors import ElmError

Family = Literal["gpt2", "llama"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The architecture of one causal LM, independent of the Hugging Face config class."""

    family: Family
    """Hugging Face family: `gpt2` (learned positions, LayerNorm, GELU) or `llama` (RoPE, RMSNorm, SwiGLU)."""
    layers: int
    """Transformer blocks."""
    width: int
    """Hidden size d_model."""
    heads: int
    """Attention heads; `width` must divide evenly among them."""
    context: int
    """Context length in tokens (the training block size at most)."""
    vocab_size: int
    """Tokenizer vocabulary size."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output projection (lm_head)."""
    bos_token_id: int | None = None
    """The tokenizer's beginning-of-text id, recorded in the config (not architecture: `arch_hash` ignores it)."""
    eos_token_id: int | None = None
    """The tokenizer's end-of-text id, recorded in the config so generation stops there."""


# Named sizes. 125m/350m are GPT-3 Small/Medium (Brown et al. 2020, Table 2.1), the sizes BTM
# trains; `demo` is the pilot's 1.3M-parameter model (PILOT.md) at vocab 4096.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(family="gpt2", layers=2, width=64, heads=2, context=64),
    "demo": dict(family="gpt2", layers=4, width=128, heads=4, context=128),
    "125m": dict(family="gpt2", layers=12, width=768, heads=12, context=1024),
    "gpt3-small": dict(family="gpt2", layers=12, width=768, heads=12, context=1024),
    "350m": dict(family="gpt2", layers=24, width=1024, heads=16, context=1024),
}


def resolve_spec(
    cfg: ModelConfig, vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None
) -> ModelSpec:
    """Turn a recipe's `model:` section into a `ModelSpec`: the named size, then explicit fields override.

    The token ids are the tokenizer's (see `token_ids`); the config records them.
    `cfg.path` (start from an existing model folder) is not handled here: load that with `load_model`.
    """
    fields: dict[str, Any] = {"family": "gpt2"}
    if cfg.size is not None:
        if cfg.size not in SIZES:
            raise ElmError(f"model.size: unknown size {cfg.size!r} (known: {', '.join(SIZES)})")
        fields.update(SIZES[cfg.size])
    for name in ("family", "layers", "width", "heads", "context"):
        value = getattr(cfg, name)
        if value is not None:
            fields[name] = value
    for name in ("layers", "width", "heads", "context"):
        if name not in fields:
            raise ElmError(f"model.{name}: required when model.size is not set")
    width, heads = fields["width"], fields["heads"]
    if width % heads:
        raise ElmError(f"model.width: {width} does not divide evenly among model.heads={heads}")
    if fields["family"] == "llama" and (width // heads) % 2:
        raise ElmError(f"model.heads: llama needs an even head size for RoPE, got width/heads={width // heads}")
    if vocab_size < 2:
        raise ElmError(f"vocabulary size must be at least 2, got {vocab_size}")
    return ModelSpec(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **fields)


def token_ids(tokenizer) -> dict[str, int | None]:
    """The special ids a model config records, from the tokenizer (ours: both are `<|endoftext|>`)."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


def fill_token_ids(model: PreTrainedModel, ids: dict[str, int | None]) -> PreTrainedModel:
    """Set the config's (and generation config's) bos/eos ids the model lacks; ids it has are kept."""
    generation = getattr(model, "generation_config", None)
    for name, value in ids.items():
        for config in (model.config, generation):
            if config is not None and value is not None and getattr(config, name, None) is None:
                setattr(config, name, value)
    return model


def model_spec_dict(spec: ModelSpec) -> dict[str, Any]:
    """The spec as a JSON-able dict, for metadata files."""
    return dataclasses.asdict(spec)


def llama_intermediate_size(width: int) -> int:
    """SwiGLU hidden size: 2/3 of GPT's 4*width (three matrices instead of two keep ~8*d^2 MLP
    parameters per layer), rounded up to a multiple of 8."""
    return 8 * -(-width // 3)  # 8/3*width rounded up to a multiple of 8 = 8*ceil(width/3); 768 -> 2048


def hf_config(spec: ModelSpec) -> PretrainedConfig:
    """The Hugging Face config for `spec`: no dropout anywhere, bos/eos ids from the spec (the
    tokenizer's), so generation stops at the end-of-text token; pad stays unset."""
    if spec.family == "gpt2":
        return GPT2Config(
            vocab_size=spec.vocab_size,
            n_positions=spec.context,
            n_embd=spec.width,
            n_layer=spec.layers,
            n_head=spec.heads,
            n_inner=4 * spec.width,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=spec.tie_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
        )
    if spec.family == "llama":
        return LlamaConfig(
            vocab_size=spec.vocab_size,
            hidden_size=spec.width,
            intermediate_size=llama_intermediate_size(spec.width),
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=spec.context,
            attention_dropout=0.0,
            tie_word_embeddings=spec.tie_embeddings,
            bos_token_id=spec.bos_token_id,
            eos_token_id=spec.eos_token_id,
            pad_token_id=None,
        )
    raise ElmError(f"model.family: unknown family {spec.family!r} (known: gpt2, llama)")


def build_model(spec: ModelSpec, seed: int) -> PreTrainedModel:
    """A freshly initialised model; the same (spec, seed) always gives bit-identical weights.

    The init draws from a forked torch RNG seeded with `seed`, so the caller's RNG is untouched.
    """
    config = hf_config(spec)
    cls = GPT2LMHeadModel if spec.family == "gpt2" else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model


def load_model(path: str | Path) -> PreTrainedModel:
    """Load a local Hugging Face model folder (never the hub, never remote code), checksum first."""
    path = Path(path)
    if not path.is_dir():
        raise ElmError("model folder not found", path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise ElmError(f"not a model folder: no {name}", path)
    verify_weights(path / "model.safetensors")
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar per expert
    try:
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ElmError(f"cannot load the model: {str(e).splitlines()[0]}", path) from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_model(model: PreTrainedModel, path: str | Path, tokenizer_dir: str | Path | None = None) -> None:
    """Write a Hugging Face model folder: weights + config (see `checkpoint.save_weights`) and,
    when given, the tokenizer files copied from `tokenizer_dir`."""
    path = Path(path)
    save_weights(model, path)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, path)


def copy_tokenizer_files(tokenizer_dir: str | Path, folder: str | Path, overwrite: bool = True) -> None:
    """Copy a tokenizer's files into a (model) folder, each atomically, so AutoTokenizer loads it
    from there; with overwrite=False, files the folder already has are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file() and (overwrite or not (folder / name).is_file()):
            with storage.atomic_path(folder / name) as tmp:
                shutil.copyfile(src, tmp)


# Config fields that define the architecture (two models with equal values can be averaged and
# ensembled tensor by tensor). Names of both families; each config contributes those it has.
ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "tie_word_embeddings",
    # gpt2
    "n_layer",
    "n_embd",
    "n_head",
    "n_inner",
    "n_positions",
    "activation_function",
    "layer_norm_epsilon",
    # llama
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
)


def arch_hash(config: PretrainedConfig) -> str:
    """A short hash of the architecture-defining config fields (16 hex digits of a sha256)."""
    d = config.to_dict()
    picked = {k: d[k] for k in ARCH_FIELDS if k in d}
    blob = json.dumps(picked, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def param_count(model: torch.nn.Module) -> int:
    """Every parameter of the model; shared (tied) tensors count once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the token/position embeddings and the (untied) output projection, as in
    Kaplan et al. 2020's N. Shared (tied) tensors count once."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        embedding_ids |= {id(p) for p in output.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)


def _context_of(config: PretrainedConfig) -> int:
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ElmError(f"config of model type {config.model_type!r} has no context length")


def _width_of(config: PretrainedConfig) -> int:
    for name in ("n_embd", "hidden_size"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ElmError(f"config of model type {config.model_type!r} has no hidden size")


def _layers_of(config: PretrainedConfig) -> int:
    for name in ("n_layer", "num_hidden_layers"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ElmError(f"config of model type {config.model_type!r} has no layer count")


def flops_per_token(config: PretrainedConfig, context: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), Kaplan et al. 2020 / Chinchilla style.

    Forward, per token: 2*N multiply-adds through the non-embedding weights (N =
    `non_embedding_params`) plus the attention scores and weighted sum, 2*n_layer*n_ctx*d_model.
    The backward pass costs twice the forward, so training is x3:

        flops_per_token = 6*N + 6*n_layer*n_ctx*d_model

    n_ctx is the trained sequence length (`context`, default the config's context length).
    As in Kaplan et al., embedding look-ups and the logits matmul (2*d_model*vocab forward) are not
    counted; for small models with large vocabularies that matmul is a sizeable extra cost, but it is
    the same for every arm of a study, so compute matching is unaffected. `measured_flops_per_token`
    counts what a GPU really multiplies (logits, the full attention square) for MFU figures.
    """
    with torch.device("meta"):  # count parameters without allocating them
        model = AutoModelForCausalLM.from_config(config)
    n = non_embedding_params(model)
    n_ctx = context if context is not None else _context_of(config)
    return 6 * n + 6 * _layers_of(config) * n_ctx * _width_of(config)


def measured_flops_per_token(
    model: PreTrainedModel, context: int, batch: int = 1, ids: torch.Tensor | None = None
) -> float:
    """Training FLOPs per token of one forward + backward pass, counted by torch's FlopCounterMode.

    Runs `batch` random windows of `context` tokens (or the given windows `ids` [B, T+1], which
    then set batch and context) on the model's device (next-token loss as in
    `training.train`, gradients put back as they were afterwards) and counts every matrix product
    at 2 FLOPs per multiply-add. Two settings make the count mean the same on every device:
    attention runs on SDPA's math backend, so its products are plain `bmm`s the counter sees
    (the fused CPU kernel is invisible to it, the CUDA ones are counted with a recomputation of
    the scores), and a mixture-of-experts model runs its experts one `linear` at a time ("eager"),
    so exactly the routed tokens' expert products are counted (grouped matmuls are invisible).

    For a dense GPT-2 or Llama model the count is, per token,

        6*N_matmul + 12*n_layer*n_ctx*d_model + 6*d_model*vocab

    N_matmul: the weights of the linear layers (N of `flops_per_token` less biases and norm gains,
    which cost elementwise work the counter ignores); 12*L*n_ctx*d: QK^T and the weighted sum
    over the full n_ctx x n_ctx square (forward 4*L*n_ctx*d, backward twice that; no causal
    saving), where `flops_per_token` counts 6*L*n_ctx*d; 6*d*vocab: the logits matmul, which
    `flops_per_token` leaves out. tests/test_flops.py checks this to the FLOP.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]  # the caller's gradients, restored below
    for p in params:
        p.grad = None
    experts = getattr(model.config, "_experts_implementation", None)
    switch = experts not in (None, "eager") and hasattr(model, "set_experts_implementation")
    was_training = model.training
    device = next(model.parameters()).device
    if ids is None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (batch, context + 1), generator=generator)
    batch, context = ids.shape[0], ids.shape[1] - 1
    ids = ids.to(device)
    counter = FlopCounterMode(display=False)
    try:
        if switch:
            model.set_experts_implementation("eager")
        model.train()
        with counter, sdpa_kernel(SDPBackend.MATH):
            logits = model(input_ids=ids[:, :-1], use_cache=False).logits  # [batch, context, vocab]
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
    finally:
        if switch:
            model.set_experts_implementation(experts)
        model.train(was_training)
        for p, g in zip(params, grads):
            p.grad = g
    return counter.get_total_flops() / (batch * context)
