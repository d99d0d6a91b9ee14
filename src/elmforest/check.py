"""Deep validation of elmforest folders: what `elmforest check PATH` runs.

`check_path` detects what a folder is and validates it through and through, collecting every
problem instead of stopping at the first (each a one-line `Problem` naming the file):

    corpus          manifest.json          every split file parses; documents/bytes match the manifest
    tokenizer       tokenizer.json         loads; its hash equals the one recorded when it was trained
    model / expert  config.json + model.safetensors (+ expert.json)
                                           weights checksum, tensor names/shapes match config.json,
                                           expert.json fields, its hashes equal the folder's own
    training run    train.json             status parses; weights and train_state.pt (when present) load
    forest          forest.json            every expert present and valid, hashes equal everywhere
    run folder      recipe.yaml            the recipe validates, each stage folder present validates,
                                           results.json / timing.json / eval/*.json parse

A folder in the middle of being written by a live or killed process is a valid state: a training
run that has not checkpointed yet, an expert branched but not trained, an expert folder copied
into a forest but not yet in forest.json. `.*.tmp` files and folders are the leftovers of
killed atomic writes: harmless (the target is intact), reported separately and removable with
`clean_leftovers`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmforest.errors import ElmError

# The kind of folder, decided by the file that marks it (first match wins).
CORPUS, FOREST, RUN, EXPERT, MODEL, TRAINING, TOKENIZER = (
    "corpus", "forest", "run folder", "expert", "model folder", "training run", "tokenizer",
)


@dataclass(frozen=True)
class Problem:
    """One thing wrong, located at a file or folder."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class Report:
    """What `check_path` found: the folder's kind, problems, leftovers of killed writes, notes."""

    path: Path
    kind: str
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # "kind path" of every folder validated

    @property
    def ok(self) -> bool:
        return not self.problems


class _Collector:
    """Accumulates problems; `attempt` turns an ElmError from a loader into a Problem."""

    def __init__(self, report: Report):
        self.report = report

    def add(self, path: Path, message: str) -> None:
        self.report.problems.append(Problem(Path(path), " ".join(message.split())))

    def attempt(self, path: Path, fn: Callable[[], Any]) -> Any:
        """Run `fn`; on ElmError record it at the path it names (else `path`) and return None."""
        return self.run(path, fn)[1]

    def succeeds(self, path: Path, fn: Callable[[], Any]) -> bool:
        """Run `fn`; True when it raised no ElmError (which is recorded)."""
        return self.run(path, fn)[0]

    def run(self, path: Path, fn: Callable[[], Any]) -> tuple[bool, Any]:
        try:
            return True, fn()
        except ElmError as e:
            self.add(e.path or path, e.detail)
            return False, None


# ---------------------------------------------------------------------------------------------
# Detection


def detect_kind(path: Path) -> str | None:
    """What the folder `path` is, from the file that marks it; None when nothing marks it."""
    if (path / "forest.json").is_file():
        return FOREST
    if (path / "manifest.json").is_file():
        return CORPUS
    if (path / "recipe.yaml").is_file():
        return RUN
    if (path / "expert.json").is_file():
        return EXPERT
    if (path / "train.json").is_file() or (path / "job.json").is_file():
        return TRAINING
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
# Small readers


def _read_json(c: _Collector, path: Path, what: str) -> dict[str, Any] | None:
    from elmforest.forest import read_json

    return c.attempt(path, lambda: read_json(path, what))


