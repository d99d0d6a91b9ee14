"""A run folder belongs to one recipe: `RUN/recipe.yaml` claims it.

`elmforest run`, `elmforest train seed` and the incremental rounds (`elmforest.study.rounds`) all write
into a run folder; each first calls `claim_run_dir`, which records the resolved recipe and refuses
a folder already holding a run of a different recipe (other data, model or budget would make
its trained models meaningless for this one).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from elmforest import storage
from elmforest.config import Recipe, read_yaml
from elmforest.errors import ElmError

RECIPE_FILE = "recipe.yaml"
# Recipe sections that may change between runs of one folder without invalidating its models:
# where experts run, which trackers follow them, and (after a fresh evaluation) which arms and how
# they are evaluated.
VOLATILE_KEYS = ("launcher", "out", "logging")
REEVALUATE_KEYS = ("arms", "eval")


def _sections(data: dict[str, Any], keep: bool, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if (k in keys) == keep}


def claim_run_dir(recipe: Recipe, out: Path) -> None:
    """Record the resolved recipe in RUN/recipe.yaml; refuse a folder holding another recipe's run.

    Changing `launcher` is always fine; changing `arms` or `eval` keeps every trained model and
    drops the evaluation cache, so the next run re-scores everything with the new settings."""
    path = out / RECIPE_FILE
    new = recipe.model_dump(mode="json")
    if path.is_file():
        old = read_yaml(path)
        skip = VOLATILE_KEYS + REEVALUATE_KEYS
        old_models, new_models = _sections(old, False, skip), _sections(new, False, skip)
        if old_models != new_models:
            changed = sorted(k for k in set(old_models) | set(new_models) if old_models.get(k) != new_models.get(k))
            raise ElmError(
                f"this folder holds a run of a different recipe ({', '.join(changed)} differ); use another --out",
                out,
            )
        if _sections(old, True, REEVALUATE_KEYS) != _sections(new, True, REEVALUATE_KEYS) and (out / "eval").is_dir():
            shutil.rmtree(out / "eval")  # re-score every method with the new arms / eval settings
    out.mkdir(parents=True, exist_ok=True)
    storage.write_text(path, yaml.safe_dump(new, sort_keys=False))
