"""Deep validation of elmforest folders: what `elmforest check PATH` runs.

`check_path` detects what a folder is and validates it through and through, collecting every
problem instead of stopping at the first (each a one-line `Problem` naming the file). Each kind
has its own rules (`elmforest.checks.folders`, `elmforest.checks.mixtures`), chosen by the file that
marks the folder (first match wins):

    forest.json      forest          manifest.json    corpus           recipe.yaml      run folder
    expert.json      expert          demix.json       DEMix model      mix.json         BTX model
    seed.json        seed            dense.json       dense run        train.json/job.json  training run
    config.json + model.safetensors  model folder     tokenizer.json   tokenizer

A run folder (`elmforest run`, incremental rounds) is checked part by part, each by its role:
the recipe validates; tokenizer/, seed/, dense/, demix/ (a DEMix model of the recipe's train
domains, even mid-training), btx/ (a BTX model of forest/'s experts), forest/ (experts of train
domains) and random_forest/ (experts random0..random<n-1>) by their rules; the tokenizer hash every
part records equals tokenizer/'s; eval/*.json hold finite NLLs; plots/*.png are PNG images;
results.json, timing.json, router.json, forget_<domain>.json and rounds/<r>/round.json parse; every
trained arm's arm.json (`elmforest.study.arms`) validates and agrees with its arm's own files.
Other folders are checked by their kind.

A folder in the middle of being written by a live or killed process is a valid state: a training
run that has not checkpointed yet, an expert branched but not trained, an expert folder copied
into a forest but not yet in forest.json, a BTX folder without its mix.json (the next run rebuilds
it). `.*.tmp` files and folders are the leftovers of killed atomic writes: harmless (the target is
intact), reported separately and removable with `clean_leftovers`; so are the other two.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elmforest.checks.folders import (
    check_corpus,
    check_dense,
    check_expert,
    check_forest,
    check_model_folder,
    check_seed,
    check_tokenizer,
    check_training,
)
from elmforest.checks.mixtures import check_btx, check_demix
from elmforest.checks.problems import Collector, Report, child_dirs
from elmforest.errors import ElmError

CORPUS, FOREST, RUN, EXPERT, MODEL, TRAINING, TOKENIZER = (
    "corpus", "forest", "run folder", "expert", "model folder", "training run", "tokenizer",
)
DEMIX, BTX, SEED, DENSE = "DEMix model", "BTX model", "seed", "dense run"
# The kind of folder, decided by the file that marks it (first match wins).
MARKERS: list[tuple[str, tuple[str, ...]]] = [
    (FOREST, ("forest.json",)),
    (CORPUS, ("manifest.json",)),
    (RUN, ("recipe.yaml",)),
    (EXPERT, ("expert.json",)),
    (DEMIX, ("demix.json", "demix_run.json")),
    (BTX, ("mix.json",)),
    (SEED, ("seed.json",)),
    (DENSE, ("dense.json",)),
    (TRAINING, ("train.json", "job.json")),
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Detection and leftovers


def detect_kind(path: Path) -> str | None:
    """What the folder `path` is, from the file that marks it; None when nothing marks it."""
    for kind, files in MARKERS:
        if any((path / f).is_file() for f in files):
            return kind
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return MODEL
    if (path / "tokenizer.json").is_file():
        return TOKENIZER
    return None


def find_leftovers(root: Path) -> list[Path]:
    """Every `.*.tmp` file or folder below `root` (killed atomic writes), without entering them."""
    found: list[Path] = []

    def walk(folder: Path) -> None:
        try:
            entries = sorted(folder.iterdir())
        except OSError:
            return
        for p in entries:
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                found.append(p)
            elif p.is_dir() and not p.is_symlink():
                walk(p)

    walk(Path(root))
    return found


def clean_leftovers(paths: list[Path]) -> None:
    """Remove leftovers found by `find_leftovers`."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Run folder