def _child_dirs(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            yield p


# ---------------------------------------------------------------------------------------------
# Corpus


def check_corpus(c: _Collector, path: Path) -> None:
    """The manifest opens, every split file parses and its counts equal the manifest's."""
    from elmforest.corpus import SPLITS, Corpus

    corpus = c.attempt(path, lambda: Corpus(path))
    if corpus is None:
        return
    mpath = path / "manifest.json"
    for domain in corpus.domains:
        entry = corpus.manifest["domains"][domain]
        splits = entry.get("splits") if isinstance(entry, dict) else None
        if not isinstance(splits, dict):
            c.add(mpath, f"domains.{domain}.splits is missing or not a mapping")
            continue
        for split in SPLITS:
            file = path / domain / f"{split}.jsonl"
            if not file.is_file():
                c.add(file, "split file is missing")
                continue
            counted = {"documents": 0, "bytes": 0}

            def count(domain: str = domain, split: str = split, counted: dict = counted) -> None:
                for text in corpus.texts(domain, split):
                    counted["documents"] += 1
                    counted["bytes"] += len(text.encode("utf-8"))

            if not c.succeeds(file, count):
                continue
            stats = splits.get(split)
            if not isinstance(stats, dict):
                c.add(mpath, f"domains.{domain}.splits.{split} is missing")
                continue
            for key in ("documents", "bytes"):
                if key in stats and stats[key] != counted[key]:
                    c.add(file, f"holds {counted[key]} {key}, manifest.json says {stats[key]}")


# ---------------------------------------------------------------------------------------------
# Tokenizer


def check_tokenizer(c: _Collector, path: Path) -> str | None:
    """The tokenizer loads and its hash equals the one recorded at training; returns the hash."""
    from elmforest.tokenizer import TRAINING_FILE, load_tokenizer, tokenizer_hash

    if c.attempt(path, lambda: load_tokenizer(path)) is None:
        return None
    digest = tokenizer_hash(path)
    if (path / TRAINING_FILE).is_file():
        info = _read_json(c, path / TRAINING_FILE, TRAINING_FILE)
        recorded = (info or {}).get("tokenizer_hash")
        if recorded is not None and recorded != digest:
            c.add(path / "tokenizer.json", f"tokenizer hash {digest} differs from {recorded} recorded in {TRAINING_FILE}")
    return digest


# ---------------------------------------------------------------------------------------------
# Models, experts, training runs


def _expected_tensors(config: Any) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes a model of `config` saves (tied aliases dropped), without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unique = {name for name, _ in model.named_parameters()}  # tied tensors appear once
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    aliases = every - unique
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}


def check_model(c: _Collector, path: Path) -> str | None:
    """config.json parses, the weights match their checksum and the architecture; returns arch hash."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from elmforest.checkpoint import verify_weights
    from elmforest.models import arch_hash

    cpath, wpath = path / "config.json", path / "model.safetensors"
    raw = _read_json(c, cpath, "config.json")
    if raw is None:
        return None
    try:
        config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        c.add(cpath, f"not a Hugging Face model config ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return None
    if not wpath.is_file():
        c.add(path, "model folder has no model.safetensors")
        return None
    if not c.succeeds(wpath, lambda: verify_weights(wpath)):
        return None
    with safe_open(str(wpath), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    expected = _expected_tensors(config)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        what = (f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}" if extra
                else f"tensor {wrong[0]!r} has shape {found[wrong[0]]}, config.json implies {expected[wrong[0]]}")
        c.add(wpath, f"weights do not match config.json ({what})")
    return arch_hash(config)


def _tokenizer_files_hash(c: _Collector, path: Path) -> str | None:
    if not (path / "tokenizer.json").is_file():
        return None
    return check_tokenizer(c, path)


def check_expert(c: _Collector, path: Path) -> dict[str, Any] | None:
    """expert.json fields, the model, and the hashes expert.json records equal the folder's own."""
    from elmforest.forest import read_expert

    jpath = path / "expert.json"
    meta = c.attempt(path, lambda: read_expert(path))
    if meta is None:
        # read_expert stops at the first issue; still check the weights when they are there
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            check_model(c, path)
        return None
    for key in ("tokens", "flops", "steps"):
        if key in meta and (not isinstance(meta[key], int) or isinstance(meta[key], bool) or meta[key] < 0):
            c.add(jpath, f"field {key!r} must be a non-negative integer, got {meta[key]!r}")
    arch = check_model(c, path)
    if arch is not None and arch != meta["arch_hash"]:
        c.add(jpath, f"arch_hash {meta['arch_hash']} differs from config.json's {arch}")
    tok = _tokenizer_files_hash(c, path)
    if tok is not None and tok != meta["tokenizer_hash"]:
        c.add(jpath, f"tokenizer_hash {meta['tokenizer_hash']} differs from the folder's tokenizer {tok}")
    if (path / "train_state.pt").is_file():
        check_train_state(c, path / "train_state.pt")
    return meta


