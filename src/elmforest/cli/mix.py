"""`elmforest mix`: BTX, a forest's llama experts mixed into one Mixtral mixture-of-experts model."""

from __future__ import annotations

from pathlib import Path

import typer


def mix(
    forest: Path = typer.Argument(..., help="Forest folder of llama-family experts (model.family: llama)."),
    out: Path = typer.Option(
        ..., "--out", "-o",
        help="New folder for the Mixtral model; a folder holding an interrupted fine-tune of the same options continues it.",
    ),
    weights: str = typer.Option(
        "uniform", "--weights",
        help="How the non-MLP parameters (embeddings, attention, norms) are averaged: uniform, or posterior "
        "(the forest's cached prior on --domain's valid windows).",
    ),
    domain: str = typer.Option(None, "--domain", help="Domain whose cached prior weighs the experts (--weights posterior)."),
    top_k: int = typer.Option(2, "--top-k", help="Experts each token is routed to (1..number of experts)."),
    finetune_tokens: int = typer.Option(
        0, "--finetune-tokens",
        help="Tokens of router fine-tuning on domain-balanced batches of the experts' domains (0: none, routers stay random).",
    ),
    train_all: bool = typer.Option(False, "--train-all", help="Fine-tune every parameter, not only the routers."),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus folder (default: the one recorded in the experts' expert.json)."),
    lr: float = typer.Option(None, "--lr", help="Fine-tuning learning rate, constant (default: the recorded optim.lr)."),
    batch_tokens: int = typer.Option(
        None, "--batch-tokens", help="Fine-tuning tokens per step (default: the recorded budget.batch_tokens)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the routers' initialisation and of the fine-tuning batches."),
    device: str = typer.Option("auto", "--device", help="torch device: auto (cuda when available), cpu, cuda, ..."),
) -> None:
    """Mix a forest's experts into one Mixtral MoE (BTX): each expert's MLP becomes one expert of every layer's MoE block, the other parameters are averaged, and new routers are fine-tuned. Writes a Hugging Face folder (AutoModelForCausalLM loads it) plus mix.json. GPT-2 experts cannot be mixed: train the forest with model.family: llama."""
    from elmforest.mixtures.stages import mix_forest
    from elmforest.train.budget import resolve_device

    meta = mix_forest(
        forest, out, weights=weights, domain=domain, top_k=top_k, finetune_tokens=finetune_tokens,
        train_all=train_all, corpus=corpus, lr=lr, batch_tokens=batch_tokens, seed=seed,
        device=resolve_device(device),
    )
    ft = meta["finetune"]
    print(
        f"BTX model: {out} ({len(meta['experts'])} experts, top-{meta['top_k']}, {meta['params'] / 1e6:.2f}M parameters); "
        f"fine-tuned on {ft['tokens']:,} tokens, {ft['flops']:.3e} FLOPs"
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("mix")(mix)
