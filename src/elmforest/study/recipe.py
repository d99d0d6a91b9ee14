"""Loading a study's recipe: `config`'s schema, then the names it takes from registries.

`elmforest.config` checks a recipe's structure and values (it sits below every layer, so it
imports none of them). The names a recipe takes from a registry of a higher layer are checked
here, where both are in reach, with the same one-line errors naming the file and the key:
`launcher.kind` against `launch.launchers.LAUNCHERS`, `eval.posterior` against the updating
posteriors of `combine.ensemble.POSTERIORS`. Every command loads recipes through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from elmforest import config
from elmforest.combine.ensemble import UPDATING_POSTERIORS
from elmforest.config import Recipe
from elmforest.errors import ElmError
from elmforest.launch.launchers import LAUNCHERS


def check_choices(recipe: Recipe, source: str | Path = "recipe") -> Recipe:
    """Every registry name in the recipe is registered; else an ElmError naming the key and the choices."""
    choices = (
        ("launcher.kind", recipe.launcher.kind, "launcher", LAUNCHERS),
        ("eval.posterior", recipe.eval.posterior, "posterior", UPDATING_POSTERIORS),
    )
    for key, value, what, names in choices:
        if value not in names:
            raise ElmError(f"{key}: unknown {what} {value!r}; choose one of {', '.join(names)}", source)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file (relative input paths resolve against the CWD)."""
    return check_choices(config.load_recipe(path, overrides), path)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate recipe data (e.g. a run folder's recipe.yaml)."""
    return check_choices(config.recipe_from_dict(data, source), source)