def check_train_state(c: _Collector, path: Path) -> None:
    from elmforest.checkpoint import load_train_state

    c.attempt(path, lambda: load_train_state(path))


def check_training(c: _Collector, path: Path) -> None:
    """A training run or a branched expert: possibly mid-way, so only what exists must be sound."""
    info = None
    if (path / "train.json").is_file():
        info = _read_json(c, path / "train.json", "train.json")
        if info is not None and info.get("status") not in ("running", "done", "stopped"):
            c.add(path / "train.json", f"field 'status' is {info.get('status')!r}; expected running, done or stopped")
    if (path / "job.json").is_file():
        job = _read_json(c, path / "job.json", "job.json")
        if job is not None:
            for key in ("name", "corpus", "tokenizer", "data", "spec"):
                if key not in job:
                    c.add(path / "job.json", f"field {key!r} is missing")
    finished = info is not None and info.get("status") in ("done", "stopped")
    if (path / "model.safetensors").is_file() or (path / "config.json").is_file() or finished:
        if not (path / "config.json").is_file():
            c.add(path, "model folder has no config.json")
        else:
            check_model(c, path)
    if (path / "train_state.pt").is_file():
        check_train_state(c, path / "train_state.pt")
    elif finished:
        c.add(path / "train.json", "status is finished but train_state.pt is missing")
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_bytes().splitlines()
        for i, line in enumerate(lines[:-1], 1):  # the last line may be torn by a kill (harmless)
            try:
                json.loads(line)
            except ValueError:
                c.add(metrics, f"line {i}: not valid JSON")
                break


# ---------------------------------------------------------------------------------------------
# Forest


def check_forest(c: _Collector, path: Path) -> None:
    """forest.json well formed, every listed expert present and valid, one tokenizer/architecture."""
    from elmforest.corpus import check_domain_name
    from elmforest.forest import FORMAT

    jpath = path / "forest.json"
    data = _read_json(c, jpath, "forest.json")
    if data is None:
        return
    if data.get("format") != FORMAT:
        c.add(jpath, f"field 'format' is {data.get('format')!r}; expected {FORMAT!r}")
    hashes = {}
    for key in ("tokenizer_hash", "arch_hash"):
        if not isinstance(data.get(key), str):
            c.add(jpath, f"field {key!r} is missing or not a string")
        else:
            hashes[key] = data[key]
    experts = data.get("experts")
    if not isinstance(experts, list):
        c.add(jpath, "field 'experts' must be a list")
        experts = []
    tok_dir = path / "tokenizer"
    if tok_dir.is_dir():
        tok = check_tokenizer(c, tok_dir)
        if tok is not None and "tokenizer_hash" in hashes and tok != hashes["tokenizer_hash"]:
            c.add(jpath, f"tokenizer_hash {hashes['tokenizer_hash']} differs from tokenizer/'s {tok}")
    else:
        c.add(path, "forest has no tokenizer/ folder")
    listed: set[str] = set()
    names: set[str] = set()
    for i, e in enumerate(experts):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("name", "domain", "path")):
            c.add(jpath, f"experts[{i}] must have string fields name, domain, path")
            continue
        if c.attempt(jpath, lambda e=e: check_domain_name(e["name"], jpath)) is None:
            continue
        if e["name"] in names:
            c.add(jpath, f"experts[{i}]: duplicate expert name {e['name']!r}")
        names.add(e["name"])
        rel = Path(e["path"])
        if rel.is_absolute() or ".." in rel.parts:
            c.add(jpath, f"experts[{i}].path {e['path']!r} escapes the forest folder")
            continue
        edir = path / rel
        listed.add(rel.parts[0] if rel.parts else "")
        if not edir.is_dir():
            c.add(jpath, f"experts[{i}] ({e['name']}) references a missing expert folder {e['path']!r}")
            continue
        meta = check_expert(c, edir)
        c.report.checked.append(f"{EXPERT} {edir}")
        if meta is None:
            continue
        for key, value in hashes.items():
            if meta.get(key) != value:
                c.add(edir / "expert.json", f"{key} {meta.get(key)} differs from forest.json's {value}")
    for sub in _child_dirs(path):
        if sub.name != "tokenizer" and sub.name not in listed and (sub / "model.safetensors").exists():
            c.report.leftovers.append(sub)  # copied in by a merge killed before forest.json changed


