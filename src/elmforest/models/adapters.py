"""Adapter experts: LoRA adapters (through PEFT) on a shared, frozen base model.

An adapter expert is a PEFT LoRA adapter in PEFT's own format (`adapter_config.json` +
`adapter_model.safetensors`, loadable with `PeftModel.from_pretrained(base, folder)`); the base is
a complete model folder stored once and named by its content hash (`base_sha256`). Each adapted
weight W0 [d_out, d_in] of the base becomes, in the forward pass,

    W = W0 + scale * B @ A        A [r, d_in], B [d_out, r], scale = alpha / r

with only A and B trainable (B starts at zero, so a fresh adapter is the base exactly).

    AdapterConfig        r, alpha, dropout, target_modules (default: the family's attention and MLP
                         projections, `DEFAULT_TARGETS`); defined in `elmforest.config`, where it is the
                         recipe's `experts:` section
    attach               base model -> PeftModel with the base frozen (injected in place)
    save_adapter         the PEFT files, atomically, the weights with our sha256 checksum
    load_adapter_model   base folder + adapter folder -> PeftModel (checksums verified first)
    merged_adapter_model base folder + adapter folder -> the base's plain model with W0 + scale * B A
    adapter_flops_per_token   honest training FLOPs per token of a frozen base plus adapters

The training loop (`train.loop.train`) trains a PeftModel like any model: its optimizer sees only
trainable tensors, and its run folder holds the adapter files (`is_adapter_model` tells it which).
peft is an optional dependency (the `adapters` extra): it is imported only by the functions that
need it, and `is_adapter_model` never imports it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from elmforest import storage
from elmforest.config import AdapterConfig  # the recipe's `experts` section (re-exported here)
from elmforest.errors import ElmError, require
from elmforest.models.checkpoint import WEIGHTS_NAME, WeightsHasher, verify_weights, write_safetensors
from elmforest.models.factory import _layers_of, _width_of, load_model, non_embedding_params

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# The projections of block 0 that read the block's input (the frozen embeddings, through a frozen
# norm): no gradient flows into their input, so their backward computes no input gradient.
FIRST_INPUT_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
    "gpt2": ("transformer.h.0.attn.c_attn",),
}


def is_adapter_model(model: Any) -> bool:
    """True for a PEFT model (never imports peft: if it was never imported, nothing is a PeftModel)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def attach(base_model: torch.nn.Module, cfg: AdapterConfig, seed: int | None = None) -> Any:
    """Wrap `base_model` (modified in place: LoRA layers are injected) in a PeftModel with every base
    tensor frozen and only the adapters' A and B trainable. `seed`: the A matrices' random init draws
    from a forked RNG seeded with it (None: the caller's RNG); B starts at zero."""
    from peft import LoraConfig, get_peft_model

    model_type = base_model.config.model_type
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.targets_for(model_type),
        fan_in_fan_out=model_type == "gpt2",  # GPT-2's Conv1D stores W as [d_in, d_out]
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        if seed is None:
            model = get_peft_model(base_model, lora)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = get_peft_model(base_model, lora)
    except ValueError as e:  # e.g. a target module the model does not have
        raise ElmError(f"experts.target_modules: {str(e).splitlines()[0]}") from None
    for name, p in model.named_parameters():
        assert p.requires_grad == ("lora_" in name), name  # the base is frozen, the adapters train
    return model


