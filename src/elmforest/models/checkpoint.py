"""Checkpoints: safetensors weights with a checksum, and the resumable training state.

`model.safetensors` is what Hugging Face writes too (tied tensors stored once, metadata
`{"format": "pt"}`), plus `"sha256"`: a digest of every tensor's name, dtype, shape and bytes in
sorted key order, so a flipped bit or a truncated copy is caught before a model is used. The file
is written here, not by `safetensors.save_file` (whose header lists metadata keys in a hash-map
order that changes from process to process), so the same weights always give the same bytes:
a header of sorted keys, then the tensors ordered by (alignment descending, name), as
safetensors orders them.

`train_state.pt` holds everything else a run needs to continue bit-identically: optimizer state,
step, sampler state, RNG states (`rng`, and `rng_ranks`: one per rank of a data-parallel run,
whose process count `world_size` records). It holds only tensors, numbers, strings, lists, tuples and dicts,
so it loads with `torch.load(weights_only=True)` (no arbitrary unpickling).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from elmforest import storage
from elmforest.errors import ElmError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
TRAIN_STATE_NAME = "train_state.pt"


class WeightsHasher:
    """Streaming form of `weights_sha256`: feed tensors in sorted name order, one at a time."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        self._h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        self._h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 too)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    hasher = WeightsHasher()
    for name in sorted(tensors):
        hasher.update(name, tensors[name])
    return hasher.hexdigest()


def weights_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as saved: detached, contiguous, on CPU, each shared tensor once.

    Tied weights (GPT-2's `lm_head.weight` is `transformer.wte.weight`) appear twice in
    `state_dict()`; like Hugging Face we keep the first name (the input embedding) and drop the
    alias, which `from_pretrained` re-ties from the config's `tie_word_embeddings`.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


# torch dtype -> safetensors dtype name (the format's own spelling)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path) -> str:
    """Write `tensors` atomically as a safetensors file with the checksum in its metadata; returns it.

    Layout (the safetensors format): 8 bytes little-endian header length N, N bytes of JSON
    padded with spaces to a multiple of 8, then every tensor's raw little-endian bytes back to back;
    the header maps each name to its dtype, shape and [begin, end) byte offsets into that data.
    Keys sorted and tensors in a fixed order: equal weights give byte-identical files."""
    if sys.byteorder != "little":
        raise ElmError("safetensors files are little-endian; this machine is big-endian")
    digest = weights_sha256(tensors)
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))  # aligned offsets
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "sha256": digest}}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ElmError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store", path)
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with storage.atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype (bf16 too)
    return digest


def save_weights(model: Any, folder: str | Path) -> str:
    """Write `folder/model.safetensors`, `folder/config.json` and, for a model that generates,
    `folder/generation_config.json` (each atomic); returns the checksum.

    The config is completed as `save_pretrained` completes it: `architectures` (the class tools
    such as mergekit dispatch on), `dtype` of the weights, `transformers_version`; the bos/eos
    ids are whatever the config holds (`models.hf_config` takes them from the tokenizer).
    """
    folder = Path(folder)
    digest = write_safetensors(weights_state_dict(model), folder / WEIGHTS_NAME)
    config = model.config
    config.architectures = [type(model).__name__]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    storage.write_text(folder / CONFIG_NAME, config.to_json_string())
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        storage.write_text(folder / GENERATION_CONFIG_NAME, generation.to_json_string())
    return digest


def verify_weights(path: str | Path) -> str | None:
    """Check a safetensors file (or a folder's `model.safetensors`) against its stored checksum.

    Returns the checksum, or None for a valid file written elsewhere without one (e.g. by
    `save_pretrained`). Raises ElmError naming the file when it is missing, truncated, not a
    safetensors file, or its tensors do not match the checksum.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise ElmError("weights file not found", path)
    hasher = WeightsHasher()
    try:
        with safe_open(str(path), framework="pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            for name in sorted(f.keys()):
                hasher.update(name, f.get_tensor(name))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise ElmError("checkpoint corrupt: truncated or not a safetensors file", path) from None
    if expected is None:
        return None
    if hasher.hexdigest() != expected:
        raise ElmError("checkpoint corrupt: checksum mismatch", path)
    return expected


def load_weights_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Copy `tensors` (as written by `weights_state_dict`) into `model` in place.

    Every model tensor must be present except dropped aliases of tied tensors; anything else
    (a missing or extra name, a shape mismatch) is an ElmError naming `source`.
    """
    expected = weights_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ElmError(f"weights do not match the model architecture ({what})", source)
    try:
        model.load_state_dict(dict(tensors), strict=False)  # strict=False: tied aliases are absent
    except RuntimeError as e:
        detail = str(e).splitlines()[-1].strip()
        raise ElmError(f"weights do not match the model architecture ({detail})", source) from None


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    """torch.save `state` atomically. Keep it to tensors, numbers, strings, None, lists, tuples, dicts."""
    with storage.atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Load a `train_state.pt` safely (weights_only=True, tensors mapped to CPU)."""
    path = Path(path)
    if path.is_dir():
        path = path / TRAIN_STATE_NAME
    if not path.is_file():
        raise ElmError("train state not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError):
        raise ElmError("train state corrupt: truncated or not a torch.save file", path) from None
    if not isinstance(state, dict):
        raise ElmError("train state corrupt: not a dict", path)
    return state


def stored_sha256(path: Path) -> str | None:
    """The checksum in a safetensors file's metadata (None: no file, not safetensors, no checksum)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError):
        return None


def rng_state() -> dict[str, Any]:
    """All RNG states as weights_only-loadable values (tensors, ints, floats, lists, None)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
