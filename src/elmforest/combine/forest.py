"""A forest: experts sharing one tokenizer and architecture, described by `forest.json`.

    FOREST/
      forest.json        {"format", "tokenizer_hash", "arch_hash", "experts": [{"name", "domain", "path"}]}
                         (+ "base_sha256" in an adapter forest)
      tokenizer/         the shared tokenizer
      base/              an adapter forest's frozen base model, stored once (hard links to the seed's
                         files where the filesystem allows, else a copy), named by its content hash
      <expert>/          an HF model folder plus expert.json (see docs/ARCHITECTURE.md), or, in an
                         adapter forest, PEFT's adapter files plus expert.json naming its base by hash

A forest holds full experts or adapter experts, never both; an adapter expert joins only the forest
whose base hash equals the one its expert.json records (`models.adapters.base_sha256`).

`forest.json` is only changed under `FOREST/.forest.lock` and always written atomically, so
concurrent merges are safe and a killed process never leaves it half-written. On removal the
entry goes first and the folder after, so `forest.json` never names a missing expert.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from elmforest import storage
from elmforest.data.corpus import check_domain_name
from elmforest.errors import ElmError
from elmforest.data.tokenizer import CONFIG_FILE, SPECIAL_TOKENS_FILE, TOKENIZER_FILE, TRAINING_FILE

FOREST_JSON = "forest.json"
EXPERT_JSON = "expert.json"
FORMAT = "elmforest-forest/1"
WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # an adapter expert's (`models.adapters`, PEFT's name)
BASE_DIR = "base"  # an adapter forest's frozen base model
BASE_FILES = (WEIGHTS, "config.json", "generation_config.json")
LOCK_NAME = ".forest.lock"
# What a forest's tokenizer/ holds (the files of `elmforest.data.tokenizer`).
TOKENIZER_FOLDER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_FILE, TRAINING_FILE)


@dataclass(frozen=True)
class ExpertEntry:
    name: str
    domain: str
    path: str  # relative to the forest folder


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, or raise an ElmError naming the file."""
    if not path.is_file():
        raise ElmError(f"{what} is missing", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ElmError(f"{what} is not valid JSON", path) from None
    if not isinstance(data, dict):
        raise ElmError(f"{what} must be a JSON object", path)
    return data


def is_adapter_expert(meta: dict[str, Any]) -> bool:
    """Whether an expert.json describes an adapter expert (it names its base by hash)."""
    return "base_sha256" in meta


def expert_weights(expert_dir: str | Path) -> Path:
    """An expert folder's weights file: model.safetensors, or an adapter expert's adapter_model.safetensors."""
    expert_dir = Path(expert_dir)
    return expert_dir / WEIGHTS if (expert_dir / WEIGHTS).is_file() else expert_dir / ADAPTER_WEIGHTS


def read_expert(expert_dir: str | Path) -> dict[str, Any]:
    """Read and check an expert folder's `expert.json` (name, domain, hashes; an adapter expert's
    base hash) and weights."""
    expert_dir = Path(expert_dir)
    if not expert_dir.is_dir():
        raise ElmError("expert folder not found", expert_dir)
    meta = read_json(expert_dir / EXPERT_JSON, "expert.json")
    for key in ("name", "domain", "tokenizer_hash", "arch_hash"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ElmError(f"field {key!r} is missing or not a string", expert_dir / EXPERT_JSON)
    check_domain_name(meta["name"], expert_dir / EXPERT_JSON)
    if is_adapter_expert(meta):
        if not isinstance(meta["base_sha256"], str) or not meta["base_sha256"]:
            raise ElmError("field 'base_sha256' is not a string", expert_dir / EXPERT_JSON)
        if not (expert_dir / ADAPTER_WEIGHTS).is_file():
            raise ElmError(f"adapter expert folder has no {ADAPTER_WEIGHTS}", expert_dir)
    elif not (expert_dir / WEIGHTS).is_file():
        raise ElmError(f"model folder has no {WEIGHTS}", expert_dir)
    return meta


class Forest:
    """An existing forest folder, validated on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ElmError("forest folder not found", self.path)
        self._load()

    def _load(self) -> None:
        jpath = self.path / FOREST_JSON
        data = read_json(jpath, "forest.json")
        if data.get("format") != FORMAT:
            raise ElmError(f"field 'format' must be {FORMAT!r}", jpath)
        for key in ("tokenizer_hash", "arch_hash"):
            if not isinstance(data.get(key), str):
                raise ElmError(f"field {key!r} is missing or not a string", jpath)
        if "base_sha256" in data:
            if not isinstance(data["base_sha256"], str):
                raise ElmError("field 'base_sha256' is not a string", jpath)
            if not (self.path / BASE_DIR / WEIGHTS).is_file():
                raise ElmError(f"an adapter forest needs its base model in {BASE_DIR}/ ({WEIGHTS} is missing)", jpath)
        experts = data.get("experts")
        if not isinstance(experts, list):
            raise ElmError("field 'experts' must be a list", jpath)
        entries = []
        for i, e in enumerate(experts):
            if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("name", "domain", "path")):
                raise ElmError(f"experts[{i}] must have string fields name, domain, path", jpath)
            check_domain_name(e["name"], jpath)
            if Path(e["path"]).is_absolute() or ".." in Path(e["path"]).parts:
                raise ElmError(f"experts[{i}].path {e['path']!r} escapes the forest folder", jpath)
            if not expert_weights(self.path / e["path"]).is_file():
                raise ElmError(f"experts[{i}] ({e['name']}) references a missing expert folder {e['path']!r}", jpath)
            entries.append(ExpertEntry(e["name"], e["domain"], e["path"]))
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ElmError("duplicate expert names", jpath)
        self.data = data
        self.experts: list[ExpertEntry] = entries

    # -- queries ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def expert(self, name: str) -> ExpertEntry:
        for e in self.experts:
            if e.name == name:
                return e
        raise ElmError(f"no expert {name!r} in this forest (has: {', '.join(self.names) or 'none'})", self.path)

    def expert_dir(self, name: str) -> Path:
        return self.path / self.expert(name).path

    def expert_meta(self, name: str) -> dict[str, Any]:
        return read_expert(self.expert_dir(name))

    @property
    def base_sha256(self) -> str | None:
        """An adapter forest's base hash (None: a forest of full experts)."""
        return self.data.get("base_sha256")

    @property
    def base_dir(self) -> Path | None:
        """An adapter forest's frozen base model folder (None: a forest of full experts)."""
        return self.path / BASE_DIR if self.base_sha256 is not None else None

    @property
    def config_dir(self) -> Path:
        """A folder holding the experts' config.json: the base's, or the first expert's."""
        return self.base_dir if self.base_dir is not None else self.expert_dir(self.names[0])

    # -- creation and changes --------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path, tokenizer_dir: str | Path, tokenizer_hash: str, arch_hash: str, base_dir: str | Path | None = None
    ) -> "Forest":
        """Create an empty forest with a copy of the tokenizer (no-op if it already exists and matches).
        `base_dir`: an adapter forest, whose frozen base (that model folder) is stored once in FOREST/base.

        Runs under the forest's lock, so two processes creating the same forest at once (two
        concurrent first merges) agree on one forest.json instead of overwriting each other's.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        base_hash = None
        if base_dir is not None:
            from elmforest.models.adapters import base_sha256  # torch: imported only for adapter forests

            base_hash = base_sha256(base_dir)
        with FileLock(str(path / LOCK_NAME), timeout=600):
            if not (path / FOREST_JSON).exists():
                if not (path / "tokenizer").exists():
                    with storage.atomic_dir(path / "tokenizer") as tmp:
                        for name in TOKENIZER_FOLDER_FILES:  # the tokenizer only, not a model's weights
                            if (Path(tokenizer_dir) / name).is_file():
                                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
                record = {"format": FORMAT, "tokenizer_hash": tokenizer_hash, "arch_hash": arch_hash, "experts": []}
                if base_dir is not None:
                    _store_base(Path(base_dir), path / BASE_DIR)
                    record["base_sha256"] = base_hash
                storage.write_json(path / FOREST_JSON, record)
        forest = cls(path)
        if (forest.data["tokenizer_hash"], forest.data["arch_hash"], forest.base_sha256) != (tokenizer_hash, arch_hash, base_hash):
            raise ElmError("a different forest (tokenizer, architecture or adapter base) already exists here", path)
        return forest

    def _lock(self) -> FileLock:
        return FileLock(str(self.path / LOCK_NAME), timeout=600)

    def _write(self, experts: list[dict[str, str]]) -> None:
        data = dict(self.data)
        data["experts"] = experts
        storage.write_json(self.path / FOREST_JSON, data)

    def merge(self, expert_dir: str | Path, name: str | None = None) -> ExpertEntry:
        """Add a trained expert: check its tokenizer and architecture (an adapter expert: its base
        hash against the forest's), copy it in, record it.

        An expert folder already inside the forest is recorded without copying.
        """
        expert_dir = Path(expert_dir)
        meta = read_expert(expert_dir)
        name = check_domain_name(name or meta["name"])
        jpath = expert_dir / EXPERT_JSON
        if meta["tokenizer_hash"] != self.data["tokenizer_hash"]:
            raise ElmError(
                f"tokenizer {meta['tokenizer_hash']} differs from the forest's {self.data['tokenizer_hash']}", jpath
            )
        if meta["arch_hash"] != self.data["arch_hash"]:
            raise ElmError(f"architecture {meta['arch_hash']} differs from the forest's {self.data['arch_hash']}", jpath)
        if is_adapter_expert(meta) != (self.base_sha256 is not None):
            kinds = ("an adapter expert", "full experts") if is_adapter_expert(meta) else ("a full expert", "adapter experts")
            raise ElmError(f"{kinds[0]} cannot join a forest of {kinds[1]}", jpath)
        if is_adapter_expert(meta) and meta["base_sha256"] != self.base_sha256:
            raise ElmError(f"base_sha256 {meta['base_sha256']} differs from the forest's base {self.base_sha256}", jpath)
        if name == BASE_DIR and self.base_sha256 is not None:
            raise ElmError(f"an adapter forest keeps its base model in {BASE_DIR}/; merge the expert under another --name", jpath)
        from elmforest.models.checkpoint import verify_weights  # torch: imported only when merging

        verify_weights(expert_weights(expert_dir))  # a corrupt checkpoint never enters a forest
        with self._lock():
            self._load()
            if name in self.names:
                raise ElmError(f"the forest already has an expert named {name!r}; remove it first", self.path)
            target = self.path / name
            inside = expert_dir.resolve() == target.resolve()
            if not inside:
                if target.exists():
                    shutil.rmtree(target)  # a leftover of an interrupted merge: not in forest.json
                with storage.atomic_dir(target) as tmp:
                    for f in expert_dir.iterdir():
                        if f.is_file() and f.name not in ("train_state.pt",) and not f.name.startswith("."):
                            shutil.copy2(f, tmp / f.name)
            entries = [e.__dict__ for e in self.experts] + [{"name": name, "domain": meta["domain"], "path": name}]
            self._write(entries)
            self._load()
        return self.expert(name)

    def remove(self, name: str) -> None:
        """Drop an expert: first from forest.json, then its folder."""
        with self._lock():
            self._load()
            entry = self.expert(name)
            self._write([e.__dict__ for e in self.experts if e.name != name])
            self._load()
            shutil.rmtree(self.path / entry.path, ignore_errors=True)


def _store_base(base_dir: Path, target: Path) -> None:
    """FOREST/base: the base model's files, hard-linked (files here are written once, atomically, and
    never changed in place) or copied where links cannot be made."""
    if not (base_dir / WEIGHTS).is_file():
        raise ElmError(f"the adapter base is not a model folder (no {WEIGHTS})", base_dir)
    if target.exists():
        shutil.rmtree(target)  # a leftover of a create killed before forest.json was written
    with storage.atomic_dir(target) as tmp:
        for name in BASE_FILES:
            if (base_dir / name).is_file():
                try:
                    os.link(base_dir / name, tmp / name)
                except OSError:
                    shutil.copy2(base_dir / name, tmp / name)