def adapter_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file names (`...q_proj.lora_A.weight`), detached, on CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_weights(model: Any, tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Copy adapter tensors (as `adapter_state_dict` names them) into `model`; every name must match."""
    from peft import set_peft_model_state_dict

    expected = adapter_state_dict(model)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ElmError(f"adapter weights do not match the model ({what})", source)
    for name, t in tensors.items():
        require(tuple(t.shape) == tuple(expected[name].shape),
                f"adapter tensor {name!r} has shape {tuple(t.shape)}, the model {tuple(expected[name].shape)}", source)
    set_peft_model_state_dict(model, dict(tensors))


def save_adapter(model: Any, folder: str | Path) -> str:
    """Write PEFT's files for `model`'s adapter into `folder`, each atomically; returns the checksum.

    adapter_model.safetensors holds `adapter_state_dict` (with the sha256 metadata of every
    checkpoint here; PEFT ignores it), adapter_config.json the LoraConfig as PEFT writes it."""
    folder = Path(folder)
    digest = write_safetensors(adapter_state_dict(model), folder / ADAPTER_WEIGHTS_NAME)
    config = model.peft_config[model.active_adapter].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # as PEFT saves sets
    config["inference_mode"] = True  # as PeftModel.save_pretrained writes it (loading decides trainability)
    storage.write_text(folder / ADAPTER_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True, default=str))
    return digest


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """adapter_config.json of an adapter folder, as a dict (an ElmError naming the file if unreadable)."""
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise ElmError(f"not an adapter folder: no {ADAPTER_CONFIG_NAME}", folder)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ElmError(f"unreadable adapter config ({e})", path) from None
    require(isinstance(config, dict) and config.get("peft_type") == "LORA", "peft_type: only LORA adapters are supported", path)
    return config


def load_adapter_model(base_dir: str | Path, adapter_dir: str | Path, trainable: bool = False) -> Any:
    """The base folder's model with the adapter folder's LoRA attached (a PeftModel), checksums of
    both verified first. `trainable`: the adapter's tensors require gradients (to continue training)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)
    verify_weights(adapter_dir / ADAPTER_WEIGHTS_NAME)
    base = load_model(base_dir)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ElmError(f"cannot load the adapter: {str(e).splitlines()[0]}", adapter_dir) from None


def merged_adapter_model(base_dir: str | Path, adapter_dir: str | Path) -> torch.nn.Module:
    """The base with the adapter merged into its weights, a plain model of the base's class:
    every adapted W0 becomes W0 + scale * (B @ A) (PEFT's `merge_and_unload`), so it computes the
    PeftModel's function at a plain model's speed. In eval mode."""
    return load_adapter_model(base_dir, adapter_dir).merge_and_unload().eval()


def base_sha256(base_dir: str | Path) -> str:
    """The content hash of a base model folder's weights: the sha256 its model.safetensors carries
    (written by `checkpoint.write_safetensors`, verified here), or, for a file written elsewhere,
    the same digest computed over its tensors (name, dtype, shape, bytes in sorted name order)."""
    path = Path(base_dir) / WEIGHTS_NAME
    stored = verify_weights(path)
    if stored is not None:
        return stored
    hasher = WeightsHasher()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            hasher.update(name, f.get_tensor(name))
    return hasher.hexdigest()


def adapter_flops_per_token(model: Any, context: int) -> int:
    """Training FLOPs per token of a PeftModel (frozen base + LoRA), in `models.flops_per_token`'s
    convention (Kaplan: non-embedding weights, attention 6*L*s*d, the logits matmul left out).

    With N_b the base's non-embedding parameters and N_a the adapters' (every A and B):

        forward                          2*N_b + 2*N_a + 2*L*s*d
        backward, activation gradients   2*N_b + 2*N_a + 4*L*s*d - 2*(W0 + A0)
        backward, weight gradients       2*N_a                      (the base's are never computed)
        total                            4*N_b + 6*N_a + 6*L*s*d - 2*(W0 + A0)

    against 6*N + 6*L*s*d for a dense model. W0 + A0: the weights of block 0's projections that read
    the block's input (`FIRST_INPUT_PROJECTIONS`) and of their adapters' A matrices; that input comes
    from the frozen embeddings, so autograd computes no gradient for it. Exact (to the FLOP, in the
    counter's convention, tests/test_adapters.py) when those projections are adapted, as by default;
    with other targets it is an upper bound (more of block 0 may then need no backward).
    """
    base = model.get_base_model()
    config = base.config
    n_total = non_embedding_params(base)  # the injected LoRA layers included
    n_adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_base = n_total - n_adapter
    first = 0
    modules = dict(base.named_modules())
    for name in FIRST_INPUT_PROJECTIONS.get(config.model_type, ()):
        module = modules.get(name)
        if module is None:
            continue
        layer = getattr(module, "base_layer", module)
        first += layer.weight.numel()
        for a in getattr(module, "lora_A", {}).values():
            first += a.weight.numel()
    attention = 6 * _layers_of(config) * context * _width_of(config)
    return 4 * n_base + 6 * n_adapter + attention - 2 * first
