"""Combining adapter experts (LoRA adapters on one frozen base, `models.adapters`).

Ensembles need nothing here: an adapter expert loaded as a model (`models.adapters.load_adapter_model`,
a PeftModel) goes through `combine.logprobs.expert_logprobs` and `combine.ensemble.Ensemble` like any
causal LM. This module holds what is specific to adapters:

    average_adapter_folders   parameter averaging of the adapters' weight deltas, exported as one
                              complete plain model folder (`AutoModelForCausalLM` loads it):
                                  W = W0 + merge_i(D_i),   D_i = scale_i * B_i @ A_i  (scale = alpha / r)
                              where merge is any method of `combine.averaging.AVERAGING_METHODS`
                              applied to the deltas with the seed at zero: the linear ones give
                              W = W0 + sum_i w_i * scale_i * B_i A_i exactly (not PEFT's
                              add_weighted_adapter "linear", which scales A and B separately and
                              so adds cross terms B_i A_j), task_arithmetic W0 + lambda * sum_i D_i,
                              ties the TIES merge of the deltas.
    branch_adapter_average    a new rank-r adapter whose update is the best rank-r approximation (SVD)
                              of the weighted delta sum: how a grown adapter expert branches
    cat_model                 PEFT's add_weighted_adapter(..., combination_type="cat"): the adapters
                              stacked into one of rank sum r_i, w_i * scale_i folded into A_i, which
                              computes the same W0 + sum_i w_i D_i without materialising it.
    arrow_model               PEFT's Arrow router (Ostapenko et al. 2024; `ArrowConfig`,
                              `create_arrow_model`): training-free, per token and layer, each
                              adapter's prototype is the top right singular vector of its B A; a
                              token picks the top_k adapters by |cosine| and mixes them by a softmax
                              at `temperature`.

Each returns a model that scores windows (`combine.evaluate.token_logprobs`) or a folder that loads as one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from elmforest import storage
from elmforest.combine.averaging import COPIED_FILES, WEIGHTS_FILE, AverageOptions, WeightsLike, check_weights, make_plan, merge_tensor, resolve_weights
from elmforest.config import AdapterConfig
from elmforest.errors import ElmError, require
from elmforest.models.adapters import ADAPTER_WEIGHTS_NAME, base_sha256, read_adapter_config
from elmforest.models.checkpoint import verify_weights, write_safetensors
from elmforest.models.factory import load_model

PEFT_PREFIX = "base_model.model."  # PEFT's key prefix in adapter_model.safetensors


def _scale(config: dict[str, Any], folder: Path) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA); per-module rank or alpha patterns are refused."""
    for field in ("rank_pattern", "alpha_pattern"):
        require(not config.get(field), f"{field}: per-module ranks or alphas are not supported", folder / "adapter_config.json")
    require(not config.get("use_dora"), "use_dora: DoRA adapters are not supported", folder / "adapter_config.json")
    require(not config.get("modules_to_save"), "modules_to_save: adapters that replace whole modules are not supported",
            folder / "adapter_config.json")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def adapter_deltas(folder: str | Path) -> dict[str, torch.Tensor]:
    """One adapter folder's weight deltas, float32, keyed by the base tensor they add to:

        base key "<module>.weight" -> scale * B @ A   [d_out, d_in]   (transposed for fan_in_fan_out,
                                                                        GPT-2's Conv1D [d_in, d_out])
    """
    folder = Path(folder)
    config = read_adapter_config(folder)
    require(config.get("bias", "none") == "none", "bias: adapters that train biases are not supported", folder / "adapter_config.json")
    scale = _scale(config, folder)
    path = folder / ADAPTER_WEIGHTS_NAME
    verify_weights(path)
    tensors = load_file(str(path))
    deltas = {}
    for key in sorted(tensors):
        if key.endswith(".lora_B.weight"):
            continue
        require(key.startswith(PEFT_PREFIX) and key.endswith(".lora_A.weight"),
                f"tensor {key!r} is not a LoRA A or B matrix of a linear layer", path)
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        b_key = f"{PEFT_PREFIX}{module}.lora_B.weight"
        require(b_key in tensors, f"tensor {b_key!r} is missing (the B matching {key!r})", path)
        delta = scale * (tensors[b_key].float() @ tensors[key].float())  # [d_out, r] @ [r, d_in]
        deltas[f"{module}.weight"] = delta.T if config.get("fan_in_fan_out") else delta
    require(deltas, "no LoRA tensors", path)
    return deltas


