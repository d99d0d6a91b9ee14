"""`elmforest run`: the whole compute-matched study from one recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from elmforest.study.recipe import load_recipe


def run(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/demo.yaml)."),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: the recipe's `out`)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set budget.total_tokens=1e6 (repeatable)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs only)."),
) -> None:
    """Run the compute-matched BTM study: seed, then every arm the recipe's `arms:` turns on (dense, BTM forest, random-split forest, DEMix, BTX, ...: the registry elmforest.study.arms), each recording RUN/<arm>/arm.json, then evaluation and report. Rerunning the same command continues an interrupted run and skips finished stages."""
    from elmforest.checks.check import check_recipe
    from elmforest.study.run import run_study

    r = load_recipe(recipe, set_)
    check_recipe(r, recipe)  # every error knowable up front, before the run folder is written
    run_study(r, out or Path(r.out), progress=not no_progress)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
