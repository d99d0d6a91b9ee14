"""A corpus is a folder of domains, each split into train/valid/test JSONL files.

    CORPUS/
      manifest.json            domains, per-split documents/bytes(/tokens), source, licence
      <domain>/train.jsonl     one {"text": ...} per line
      <domain>/valid.jsonl
      <domain>/test.jsonl

Splits are decided per document by a hash of its text, so they are deterministic, disjoint and
stable when documents are added: ~5% valid, ~5% test, the rest train.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmforest import storage
from elmforest.errors import ElmError

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_domain_name(name: str, where: str | Path | None = None) -> str:
    """A domain (or expert) name must be a safe folder name: letters, digits, `_.-`, no `..`."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise ElmError(
            f"unsafe domain name {name!r}: use 1-64 letters, digits, '_', '-', '.' (no path separators or '..')",
            where,
        )
    return name


def split_of(text: str, valid_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """Deterministic split of one document from a hash of its text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    u = h / 2**64
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


@dataclass
class DomainSource:
    """Documents of one domain plus where they came from."""

    name: str
    documents: Iterable[str]
    source: str = ""
    licence: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class DigestSet:
    """A set of 64-bit document digests in an open-addressing table (`array` of uint64, linear
    probing, kept at most half full): 16-32 bytes a document, where a Python set of digests
    costs ~110, so de-duplicating a large import holds little memory. Two different documents
    share a digest with probability ~n^2 / 2^64 (1e-5 for 14 million documents)."""

    def __init__(self, slots: int = 1 << 12):
        self.table = array("Q", bytes(8 * slots))  # 0 marks an empty slot
        self.mask = slots - 1
        self.size = 0

    def add(self, text: str) -> bool:
        """Add the document's digest; False if it was already there (an exact duplicate)."""
        key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") | 1
        return self._insert(key)

    def _insert(self, key: int) -> bool:
        table, mask = self.table, self.mask
        i = (key >> 1) & mask
        while True:
            slot = table[i]
            if slot == 0:
                break
            if slot == key:
                return False
            i = (i + 1) & mask
        table[i] = key
        self.size += 1
        if 2 * self.size > len(table):
            self._grow()
        return True

    def _grow(self) -> None:
        old = self.table
        self.table = array("Q", bytes(16 * len(old)))
        self.mask = len(self.table) - 1
        self.size = 0
        for key in old:
            if key:
                self._insert(key)


class _DomainWriter:
    """One domain's three split files: strips documents, drops blank ones and exact duplicates,
    splits the rest by `split_of` and counts documents and bytes per split."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.seen = DigestSet()  # the documents written, to drop exact duplicates
        self.stats = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        self.files = {s: open(folder / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}

    def add(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if not self.seen.add(text):
            return
        s = split_of(text)
        self.files[s].write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        self.stats[s]["documents"] += 1
        self.stats[s]["bytes"] += len(text.encode("utf-8"))

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.seen = DigestSet()  # free the table


def _require_documents(name: str, stats: dict[str, dict[str, int]]) -> None:
    if sum(st["documents"] for st in stats.values()) == 0:
        raise ElmError(f"domain {name!r} has no documents")


def write_corpus(
    out: str | Path,
    domains: Iterable[DomainSource],
    description: str = "",
    records: Iterable[tuple[str, str]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a corpus folder atomically (built in a temporary folder, renamed when complete).

    Documents are stripped, blank ones dropped and exact duplicates removed within a domain.
    Each domain's `documents` are read in turn, one domain's files open at a time. When
    `records` is given, it replaces the domains' `documents`: (domain name, text) pairs in any
    order, so that one pass over a source holding several domains feeds them all (every domain
    listed in `domains` must receive a document; the domains' split files are open together).
    `extra` adds top-level manifest fields. Returns the manifest.
    """
    out = Path(out)
    if (out / MANIFEST).exists():
        raise ElmError("a corpus already exists here; choose another --out or delete it", out)
    if out.exists() and any(out.iterdir()):
        raise ElmError("output folder exists and is not empty", out)
    if out.exists():
        out.rmdir()
    manifest: dict[str, Any] = {"format": "elmforest-corpus/1", "description": description, **(extra or {}),
                                "domains": {}}
    domains = list(domains)
    stats: dict[str, dict[str, dict[str, int]]] = {}
    with storage.atomic_dir(out) as tmp:
        for dom in domains:
            check_domain_name(dom.name)
            if dom.name in stats:
                raise ElmError(f"duplicate domain {dom.name!r}")
            stats[dom.name] = {}
        if records is None:
            for dom in domains:
                writer = _DomainWriter(tmp / dom.name)
                try:
                    for text in dom.documents:
                        writer.add(text)
                finally:
                    writer.close()
                stats[dom.name] = writer.stats
                _require_documents(dom.name, writer.stats)  # before reading the next domain
        else:
            writers = {dom.name: _DomainWriter(tmp / dom.name) for dom in domains}
            try:
                for name, text in records:
                    if name not in writers:
                        raise ElmError(f"document for domain {name!r}, which is not one of the domains listed")
                    writers[name].add(text)
            finally:
                for writer in writers.values():
                    writer.close()
            stats = {name: writer.stats for name, writer in writers.items()}
        for dom in domains:
            _require_documents(dom.name, stats[dom.name])
            manifest["domains"][dom.name] = {
                "source": dom.source,
                "licence": dom.licence,
                "splits": stats[dom.name],
                **dom.extra,
            }
        if not manifest["domains"]:
            raise ElmError("no domains to write", out)
        storage.write_json(tmp / MANIFEST, manifest)
    return manifest


class Corpus:
    """A corpus folder opened for reading; validates the manifest and the domain folders."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise ElmError("corpus folder not found", self.path)
        if not mpath.is_file():
            raise ElmError("not a corpus: manifest.json is missing", self.path)
        try:
            self.manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ElmError("manifest is not valid JSON", mpath) from None
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("domains"), dict):
            raise ElmError("manifest field 'domains' is missing or not a mapping", mpath)
        for name in self.manifest["domains"]:
            check_domain_name(name, mpath)

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    def require(self, domains: Iterable[str], where: str | Path | None = None) -> None:
        for d in domains:
            if d not in self.manifest["domains"]:
                raise ElmError(f"domain {d!r} is not in corpus {self.path} (has: {', '.join(self.domains)})", where)

    def split_path(self, domain: str, split: str) -> Path:
        if split not in SPLITS:
            raise ElmError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        self.require([domain])
        return self.path / domain / f"{split}.jsonl"

    def documents(self, domain: str, split: str) -> int | None:
        """How many documents a split holds, as the manifest records (None when it does not say)."""
        self.require([domain])
        n = self.manifest["domains"][domain].get("splits", {}).get(split, {}).get("documents")
        return n if isinstance(n, int) else None

    def texts(self, domain: str, split: str) -> Iterator[str]:
        """Yield the documents of one split, validating each line."""
        path = self.split_path(domain, split)
        if not path.is_file():
            raise ElmError("split file is missing", path)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise ElmError(f"line {lineno}: not UTF-8 text", path) from None
                except ValueError:
                    raise ElmError(f"line {lineno}: not valid JSON", path) from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ElmError(f"line {lineno}: field 'text' is missing or not a string", path)
                yield obj["text"]

    def update_manifest(self, fn) -> None:
        """Apply `fn(manifest)` and write the manifest back atomically (e.g. to record token counts)."""
        fn(self.manifest)
        storage.write_json(self.path / MANIFEST, self.manifest)