def _recipe(c: Collector, path: Path) -> Any:
    """RUN/recipe.yaml validated into a Recipe, or None (problem recorded)."""
    import yaml

    from elmforest.study.recipe import recipe_from_dict

    rpath = path / "recipe.yaml"
    try:
        data = yaml.safe_load(rpath.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        c.add(rpath, "not valid YAML")
        return None
    if not isinstance(data, dict):
        c.add(rpath, "a recipe must be a mapping of keys to values")
        return None
    return c.attempt(rpath, lambda: recipe_from_dict(data, str(rpath)))


def _quiet_json(path: Path) -> dict[str, Any]:
    """A JSON object already checked elsewhere (its problems reported there), or {}."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_eval(c: Collector, folder: Path) -> None:
    """Evaluation caches (RUN/eval, rounds/<r>/eval): per-domain JSON with a finite NLL per method."""
    for f in sorted(folder.glob("*.json")):
        data = c.read_json(f, f"eval/{f.name}")
        nll = data.get("nll") if data is not None else None
        if data is not None and not (isinstance(nll, dict) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in nll.values())):
            c.add(f, "field 'nll' must map each method to a finite number")


def check_plots(c: Collector, folder: Path) -> None:
    """Every RUN/plots/*.png is a PNG image (written whole by the report)."""
    for f in sorted(folder.glob("*.png")):
        with open(f, "rb") as fh:
            if fh.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
                c.add(f, "not a PNG image")


def _forest_rules(c: Collector, path: Path, recipe: Any) -> None:
    """forest/ holds experts of the recipe's train domains; random_forest/ experts random0..random<n-1>."""
    if recipe is None or recipe.rounds:
        return
    n = len(recipe.train_domains)
    for folder, ok, what in (
        ("forest", lambda e: e.get("domain") in recipe.train_domains, "a train domain of the recipe"),
        ("random_forest", lambda e: e.get("name") in {f"random{i}" for i in range(n)}, f"one of random0..random{n - 1}"),
    ):
        for i, e in enumerate(_quiet_json(path / folder / "forest.json").get("experts") or []):
            if isinstance(e, dict) and not ok(e):
                c.add(path / folder / "forest.json", f"experts[{i}] ({e.get('name')}, domain {e.get('domain')}) is not {what}")


def check_arm_records(c: Collector, path: Path, recipe: Any) -> None:
    """Every trained arm's RUN/<arm folder>/arm.json (the registry of arms) validates and agrees with
    the figures in the arm's own files (tokens, FLOPs, parameters). A run folder written before
    arm.json existed has none yet (the next `elmforest run` derives them): not a problem."""
    from elmforest.study.arms import record_disagreements, record_path, trained_arms

    for file, message in record_disagreements(recipe, path):
        c.add(file, message)
    for arm, name in trained_arms(recipe):
        if arm.records and record_path(arm, path, name).is_file():
            c.report.checked.append(f"arm {name} {record_path(arm, path, name)}")


def check_run(c: Collector, path: Path) -> None:
    """The recipe validates; every part present validates by its role; the result files parse."""
    recipe = _recipe(c, path)
    domains = list(recipe.train_domains) if recipe is not None else None
    forest_names = [e.get("name") for e in _quiet_json(path / "forest" / "forest.json").get("experts") or []
                    if isinstance(e, dict)] or None
    parts: dict[str, tuple[str, Callable[[Path], Any]]] = {
        "tokenizer": (TOKENIZER, lambda p: check_tokenizer(c, p)),
        "seed": (SEED, lambda p: check_seed(c, p)),
        "dense": (DENSE, lambda p: check_dense(c, p)),
        "demix": (DEMIX, lambda p: check_demix(c, p, domains)),
        "btx": (BTX, lambda p: check_btx(c, p, forest_names)),
        "forest": (FOREST, lambda p: check_forest(c, p)),
        "random_forest": (FOREST, lambda p: check_forest(c, p)),
    }
    for f in [path / "results.json", path / "timing.json", path / "router.json", *sorted(path.glob("forget_*.json"))]:
        if f.is_file():
            c.read_json(f, f.name)
    found: dict[str, Any] = {}  # part -> what its check returned (tokenizer/: its hash)
    for sub in child_dirs(path):
        if sub.name == "btx" and not (sub / "mix.json").is_file():
            c.report.leftovers.append(sub)  # a BTX build killed before mix.json: rebuilt by the next run
        elif sub.name in parts:
            kind, fn = parts[sub.name]
            found[sub.name] = fn(sub)
            c.report.checked.append(f"{kind} {sub}")
        elif sub.name == "eval":
            check_eval(c, sub)
        elif sub.name == "plots":
            check_plots(c, sub)
        elif sub.name == "rounds":
            for r in child_dirs(sub):
                if (r / "round.json").is_file():
                    c.read_json(r / "round.json", "round.json")
                for part in child_dirs(r):
                    if part.name == "eval":
                        check_eval(c, part)
                    else:
                        _check_tree(c, part, depth=2)
        else:
            _check_tree(c, sub, depth=3)  # experts/<d>, random_experts/<r>, forget_<d>/forest, a/b/c/<folder>
    _forest_rules(c, path, recipe)
    if recipe is not None:
        check_arm_records(c, path, recipe)
    own = found.get("tokenizer")
    for rel in ("seed/seed.json", "dense/dense.json", "forest/forest.json", "random_forest/forest.json", "btx/mix.json"):
        recorded = _quiet_json(path / rel).get("tokenizer_hash")
        if own is not None and recorded is not None and recorded != own:
            c.add(path / rel, f"tokenizer_hash {recorded} differs from the run's tokenizer/ ({own})")


def _check_tree(c: Collector, path: Path, depth: int) -> None:
    """Validate `path` by its kind; an unmarked folder (experts/, rounds) is searched `depth` deep."""
    kind = detect_kind(path)
    if kind is None:
        if depth > 0:
            for sub in child_dirs(path):
                _check_tree(c, sub, depth - 1)
        return
    CHECKERS[kind](c, path)
    c.report.checked.append(f"{kind} {path}")


CHECKERS: dict[str, Callable[[Collector, Path], Any]] = {
    CORPUS: check_corpus,
    FOREST: check_forest,
    RUN: check_run,
    EXPERT: check_expert,
    DEMIX: check_demix,
    BTX: check_btx,
    SEED: check_seed,
    DENSE: check_dense,
    TRAINING: check_training,
    MODEL: check_model_folder,
    TOKENIZER: check_tokenizer,
}


def check_path(path: str | Path) -> Report:
    """Detect what `path` is and validate it deeply; raises ElmError only when nothing can be checked."""
    path = Path(path)
    if not path.exists():
        raise ElmError("path not found", path)
    if not path.is_dir():
        raise ElmError("not a folder: pass a corpus, tokenizer, model, expert, forest or run folder", path)
    kind = detect_kind(path)
    if kind is None:
        raise ElmError(
            "not an elmforest folder: no manifest.json, forest.json, recipe.yaml, expert.json, demix.json, "
            "mix.json, seed.json, dense.json, train.json, config.json + model.safetensors or tokenizer.json",
            path,
        )
    report = Report(path=path, kind=kind)
    c = Collector(report)
    CHECKERS[kind](c, path)
    report.checked.insert(0, f"{kind} {path}")
    report.leftovers = sorted(set(report.leftovers) | set(find_leftovers(path)))
    return report


# ---------------------------------------------------------------------------------------------
# Recipes, before anything is written


def check_recipe(recipe: Any, source: str | Path = "recipe", procs: int | None = None) -> None:
    """Everything about a recipe knowable before a run writes a file; raises the first ElmError.

    The corpus opens and has every domain; the splits a run reads are non-empty in the manifest;
    `tokenizer.path` and `model.path` folders load; the model size resolves; the budget divides
    into whole steps, domains and windows (`budget.plan_budget`) and the data-parallel process count
    (`procs`, default `launcher.procs_per_job`) divides every micro-batch's windows
    (`budget.check_data_parallel`). Splits too short for the context
    are caught when they are tokenised (`tokens.token_array` callers), since only then are their
    token counts known.
    """
    from elmforest.data.corpus import Corpus
    from elmforest.btm.seed import model_context
    from elmforest.models.factory import resolve_spec
    from elmforest.train.budget import check_data_parallel, plan_budget
    from elmforest.data.tokenizer import load_tokenizer

    corpus = Corpus(recipe.corpus)
    corpus.require([*recipe.train_domains, *recipe.novel_domains], f"{source}: train_domains/novel_domains")
    needed = [(d, s) for d in recipe.train_domains for s in ("train", "valid", "test")]
    needed += [(d, s) for d in recipe.novel_domains for s in ("valid", "test")]
    for domain, split in needed:
        stats = corpus.manifest["domains"][domain].get("splits", {}).get(split, {})
        if isinstance(stats, dict) and stats.get("documents") == 0:
            raise ElmError(f"domain {domain!r} has no {split} documents (manifest.json)", corpus.path)
    if recipe.tokenizer.path:
        load_tokenizer(Path(recipe.tokenizer.path))
    if recipe.model.path:
        mpath = Path(recipe.model.path)
        for name in ("config.json", "model.safetensors"):
            if not (mpath / name).is_file():
                raise ElmError(f"model.path is not a model folder: no {name}", mpath)
        context = model_context(recipe)  # model.context, at most the folder's positions
    else:
        context = resolve_spec(recipe.model, vocab_size=recipe.tokenizer.vocab_size).context
    if not recipe.rounds:  # growth rounds plan their own budgets (elmforest.study.rounds)
        check_data_parallel(plan_budget(recipe, context, str(source)), procs or recipe.launcher.procs_per_job, str(source))