def average_adapter_folders(
    base_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    weights: WeightsLike | None,
    method: str,
    out_dir: str | Path,
    options: AverageOptions = AverageOptions(),
) -> Path:
    """Average adapter experts on the base in `base_dir` into a complete model folder `out_dir`.

    Every base tensor W0 an adapter touches becomes W0 + plan.merge(deltas) (the module docstring;
    an adapter that does not touch it contributes a zero delta); the others are copied. Weights and
    `method` are those of `combine.averaging` (experts named by their folder names). The folder gets
    model.safetensors (with the checksum), the base's config, generation and tokenizer files, and
    average.json {method, experts, weights, base, base_sha256, ...}. It appears complete or not at all.
    """
    base_dir, dirs, out_dir = Path(base_dir), [Path(d) for d in adapter_dirs], Path(out_dir)
    require(len(dirs) >= 1, "averaging needs at least one adapter folder")
    if out_dir.exists():
        raise ElmError("output folder already exists; choose a new one", out_dir)
    names = [d.name for d in dirs]
    plan = make_plan(method, names, weights, options, has_seed=True)  # the base is every method's seed
    deltas = [adapter_deltas(d) if i in plan.use else {} for i, d in enumerate(dirs)]
    base_file = base_dir / WEIGHTS_FILE
    base_hash = base_sha256(base_dir)
    merged: dict[str, torch.Tensor] = {}
    with safe_open(str(base_file), framework="pt", device="cpu") as base:
        keys = set(base.keys())
        for i, d in enumerate(deltas):
            for key, delta in d.items():
                require(key in keys, f"adapter tensor for {key!r} has no base tensor of that name in {base_file}", dirs[i])
                shape = tuple(base.get_slice(key).get_shape())
                require(tuple(delta.shape) == shape,
                        f"adapter delta for {key!r} has shape {tuple(delta.shape)}, the base tensor {shape}", dirs[i])
        for key in base.keys():
            w0 = base.get_tensor(key)
            if not any(key in d for d in deltas):
                merged[key] = w0
                continue
            touched = [deltas[i].get(key, torch.zeros(w0.shape)) for i in plan.use]
            delta = merge_tensor(plan, key, touched, torch.zeros(w0.shape))  # float32, seed (W0) at zero
            merged[key] = (w0.float() + delta.float()).to(w0.dtype)
    record = {
        "method": method,
        "kind": "adapters",
        "experts": names,
        "expert_paths": [str(d) for d in dirs],
        "weights": plan.weights,
        "base": str(base_dir),
        "base_sha256": base_hash,
        "scale": options.scale,
        "density": options.density if method == "ties" else None,
        "normalised": options.normalise,
    }
    with storage.atomic_dir(out_dir) as tmp:
        write_safetensors(merged, tmp / WEIGHTS_FILE)
        for name in COPIED_FILES:
            if (base_dir / name).is_file():
                storage.write_bytes(tmp / name, (base_dir / name).read_bytes())
        storage.write_json(tmp / "average.json", record)
    return out_dir


