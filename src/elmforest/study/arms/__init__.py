"""The registry of arms: everything the study trains and compares, one entry each, in stage order.

An arm (`base.Arm`) declares in one module its recipe keys under `arms:`, the stage that trains it,
its folder, the models it lends the evaluation, the study methods it feeds, its budget record
(`RUN/<folder>/arm.json`, `record.ArmRecord`) and its notes for the report. `elmforest run`
(`study.run`), the evaluation (`study.results`), results.json (`study.summary`), the report and
`elmforest check` iterate this registry instead of naming arms; `study.recipe` composes the
recipe's `arms:` section from the entries' fields. Adding an arm is one module and one line in
`ARMS` below (docs/ARCHITECTURE.md, "Adding an arm").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from elmforest.errors import ElmError
from elmforest.study.arms.anchored import AnchoredArm, AnchoredRouterArm
from elmforest.study.arms.base import Arm, ArmFields
from elmforest.study.arms.btx import BtxArm
from elmforest.study.arms.cbtm import ClusterArm
from elmforest.study.arms.demix import DemixArm
from elmforest.study.arms.dense_adapter import DenseAdapterArm
from elmforest.study.arms.dense import DenseArm, DenseMultipleArm, SeedArm
from elmforest.study.arms.forests import BtmArm, RandomArm, SeedFractionArm
from elmforest.study.arms.opt_out import OptOutArm
from elmforest.study.arms.record import ARM_JSON, ArmRecord, read_record, write_record
from elmforest.study.methods import StudyMethod

# Stage order: an arm may build on the arms before it (BTX on BTM, router tuning on the anchored mixture).
ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        SeedArm(),
        DenseArm(),
        DenseMultipleArm(),
        DenseAdapterArm(),
        BtmArm(),
        SeedFractionArm(),
        RandomArm(),
        ClusterArm(),
        DemixArm(),
        BtxArm(),
        AnchoredArm(),
        AnchoredRouterArm(),
        OptOutArm(),
    )
}


def register(arm: Arm) -> Arm:
    """Add an arm at the end of the registry (tests add toy arms this way)."""
    if arm.name in ARMS:
        raise ValueError(f"arm {arm.name!r} is registered twice")
    ARMS[arm.name] = arm
    return arm


def unregister(name: str) -> None:
    ARMS.pop(name, None)


def field_sections() -> list[type[ArmFields]]:
    """The recipe sections of the registered arms, each once, in registry order."""
    return list(dict.fromkeys(a.fields for a in ARMS.values() if a.fields is not None))


def trained_arms(recipe: Any, after_evaluation: bool | None = None) -> list[tuple[Arm, str]]:
    """(entry, arm name) of every arm a recipe trains, in stage order (optionally only those whose
    stage runs after, or before, the evaluation)."""
    return [(a, name) for a in ARMS.values() for name in a.instances(recipe)
            if after_evaluation is None or a.after_evaluation == after_evaluation]


def study_methods(recipe: Any) -> list[StudyMethod]:
    """The methods a recipe's study scores: each trained arm's, in arm order."""
    return [m for arm, name in trained_arms(recipe) for m in arm.methods(recipe, name) if m.enabled(recipe)]


def provide_models(recipe: Any) -> Callable[[Any], None]:
    """The loader `results.StudyModels` calls: every trained arm lends it its models."""

    def provide(models: Any) -> None:
        for arm, name in trained_arms(recipe):
            arm.provide(models, name)

    return provide


def report_sections(results: dict[str, Any], plots: Path) -> list[str]:
    """report.md's parts that arms write for their own results.json sections (`Arm.report`)."""
    return [line for arm in ARMS.values() for line in arm.report(results, plots)]


def preflight(recipe: Any, source: str = "recipe") -> None:
    """Refuse, before anything trains, an arm the recipe's architecture cannot run."""
    for arm in ARMS.values():
        arm.preflight(recipe, source)


def record_path(arm: Arm, run_dir: Path, name: str) -> Path:
    return arm.folder(Path(run_dir), name) / ARM_JSON


def arm_records(recipe: Any, run_dir: Path, refresh: bool = False) -> dict[str, ArmRecord]:
    """{arm: its budget record} of every trained arm of one run folder, in stage order.

    Each is read from its arm.json; a run folder written before arm.json existed (or, with
    `refresh`, any) gets it derived from the arm's own files and written. Arms not trained are left out."""
    records: dict[str, ArmRecord] = {}
    for arm, name in trained_arms(recipe):
        if not arm.records:
            continue
        path = record_path(arm, run_dir, name)
        if path.is_file() and not refresh:
            records[name] = read_record(path)
            continue
        record = arm.derive(recipe, Path(run_dir), name, dict(records))
        if record is not None:
            write_record(path, record)
            records[name] = record
    return records


def record_disagreements(recipe: Any, run_dir: Path) -> list[tuple[Path, str]]:
    """(arm.json, problem) for every record that is unreadable or disagrees with its arm's files
    (tokens, FLOPs, parameters re-derived from them); what `elmforest check` reports."""
    problems: list[tuple[Path, str]] = []
    records: dict[str, ArmRecord] = {}
    for arm, name in trained_arms(recipe):
        path = record_path(arm, run_dir, name)
        if not arm.records or not path.is_file():
            continue
        try:
            stored = read_record(path)
            derived = arm.derive(recipe, Path(run_dir), name, dict(records))
        except ElmError as e:
            problems.append((path, e.detail))
            continue
        except (KeyError, TypeError, ValueError) as e:
            problems.append((path, f"the {name} arm's own files cannot be read ({type(e).__name__}: {e})"))
            continue
        records[name] = stored
        if stored.arm != name:
            problems.append((path, f"field 'arm' is {stored.arm!r}, expected {name!r}"))
        if derived is None:  # its files are being (re)written (a killed or live stage): nothing to compare yet
            continue
        for field in ("tokens", "flops", "params_at_inference", "extra_tokens", "compute_matched"):
            a, b = getattr(stored, field), getattr(derived, field)
            if a != b and not (isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-9 * max(abs(a), abs(b))):
                problems.append((path, f"field {field!r} is {a}, but the arm's own files say {b}"))
    return problems


__all__ = [
    "ARMS", "ARM_JSON", "Arm", "ArmFields", "ArmRecord", "arm_records", "field_sections", "preflight",
    "provide_models", "read_record", "record_disagreements", "register", "report_sections", "study_methods", "trained_arms",
    "unregister", "write_record",
]