# ---------------------------------------------------------------------------------------------
# Run folder


def check_run(c: _Collector, path: Path) -> None:
    """The recipe validates; every stage folder present validates; the result files parse."""
    import yaml

    from elmforest.config import recipe_from_dict

    rpath = path / "recipe.yaml"
    try:
        data = yaml.safe_load(rpath.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        c.add(rpath, "not valid YAML")
        data = None
    if data is not None:
        if not isinstance(data, dict):
            c.add(rpath, "a recipe must be a mapping of keys to values")
        else:
            c.attempt(rpath, lambda: recipe_from_dict(data, str(rpath)))
    for name in ("results.json", "timing.json", "seed/seed.json", "dense/dense.json"):
        if (path / name).is_file():
            _read_json(c, path / name, name)
    if (path / "eval").is_dir():
        for f in sorted((path / "eval").glob("*.json")):
            _read_json(c, f, f"eval/{f.name}")
    for sub in _child_dirs(path):
        if sub.name == "eval":
            continue
        _check_tree(c, sub, depth=2)


def _check_tree(c: _Collector, path: Path, depth: int) -> None:
    """Validate `path` by its kind; an unmarked folder (experts/, rounds) is searched `depth` deep."""
    kind = detect_kind(path)
    if kind is None:
        if depth > 0:
            for sub in _child_dirs(path):
                _check_tree(c, sub, depth - 1)
        return
    CHECKERS[kind](c, path)
    c.report.checked.append(f"{kind} {path}")


def check_model_folder(c: _Collector, path: Path) -> None:
    """A plain model folder (the seed snapshot, an average): the model, and its train state if any."""
    check_model(c, path)
    if (path / "train_state.pt").is_file():
        check_train_state(c, path / "train_state.pt")


CHECKERS: dict[str, Callable[[_Collector, Path], Any]] = {
    CORPUS: check_corpus,
    FOREST: check_forest,
    RUN: check_run,
    EXPERT: check_expert,
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
            "not an elmforest folder: no manifest.json, forest.json, recipe.yaml, expert.json, train.json, "
            "config.json + model.safetensors or tokenizer.json",
            path,
        )
    report = Report(path=path, kind=kind)
    c = _Collector(report)
    CHECKERS[kind](c, path)
    report.checked.insert(0, f"{kind} {path}")
    report.leftovers = sorted(set(report.leftovers) | set(find_leftovers(path)))
    return report


# ---------------------------------------------------------------------------------------------
# Recipes, before anything is written


def check_recipe(recipe: Any, source: str | Path = "recipe") -> None:
    """Everything about a recipe knowable before a run writes a file; raises the first ElmError.

    The corpus opens and has every domain; the splits a run reads are non-empty in the manifest;
    `tokenizer.path` and `model.path` folders load; the model size resolves; the budget divides
    into whole steps, domains and windows (`phases.plan_budget`). Splits too short for the context
    are caught when they are tokenised (`tokens.token_array` callers), since only then are their
    token counts known.
    """
    from elmforest.corpus import Corpus
    from elmforest.forest import read_json
    from elmforest.models import resolve_spec
    from elmforest.phases import plan_budget
    from elmforest.tokenizer import load_tokenizer

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
        config = read_json(mpath / "config.json", "model config")
        context = config.get("n_positions") or config.get("max_position_embeddings")
        if not isinstance(context, int) or context < 2:
            raise ElmError("config.json has no context length (n_positions or max_position_embeddings)", mpath)
    else:
        context = resolve_spec(recipe.model, vocab_size=recipe.tokenizer.vocab_size).context
    if not recipe.rounds:  # growth rounds plan their own budgets (elmforest.rounds)
        plan_budget(recipe, context, str(source))