def branch_adapter_average(
    base_dir: str | Path, adapter_dirs: Sequence[str | Path], weights: Sequence[float], cfg: AdapterConfig,
    out_dir: str | Path, seed: int,
) -> Path:
    """A new adapter (rank cfg.r, PEFT's files in `out_dir`) on the base in `base_dir` whose update is
    the best rank-r approximation (Eckart-Young) of the parents' weighted delta sum, per adapted module:

        D = sum_j w_j scale_j B_j A_j = U S V^T,   B = U_r sqrt(S_r / scale),   A = sqrt(S_r / scale) V_r^T

    (scale = cfg.alpha / cfg.r), so scale * B @ A = U_r S_r V_r^T: exactly D when D has rank <= r (one
    parent of rank <= r). Components with a zero singular value, and modules no parent adapts, keep a
    fresh adapter's init (A drawn from `seed`, B = 0) so they still learn. Growth branches this way."""
    from elmforest.models.adapters import adapter_state_dict, attach, load_adapter_weights, save_adapter

    dirs, out_dir = _check_adapters(adapter_dirs), Path(out_dir)
    require(len(weights) == len(dirs), f"{len(weights)} weights for {len(dirs)} adapters")
    model = attach(load_model(base_dir), cfg, seed=seed)
    fresh = adapter_state_dict(model)
    fan_in_fan_out = bool(model.peft_config[model.active_adapter].fan_in_fan_out)
    total: dict[str, torch.Tensor] = {}
    for d, w in zip(dirs, weights):
        for key, delta in adapter_deltas(d).items():
            total[key] = total.get(key, 0) + float(w) * delta.double()
    tensors, scale = dict(fresh), cfg.alpha / cfg.r
    for key, delta in total.items():
        module = key[: -len(".weight")]
        a_key, b_key = f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"
        require(a_key in fresh, f"the parents adapt {module!r}, which experts.target_modules leaves out", dirs[0])
        u, s, vh = torch.linalg.svd(delta.T if fan_in_fan_out else delta, full_matrices=False)  # [d_out, d_in] as B @ A
        k = min(cfg.r, len(s))
        live = s[:k] > s[0] * 1e-7  # components D has (beyond its rank they are numerically zero)
        root = (s[:k] / scale).sqrt()
        a, b = fresh[a_key].double().clone(), torch.zeros(fresh[b_key].shape, dtype=torch.float64)
        a[:k][live] = (root[:, None] * vh[:k])[live]  # [k, d_in]
        b[:, :k][:, live] = (u[:, :k] * root)[:, live]  # [d_out, k]
        tensors[a_key], tensors[b_key] = a.float(), b.float()
    load_adapter_weights(model, tensors, out_dir)
    with storage.atomic_dir(out_dir) as tmp:
        save_adapter(model, tmp)
    return out_dir


def _check_adapters(adapter_dirs: Sequence[str | Path]) -> list[Path]:
    dirs = [Path(d) for d in adapter_dirs]
    require(len(dirs) >= 1, "need at least one adapter folder")
    for d in dirs:
        read_adapter_config(d)
        verify_weights(d / ADAPTER_WEIGHTS_NAME)
    return dirs


def cat_model(base_dir: str | Path, adapter_dirs: Sequence[str | Path], weights: WeightsLike | None = None) -> Any:
    """The base with PEFT's "cat" merge of the adapters active (weights default uniform, else
    validated as `combine.averaging` does: non-negative, summing to 1). A PeftModel in eval mode."""
    from peft import PeftModel

    dirs = _check_adapters(adapter_dirs)
    names = [f"expert{i}" for i in range(len(dirs))]
    w = resolve_weights(weights, names)
    w = torch.full((len(dirs),), 1.0 / len(dirs), dtype=torch.float64) if w is None else check_weights(w, names, "cat", False)
    model = PeftModel.from_pretrained(load_model(base_dir), str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:]):
        model.load_adapter(str(d), adapter_name=name)
    model.add_weighted_adapter(names, w.tolist(), "cat", combination_type="cat")
    model.set_adapter("cat")
    return model.eval()


def arrow_model(
    base_dir: str | Path, adapter_dirs: Sequence[str | Path], top_k: int, temperature: float = 1.0
) -> Any:
    """The base with PEFT's Arrow router over the adapters (training-free; the module docstring).
    Adapters must adapt linear layers only (llama's projections; not GPT-2's Conv1D). Eval mode."""
    from peft import ArrowConfig, create_arrow_model

    dirs = _check_adapters(adapter_dirs)
    require(1 <= top_k <= len(dirs), f"top_k must be in [1, {len(dirs)}], got {top_k}")
    require(temperature > 0, f"temperature must be > 0, got {temperature}")
    try:
        model = create_arrow_model(
            load_model(base_dir), [str(d) for d in dirs], ArrowConfig(top_k=top_k, router_temperature=temperature)
        )
    except (ValueError, TypeError) as e:
        raise ElmError(f"PEFT's Arrow refuses these adapters: {str(e).splitlines()[0]}", dirs[0]) from None
    return model.eval()
