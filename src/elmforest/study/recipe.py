"""Loading a study's recipe: `config`'s schema, its `arms:` section, then the names it takes from registries.

`elmforest.config` checks a recipe's structure and values (it sits below every layer, so it
imports none of them, and keeps `arms:` as a plain mapping that no lower layer reads). Here, where
the registries are in reach:

- `recipe_type()` is `config.Recipe` with a typed `arms` section composed from the registered
  arms' fields (`elmforest.study.arms`), and each arm's checks against the rest of the recipe;
- the names a recipe takes from a registry of a higher layer are checked, with the same one-line
  errors naming the file and the key: `launcher.kind` against `launch.launchers.LAUNCHERS`,
  `eval.posterior` against the updating posteriors of `combine.ensemble.POSTERIORS`.

Every command loads recipes through this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, create_model, model_validator

from elmforest import config
from elmforest.combine.ensemble import UPDATING_POSTERIORS
from elmforest.config import Recipe
from elmforest.errors import ElmError
from elmforest.launch.launchers import LAUNCHERS
from elmforest.study import arms as arm_registry

_TYPES: dict[tuple[Any, ...], type[Recipe]] = {}


def _rebuild(data: dict[str, Any]) -> Recipe:
    """Unpickle a study recipe (a process of `distributed.run_procs`): validate it again here."""
    return recipe_type().model_validate(data)


class StudyRecipe(Recipe):
    """A recipe whose `arms` section is typed by the registry (see `recipe_type`)."""

    @model_validator(mode="after")
    def _arms_agree(self) -> "StudyRecipe":
        for arm in arm_registry.ARMS.values():
            arm.validate(self)
        return self

    def __reduce__(self) -> tuple[Any, ...]:  # its class is built at run time: pickle the data instead
        return _rebuild, (self.model_dump(mode="json"),)


def recipe_type() -> type[Recipe]:
    """`Recipe` with `arms:` typed from the currently registered arms (built once per registry state)."""
    sections = tuple(arm_registry.field_sections())
    key = (*sections, *arm_registry.ARMS)
    if key not in _TYPES:
        arms = create_model(
            "ArmsConfig",
            __base__=tuple(reversed(sections)) or (arm_registry.ArmFields,),  # fields in registry order
            __module__=__name__,
            __doc__="Which arms `elmforest run` trains besides the seed and the BTM forest (one block of keys per arm).",
        )
        _TYPES[key] = create_model(
            "Recipe", __base__=StudyRecipe, __module__=__name__,
            arms=(arms, Field(default_factory=arms, description=Recipe.model_fields["arms"].description)),
        )
    return _TYPES[key]


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
    return check_choices(config.load_recipe(path, overrides, recipe_type()), path)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate recipe data (e.g. a run folder's recipe.yaml)."""
    return check_choices(config.recipe_from_dict(data, source, recipe_type()), source)


def study_recipe(recipe: Recipe) -> Recipe:
    """`recipe` with its `arms:` section typed (a `config.Recipe` built below the study is validated again)."""
    return recipe if isinstance(recipe, StudyRecipe) else recipe_from_dict(recipe.model_dump(mode="json"))
