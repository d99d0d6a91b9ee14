"""`elmforest check PATH`: validate a corpus, tokenizer, model, expert, DEMix/BTX model, forest or run folder deeply."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def check(
    path: Path = typer.Argument(
        ..., help="A corpus, tokenizer, model/expert, DEMix or BTX model, seed, training run, forest or `elmforest run` folder.",
        show_default=False,
    ),
    clean: bool = typer.Option(False, "--clean", help="Remove the leftovers of killed writes."),
) -> None:
    """Validate a folder deeply and list every problem found, one line each, naming the file.

    Corpus: every split parses and matches manifest.json. Model/expert: weights checksum, tensors match config.json, expert.json fields and hashes. DEMix model: tensors are config.json's with every MLP once per domain. BTX model: the Mixtral loads whole and agrees with mix.json. Seed and dense run: seed.json/dense.json agree with the train state and hashes. Forest: every expert present and valid, one tokenizer and architecture. Run folder: the recipe and every part present, each by its role, recording the run's tokenizer hash.

    Exit status 0 when clean, 2 when any problem is found. Leftovers of killed writes (`.*.tmp` files, an expert folder copied into a forest but not yet listed, a BTX folder without mix.json) are harmless (reported, not problems); --clean removes them.
    """
    from elmforest.checks.check import check_path, clean_leftovers

    report = check_path(path)
    for line in report.checked:
        typer.echo(f"checked {line}")
    for p in report.leftovers:
        if clean:
            clean_leftovers([p])
            typer.echo(f"removed leftover {p}")
        else:
            typer.echo(f"leftover (harmless; remove with --clean): {p}")
    for problem in report.problems:
        print(f"elmforest: problem: {problem}", file=sys.stderr)
    if not report.ok:
        print(f"{len(report.problems)} problem(s) in {report.kind} {path}")
        raise typer.Exit(2)
    typer.echo(f"ok: {report.kind} {path}")


def register(app: typer.Typer) -> None:
    """Add `elmforest check` to the app."""
    app.command("check")(check)
