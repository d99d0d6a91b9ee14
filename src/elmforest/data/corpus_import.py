"""Import users' own text into a corpus folder.

Each source is one domain:

    news.jsonl      -> domain "news"   one JSON object per line, the document in field `text`
    legal/          -> domain "legal"  every `*.txt` file below the folder is one document

A line (or `.txt` file) that cannot be used -- not UTF-8, bad JSON, not an object with a string
text field -- is an error by default: `ElmError` naming the file, the line number and what is
wrong, so a script importing a broken file stops instead of training on part of it. With
`skip_bad_lines=True` such lines are skipped and counted per reason instead (never dropped
silently; the caller prints the counts). Blank lines and blank documents are always skipped
and counted. Everything is validated in a first pass (paths, names, binary files, every line,
at least one usable document per domain) before a second pass streams the documents into
`corpus.write_corpus`, so a bad source never leaves a half-written corpus and large inputs are
never held in memory.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmforest.data.corpus import MANIFEST, DomainSource, check_domain_name, write_corpus
from elmforest.errors import ElmError

# Reasons a line or file is skipped; the keys of `ImportedDomain.skipped`.
BLANK = "blank"
NOT_UTF8 = "not UTF-8"
BAD_JSON = "bad JSON"
MISSING_FIELD = "missing field"
SKIP_REASONS = (BLANK, NOT_UTF8, BAD_JSON, MISSING_FIELD)

_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git and grep do)


@dataclass
class ImportedDomain:
    """One source: its domain name, where it came from, usable documents and skipped counts."""

    name: str
    path: Path
    kind: str  # "jsonl" or "txt folder"
    usable: int = 0
    skipped: Counter = field(default_factory=Counter)


def _check_text_file(path: Path) -> None:
    """Fail on a path that cannot be opened or that holds binary data rather than text."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise ElmError(f"cannot read file ({e.strerror or e})", path) from None
    if b"\x00" in head:
        raise ElmError("binary file (NUL bytes), not text", path)


def _bad_line(path: Path, lineno: int, what: str, reason: str, skipped: Counter, skip_bad: bool) -> None:
    """Count a bad line under `reason` when skipping, else raise the one-line error naming it."""
    if not skip_bad:
        raise ElmError(f"line {lineno}: {what}; fix the line or pass --skip-bad-lines to skip such lines", path)
    skipped[reason] += 1


