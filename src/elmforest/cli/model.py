"""`elmforest model import`: a pretrained model (GGUF file, Hugging Face folder or hub id) into a
complete elmforest model folder that `model.path` takes."""

from __future__ import annotations

from pathlib import Path

import typer

model_app = typer.Typer(help="Bring pretrained models into elmforest.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(model_app, name="model")


@model_app.command("import")
def import_command(
    src: str = typer.Argument(..., help="A .gguf file (de-quantised), a Hugging Face model folder, or a hub id "
                              "org/name (only when online)."),
    out: Path = typer.Option(..., "--out", "-o", help="New model folder to write (must not exist or be empty)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32 (training master weights), "
                              "bfloat16 or float16."),
) -> None:
    """Write a complete model folder (config with architectures, safetensors weights, tokenizer with its
    end-of-text token, generation_config.json, import.json) from a pretrained model; use it as a
    recipe's `model.path` (the seed) and check it with `elmforest check`."""
    from elmforest.models.importing import import_model

    record = import_model(src, out, dtype=dtype)
    print(f"{record['architecture']}: {record['parameters']:,} parameters, vocabulary {record['vocab_size']:,}, "
          f"context {record['context']}, eos {record['eos_token']!r}, {dtype} -> {out}")
