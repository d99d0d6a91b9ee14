"""`elmforest average`: a forest's experts' parameters averaged into one Hugging Face model folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.table import Table

from elmforest import storage
from elmforest.cli.combine import (
    ALPHA_OPT,
    CORPUS_OPT,
    DEVICE_OPT,
    LOAD_PRIOR_OPT,
    POSTERIOR_OPT,
    PRIOR_BATCH_OPT,
    PRIOR_SEQUENCES_OPT,
    WINDOW_SEED_OPT,
    pick_device,
    parse_weights,
    prior_table,
)
from elmforest.console import stdout_console
from elmforest.errors import require
from elmforest.combine.forest import Forest
from elmforest.combine.prior import load_prior
from elmforest.combine.scoring import ExpertPool, check_forest_consistency, forest_context, forest_prior, resolve_corpus


def average(
    forest_path: Path = typer.Argument(..., metavar="FOREST", help="Forest folder (with forest.json)."),
    method: str = typer.Option(
        ..., "--method",
        help="uniform | argmax (expert with the largest cached prior) | posterior (cached-prior-weighted) | "
        "weighted (--weights) | task_arithmetic | ties (both relative to the seed).",
    ),
    out: Path = typer.Option(..., "--out", help="New model folder to write (must not exist)."),
    domain: str | None = typer.Option(
        None, "--domain", help="Domain whose cached prior gives the weights (argmax, posterior)."
    ),
    corpus: str | None = CORPUS_OPT,
    weights: str | None = typer.Option(
        None, "--weights", help="Explicit weights for --method weighted, e.g. a=0.7,b=0.3 (unnamed experts get 0)."
    ),
    normalise: bool = typer.Option(
        False, "--normalise", help="Divide weights by their sum instead of refusing a sum other than 1."
    ),
    seed_dir: Path | None = typer.Option(
        None, "--seed-dir", help="Seed model folder for task_arithmetic / ties (default: the experts' seed_checkpoint)."
    ),
    scale: float | None = typer.Option(
        None, "--scale", help="task_arithmetic / ties: task-vector scale (default 1/n and 1)."
    ),
    density: float = typer.Option(0.2, "--density", help="ties: fraction of each task vector kept, by magnitude."),
    posterior: str = POSTERIOR_OPT,
    prior_sequences: int = PRIOR_SEQUENCES_OPT,
    prior_batch: int = PRIOR_BATCH_OPT,
    alpha: float = ALPHA_OPT,
    window_seed: int = WINDOW_SEED_OPT,
    load: Path | None = LOAD_PRIOR_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Average a forest's experts' parameters into one Hugging Face model folder.

    merged = sum_i w_i expert_i tensor by tensor (or a seed-relative merge); the folder holds weights, config, tokenizer files and average.json, and loads with from_pretrained. An adapter forest gives its base plus the merged adapter deltas, W0 + sum_i w_i scale_i B_i A_i exactly (the base is every seed-relative method's seed).
    """
    from elmforest.combine.adapters import average_adapter_folders
    from elmforest.combine.averaging import AVERAGING_METHODS, AverageOptions, average_folders, resolve_weights
    from elmforest.models.factory import copy_tokenizer_files

    require(method in AVERAGING_METHODS, f"--method {method!r}: choose one of {', '.join(AVERAGING_METHODS)}")
    require(not out.exists(), "output folder already exists; choose a new --out", out)
    forest = Forest(forest_path)
    metas = check_forest_consistency(forest)
    names = forest.names
    record = None
    vector = None
    if method in ("argmax", "posterior"):
        require(weights is None, f"--weights is for --method weighted; {method} uses the cached prior")
        if load is None:
            require(
                domain is not None,
                f"--method {method} needs --domain (whose cached prior gives the weights) or --load-prior",
            )
            corp = resolve_corpus(corpus, metas.values(), forest_path / "forest.json")
            pool = ExpertPool(forest, pick_device(device))
            record = forest_prior(pool, corp, domain, forest_context(forest), prior_sequences, prior_batch, alpha,
                                  posterior, window_seed)
        else:
            record = load_prior(load, names)
            require(not record.mix.with_seed, "the prior file mixes in the seed; averaging needs a prior over experts only", load)
        vector = record.vector(names).tolist()
    elif weights is not None:
        vector = resolve_weights(parse_weights(weights), names).tolist()  # refuses unknown names

    if method in ("task_arithmetic", "ties") and seed_dir is None and forest.base_dir is None:
        recorded = next((m.get("seed_checkpoint") for m in metas.values() if m.get("seed_checkpoint")), None)
        require(
            recorded is not None and Path(recorded).is_dir(),
            f"--method {method} needs --seed-dir (the experts' seed_checkpoint {recorded!r} is not a folder)",
        )
        seed_dir = Path(recorded)

    options = AverageOptions(normalise=normalise, scale=scale, density=density)
    with storage.atomic_dir(out) as staging:
        dirs = [forest.expert_dir(n) for n in names]
        if forest.base_dir is not None:  # adapter experts: the exact average of their deltas on the base
            built = average_adapter_folders(forest.base_dir, dirs, vector, method, staging / "merged", options)
        else:
            built = average_folders(dirs, vector, method, staging / "merged", seed_dir, options)
        copy_tokenizer_files(forest.tokenizer_dir, built, overwrite=False)  # experts usually carry them; the forest always does
        info = json.loads((built / "average.json").read_text(encoding="utf-8"))
        info.update(forest=str(forest_path), expert_names=names, prior=record.to_json() if record else None)
        storage.write_json(built / "average.json", info)
        for f in built.iterdir():
            os.replace(f, staging / f.name)
        built.rmdir()

    console = stdout_console()
    if record is not None:
        console.print(prior_table(record, forest))
    table = Table(title=f"{method} average -> {out}")
    table.add_column("expert")
    table.add_column("weight", justify="right")
    for name, w in zip(names, info["weights"] or [None] * len(names)):
        table.add_row(name, "-" if w is None else f"{w:.4f}")
    console.print(table)
    if info["weights"] is None:
        console.print(f"seed {info.get('seed', info.get('base'))}, scale {info['scale']}, density {info['density']}")
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("average")(average)