def _jsonl_documents(path: Path, text_field: str, skipped: Counter, skip_bad: bool = False) -> Iterator[str]:
    """Yield the `text_field` of each line of a JSONL file; count the blank (and, when
    `skip_bad`, the bad) lines skipped, or raise on the first bad line (line numbers from 1)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                skipped[BLANK] += 1
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                what = f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
                _bad_line(path, lineno, what, NOT_UTF8, skipped, skip_bad)
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # without its line end, so errors read as in an editor
            except json.JSONDecodeError as e:
                _bad_line(path, lineno, f"bad JSON at column {e.colno} ({e.msg})", BAD_JSON, skipped, skip_bad)
                continue
            except ValueError as e:  # e.g. a number too large to convert
                _bad_line(path, lineno, f"bad JSON ({e})", BAD_JSON, skipped, skip_bad)
                continue
            if not isinstance(obj, dict):
                what = f"a JSON {_json_type(obj)}, not an object with a string field {text_field!r}"
                _bad_line(path, lineno, what, MISSING_FIELD, skipped, skip_bad)
                continue
            if text_field not in obj:
                _bad_line(path, lineno, f"no field {text_field!r} (see --text-field)", MISSING_FIELD, skipped, skip_bad)
                continue
            text = obj[text_field]
            if not isinstance(text, str):
                what = f"field {text_field!r} is a JSON {_json_type(text)}, not a string"
                _bad_line(path, lineno, what, MISSING_FIELD, skipped, skip_bad)
                continue
            if not text.strip():
                skipped[BLANK] += 1
                continue
            yield text


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _txt_files(folder: Path) -> list[Path]:
    """The `*.txt` files below a folder (hidden ones excluded), in a stable order."""
    return sorted(
        p
        for p in folder.rglob("*.txt")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _txt_documents(folder: Path, skipped: Counter, skip_bad: bool = False) -> Iterator[str]:
    """Yield each `*.txt` file below a folder as one document; count the files skipped, or raise
    on the first file that is not UTF-8 unless `skip_bad`."""
    for p in _txt_files(folder):
        data = p.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            if not skip_bad:
                raise ElmError(f"not UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start + 1}); fix the file "
                               "or pass --skip-bad-lines to skip such files", p) from None
            skipped[NOT_UTF8] += 1
            continue
        if not text.strip():
            skipped[BLANK] += 1
            continue
        yield text


def _source_documents(dom: ImportedDomain, text_field: str, skipped: Counter, skip_bad: bool = False) -> Iterator[str]:
    if dom.kind == "jsonl":
        return _jsonl_documents(dom.path, text_field, skipped, skip_bad)
    return _txt_documents(dom.path, skipped, skip_bad)


def inspect_sources(
    srcs: Sequence[str | Path], text_field: str = "text", skip_bad_lines: bool = False
) -> list[ImportedDomain]:
    """Validate every source and count usable and skipped documents, writing nothing.

    Raises `ElmError` naming the file for: a missing or unreadable path, a binary file, an unsafe
    or duplicate domain name, a domain without a single usable document, and (unless
    `skip_bad_lines`) the first bad line, with its number, or the first non-UTF-8 `.txt` file.
    """
    if not srcs:
        raise ElmError("no sources given: pass JSONL files or folders of .txt files")
    domains: list[ImportedDomain] = []
    by_name: dict[str, Path] = {}
    for src in srcs:
        path = Path(src)
        if not path.exists():
            raise ElmError("source not found", path)
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ElmError("source is not readable (permission denied)", path)
        if path.is_dir():
            dom = ImportedDomain(name=path.resolve().name, path=path, kind="txt folder")
            files = _txt_files(path)
            if not files:
                raise ElmError("folder holds no .txt files", path)
            for p in files:
                _check_text_file(p)
        else:
            dom = ImportedDomain(name=path.stem, path=path, kind="jsonl")
            _check_text_file(path)
        check_domain_name(dom.name, path)
        if dom.name in by_name:
            raise ElmError(f"domain {dom.name!r} also comes from {by_name[dom.name]}; rename one source", path)
        by_name[dom.name] = path
        try:
            dom.usable = sum(1 for _ in _source_documents(dom, text_field, dom.skipped, skip_bad_lines))
        except OSError as e:
            raise ElmError(f"cannot read source ({e.strerror or e})", path) from None
        if dom.usable == 0:
            counts = ", ".join(f"{n} {r}" for r, n in dom.skipped.items()) or "it is empty"
            what = f"no line has a non-empty string field {text_field!r}" if dom.kind == "jsonl" else "no usable .txt file"
            raise ElmError(f"domain {dom.name!r} has zero usable documents ({what}; skipped: {counts})", path)
        domains.append(dom)
    return domains


def import_sources(
    srcs: Sequence[str | Path],
    out: str | Path,
    text_field: str = "text",
    novel: Sequence[str] = (),
    skip_bad_lines: bool = False,
) -> tuple[dict[str, Any], list[ImportedDomain]]:
    """Import JSONL files / folders of `.txt` files as the domains of a new corpus at `out`.

    A bad line (not UTF-8, bad JSON, no string text field) raises `ElmError` naming the file and
    line before anything is written, unless `skip_bad_lines`: then it is skipped and counted.

    Domains named in `novel` get role "novel" in the manifest (held out from expert training,
    used for out-of-domain evaluation); the others get role "train".

    Returns the manifest written and the per-domain counts (usable and skipped documents).
    Exact duplicates within a domain are dropped by `write_corpus`; the manifest holds the
    counts after that.
    """
    out = Path(out)
    # Cheap checks on the output first, so a long validation pass is not wasted.
    if (out / MANIFEST).exists():
        raise ElmError("a corpus already exists here; choose another --out or delete it", out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ElmError("output folder exists and is not empty", out)
    domains = inspect_sources(srcs, text_field, skip_bad_lines)
    names = [dom.name for dom in domains]
    for name in novel:
        if name not in names:
            raise ElmError(f"--novel {name!r} is not one of the imported domains ({', '.join(names)})")
    sources = []
    for dom in domains:
        # Second pass streams the documents; its skip counts repeat the first pass's, so discard them.
        documents = _source_documents(dom, text_field, Counter(), skip_bad_lines)
        sources.append(
            DomainSource(
                name=dom.name,
                documents=documents,
                source=str(dom.path.resolve()),
                extra={
                    "role": "novel" if dom.name in novel else "train",
                    "import": {"kind": dom.kind, "text_field": text_field, "skip_bad_lines": skip_bad_lines,
                               "skipped": dict(dom.skipped)},
                },
            )
        )
    manifest = write_corpus(out, sources, description="imported with `elmforest corpus import`")
    return manifest, domains
