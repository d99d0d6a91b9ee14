"""`elmforest check PATH`: validate a corpus, tokenizer, model, expert, forest or run folder deeply."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def check(
    path: Path = typer.Argument(
        ..., help="A corpus, tokenizer, model/expert, training run, forest or `elmforest run` folder.",
        show_default=False,
    ),
    clean: bool = typer.Option(False, "--clean", help="Remove the .*.tmp leftovers of killed writes."),
) -> None:
    """Validate a folder deeply and list every problem found, one line each, naming the file.

    Corpus: every split parses and matches manifest.json. Model/expert: weights checksum, tensors match config.json, expert.json fields and hashes. Forest: every expert present and valid, one tokenizer and architecture. Run folder: the recipe and every stage folder present.

    Exit status 0 when clean, 2 when any problem is found. `.*.tmp` files left by killed writes are harmless leftovers (reported, not problems); --clean removes them.
    """
    from elmforest.check import check_path, clean_leftovers

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
