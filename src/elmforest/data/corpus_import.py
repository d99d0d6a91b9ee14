"""Import users' own text into a corpus folder.

Without a domain field, each source is one domain, named after it:

    news.jsonl               -> domain "news"     one JSON object per line, the document in field `text`
    news.jsonl.gz / .zst     -> domain "news"     the same, gzip- or zstd-compressed
    news.parquet / .arrow    -> domain "news"     one record per row (Arrow: IPC file or stream format)
    news/ (save_to_disk)     -> domain "news"     a folder written by `datasets.Dataset.save_to_disk`
    legal/                   -> domain "legal"    every `*.txt` file below the folder is one document

(`record_formats` reads each format, streaming.) `text_field` names the document's field,
dotted for nested records (`meta.body`). With `domain_field` (dotted too, e.g.
`meta.pile_set_name`) every record names its own domain instead, so one source can hold many
domains and one domain can span several sources (the shards of one dataset); a `datasets`
ClassLabel field names the domain by its label name.

A line or record that cannot be used -- not UTF-8, bad JSON, no string text field, no domain
field, corrupt compressed data -- is an error by default: `ElmError` naming the file, the line
or record number and what is wrong, so a script importing a broken file stops instead of
training on part of it. With `skip_bad_lines=True` such records are skipped and counted per
reason instead (never dropped silently; the caller prints the counts): against their domain,
or, when the record's domain is unknown, against their source as "unassigned". Corrupt data
ends its source: the records before it are kept. Blank lines and blank documents are always
skipped and counted. Everything is validated in a first pass (paths, names, binary files,
every record, at least one usable document per domain) before a second pass streams the
documents into `corpus.write_corpus`, so a bad source never leaves a half-written corpus and
large inputs are never held in memory.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmforest.data.corpus import MANIFEST, DomainSource, check_domain_name, write_corpus
from elmforest.data.record_formats import (
    BLANK, CORRUPT, JSONL_KINDS, MISSING_FIELD, NOT_UTF8, SKIP_REASONS, TXT_FOLDER, Bad,
    RecordSource, source_kind,
)
from elmforest.errors import ElmError

__all__ = ["SKIP_REASONS", "ImportedDomain", "ImportPlan", "inspect_sources", "import_sources"]

_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file (as git and grep do)
MAX_DOMAINS = 256  # distinct values of a domain field: more means the field does not label domains
_MISSING = object()


@dataclass
class ImportedDomain:
    """One domain: its name, the sources it came from, usable documents and skipped counts."""

    name: str
    sources: list[Path]
    kinds: list[str]  # each source's kind: "jsonl", "jsonl.gz", "parquet", "txt folder", ...
    usable: int = 0
    skipped: Counter = field(default_factory=Counter)

    @property
    def path(self) -> Path:
        return self.sources[0]

    @property
    def kind(self) -> str:
        return "+".join(dict.fromkeys(self.kinds))


@dataclass
class ImportPlan:
    """What the first pass found: the domains in order of first appearance, and (with a domain
    field) per source the records skipped before their domain was known."""

    domains: list[ImportedDomain]
    unassigned: dict[Path, Counter] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # domain -> the --domain-field label it came from


@dataclass
class _Source:
    path: Path
    kind: str
    name: str  # the domain when there is no domain field


def _check_text_head(head: bytes, path: Path) -> None:
    if b"\x00" in head:
        raise ElmError("binary file (NUL bytes), not text", path)


def _check_text_file(path: Path) -> None:
    """Fail on a path that cannot be opened or that holds binary data rather than text."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise ElmError(f"cannot read file ({e.strerror or e})", path) from None
    _check_text_head(head, path)


def _bad(path: Path, unit: str, n: int, bad: Bad, skipped: Counter, skip_bad: bool) -> None:
    """Count a bad line/record under its reason when skipping, else raise the one-line error naming it."""
    if not skip_bad:
        if bad.reason == CORRUPT:
            hint = (f"the file cannot be read past this point; repair or fetch it again, or pass --skip-bad-lines "
                    f"to keep the {unit}s before it")
        else:
            hint = f"fix the {unit} or pass --skip-bad-lines to skip such {unit}s"
        raise ElmError(f"{unit} {n}: {bad.what}; {hint}", path)
    skipped[bad.reason] += 1


def _type_name(value: Any, json_source: bool) -> str:
    """The JSON (or, for tables, plain) name of a decoded value's type, for error messages."""
    if value is None:
        name = "null"
    elif isinstance(value, bool):
        name = "boolean"
    elif isinstance(value, (int, float)):
        name = "number"
    elif json_source:
        name = {list: "array", dict: "object"}.get(type(value), type(value).__name__)
    else:
        name = {list: "list", dict: "struct", bytes: "bytes"}.get(type(value), type(value).__name__)
    return f"a JSON {name}" if json_source else ("null" if value is None else f"a {name}")


def _field(record: dict, dotted: str) -> Any:
    """record[dotted] if that key exists, else the nested lookup a.b.c, else _MISSING."""
    if dotted in record:
        return record[dotted]
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


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


def label_domain(label: str) -> str:
    """The domain name a `--domain-field` label gets: the label itself when it is a safe folder
    name, else with each run of other characters turned into `_` ("PubMed Central" ->
    "PubMed_Central", "ArXiv/cs" -> "ArXiv_cs"), cut to 64 characters; "" when nothing is left."""
    try:
        return check_domain_name(label)
    except ElmError:
        pass
    name = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "_", label))
    return name.lstrip("_.-")[:64].rstrip("_.-") or ""


def _documents(
    src: _Source, text_field: str, domain_field: str | None, skipped: dict[str | None, Counter], skip_bad: bool,
    seen: dict[str, str] | None = None,
) -> Iterator[tuple[str, str]]:
    """(domain, text) of each usable document of one source. Skipped records are counted in
    skipped[domain], or skipped[None] when the domain field decides and the record's domain is
    unknown; a bad record raises instead unless `skip_bad`. `seen` ({domain: the label it came
    from}, shared across sources) refuses two labels that would become one domain name."""
    if src.kind == TXT_FOLDER:
        for text in _txt_documents(src.path, skipped[src.name], skip_bad):
            yield src.name, text
        return
    reader = RecordSource(src.path, src.kind, [text_field, *([domain_field] if domain_field else [])])
    unit, json_source = reader.unit, src.kind in JSONL_KINDS
    columns = f"; its columns: {', '.join(reader.columns)}" if reader.columns is not None else ""
    unknown = None if domain_field else src.name  # whom a record is counted against before its domain is read
    names_ok: dict[str, str] = {}  # label -> domain name
    for path, n, record in reader:
        if isinstance(record, Bad):
            if record.reason == BLANK:
                skipped[unknown][BLANK] += 1
            else:
                _bad(path, unit, n, record, skipped[unknown], skip_bad)
            continue
        if not isinstance(record, dict):
            what = f"{_type_name(record, json_source)}, not an object with a string field {text_field!r}"
            _bad(path, unit, n, Bad(MISSING_FIELD, what), skipped[unknown], skip_bad)
            continue
        domain = src.name
        if domain_field:
            value = _field(record, domain_field)
            if isinstance(value, int) and not isinstance(value, bool):
                labels = reader.labels.get(domain_field)
                value = labels[value] if labels and 0 <= value < len(labels) else str(value)
            if value is _MISSING or not isinstance(value, str):
                what = (f"no field {domain_field!r} (see --domain-field{columns})" if value is _MISSING else
                        f"field {domain_field!r} is {_type_name(value, json_source)}, not a string")
                _bad(path, unit, n, Bad(MISSING_FIELD, what), skipped[None], skip_bad)
                continue
            if value not in names_ok:
                name = label_domain(value)
                try:
                    check_domain_name(name)
                except ElmError:
                    raise ElmError(f"{unit} {n}: field {domain_field!r} gives {value!r}, which names no domain "
                                   "(it needs a letter or digit)", path) from None
                if seen is not None and seen.setdefault(name, value) != value:
                    raise ElmError(f"{unit} {n}: field {domain_field!r} gives {value!r} and elsewhere "
                                   f"{seen[name]!r}: both would be domain {name!r}", path)
                names_ok[value] = name
            domain = names_ok[value]
        text = _field(record, text_field)
        if text is _MISSING or not isinstance(text, str):
            what = (f"no field {text_field!r} (see --text-field{columns})" if text is _MISSING else
                    f"field {text_field!r} is {_type_name(text, json_source)}, not a string")
            _bad(path, unit, n, Bad(MISSING_FIELD, what), skipped[domain], skip_bad)
            continue
        if not text.strip():
            skipped[domain][BLANK] += 1
            continue
        yield domain, text


def _sources(srcs: Sequence[str | Path], domain_field: str | None) -> list[_Source]:
    """Check every path (exists, readable, text or of its format, named safely) -> its kind and name."""
    if not srcs:
        raise ElmError("no sources given: pass JSONL, Parquet or Arrow files, datasets folders or folders of .txt files")
    out: list[_Source] = []
    by_name: dict[str, Path] = {}
    seen: dict[Path, Path] = {}
    for s in srcs:
        path = Path(s)
        if not path.exists():
            raise ElmError("source not found", path)
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise ElmError("source is not readable (permission denied)", path)
        if path.resolve() in seen:
            raise ElmError(f"source given twice (also as {seen[path.resolve()]})", path)
        seen[path.resolve()] = path
        kind, name = source_kind(path)
        src = _Source(path, kind, name)
        if kind == TXT_FOLDER:
            if domain_field:
                raise ElmError("--domain-field does not apply to a folder of .txt files (it has no fields); "
                               "import it without --domain-field, separately", path)
            files = _txt_files(path)
            if not files:
                raise ElmError("folder holds no .txt files (nor a datasets state.json / dataset_info.json)", path)
            for p in files:
                _check_text_file(p)
        elif kind == "jsonl":
            _check_text_file(path)
        elif kind in JSONL_KINDS:  # compressed: the text inside must not be binary
            _check_text_head(RecordSource(path, kind).head(_SNIFF_BYTES), path)
        else:
            RecordSource(path, kind)  # opens it: not of its format, or pyarrow missing -> ElmError now
        if not domain_field:
            check_domain_name(name, path)
            if name in by_name:
                raise ElmError(f"domain {name!r} also comes from {by_name[name]}; rename one source", path)
            by_name[name] = path
        out.append(src)
    return out


def _first_pass(
    sources: list[_Source], text_field: str, domain_field: str | None, skip_bad: bool
) -> ImportPlan:
    domains: dict[str, ImportedDomain] = {}
    plan = ImportPlan(domains=[])

    def domain(name: str, src: _Source) -> ImportedDomain:
        if name not in domains:
            if len(domains) == MAX_DOMAINS:
                raise ElmError(f"field {domain_field!r} gives more than {MAX_DOMAINS} distinct domains; "
                               "choose a field that labels domains (see --domain-field)", src.path)
            domains[name] = ImportedDomain(name=name, sources=[], kinds=[])
        dom = domains[name]
        if not dom.sources or dom.sources[-1] != src.path:
            dom.sources.append(src.path)
            dom.kinds.append(src.kind)
        return dom

    for src in sources:
        if not domain_field:
            domain(src.name, src)  # listed even when nothing in it is usable (reported below)
        skipped: dict[str | None, Counter] = defaultdict(Counter)
        try:
            for name, _text in _documents(src, text_field, domain_field, skipped, skip_bad, plan.labels):
                domain(name, src).usable += 1
        except OSError as e:
            raise ElmError(f"cannot read source ({e.strerror or e})", src.path) from None
        for name, counts in skipped.items():
            if name is None:
                plan.unassigned[src.path] = counts
            else:
                domain(name, src).skipped.update(counts)
    for dom in domains.values():
        if dom.usable == 0:
            counts = ", ".join(f"{n} {r}" for r, n in dom.skipped.items()) or "it is empty"
            if dom.kinds[0] == TXT_FOLDER:
                what = "no usable .txt file"
            else:
                what = f"no {'line' if dom.kinds[0] in JSONL_KINDS else 'record'} has a non-empty string field {text_field!r}"
            raise ElmError(f"domain {dom.name!r} has zero usable documents ({what}; skipped: {counts})", dom.path)
    if not domains:
        counts = ", ".join(f"{n} {r}" for c in plan.unassigned.values() for r, n in c.items()) or "they are empty"
        raise ElmError(f"no record has a string field {domain_field!r} (see --domain-field; skipped: {counts})",
                       sources[0].path)
    plan.domains = list(domains.values())
    return plan


def inspect_sources(
    srcs: Sequence[str | Path], text_field: str = "text", skip_bad_lines: bool = False,
    domain_field: str | None = None,
) -> ImportPlan:
    """Validate every source and count usable and skipped documents per domain, writing nothing.

    Raises `ElmError` naming the file for: a missing or unreadable path, a binary file, a file
    not of its format, an unsafe or duplicate domain name, a domain without a single usable
    document, and (unless `skip_bad_lines`) the first bad line or record, with its number, or
    the first non-UTF-8 `.txt` file.
    """
    sources = _sources(srcs, domain_field)
    return _first_pass(sources, text_field, domain_field, skip_bad_lines)


def import_sources(
    srcs: Sequence[str | Path],
    out: str | Path,
    text_field: str = "text",
    novel: Sequence[str] = (),
    skip_bad_lines: bool = False,
    domain_field: str | None = None,
) -> tuple[dict[str, Any], ImportPlan]:
    """Import the sources (see the module docstring) as the domains of a new corpus at `out`.

    A bad line or record (not UTF-8, bad JSON, no string text field, no domain field, corrupt
    data) raises `ElmError` naming the file and line/record before anything is written, unless
    `skip_bad_lines`: then it is skipped and counted.

    Domains named in `novel` get role "novel" in the manifest (held out from expert training,
    used for out-of-domain evaluation); the others get role "train".

    Returns the manifest written and the plan (per-domain usable and skipped documents).
    Exact duplicates within a domain are dropped by `write_corpus`; the manifest holds the
    counts after that.
    """
    out = Path(out)
    # Cheap checks on the output first, so a long validation pass is not wasted.
    if (out / MANIFEST).exists():
        raise ElmError("a corpus already exists here; choose another --out or delete it", out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ElmError("output folder exists and is not empty", out)
    sources = _sources(srcs, domain_field)
    plan = _first_pass(sources, text_field, domain_field, skip_bad_lines)
    names = [dom.name for dom in plan.domains]
    for name in novel:
        if name not in names:
            raise ElmError(f"--novel {name!r} is not one of the imported domains ({', '.join(names)})")

    def describe(dom: ImportedDomain) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": dom.kind, "text_field": text_field, "skip_bad_lines": skip_bad_lines,
                                  "skipped": dict(dom.skipped)}
        if domain_field:
            record.update(domain_field=domain_field, sources=[str(p.resolve()) for p in dom.sources])
            if plan.labels.get(dom.name, dom.name) != dom.name:
                record.update(label=plan.labels[dom.name])
        return {"role": "novel" if dom.name in novel else "train", "import": record}

    # The second pass streams the documents; its skip counts repeat the first pass's, so they are discarded.
    def documents(src: _Source) -> Iterator[tuple[str, str]]:
        return _documents(src, text_field, domain_field, defaultdict(Counter), skip_bad_lines)

    domains = [DomainSource(name=dom.name, documents=(), source=", ".join(str(p.resolve()) for p in dom.sources),
                            extra=describe(dom)) for dom in plan.domains]
    if domain_field:  # one pass over each source feeds all its domains
        records: Iterator[tuple[str, str]] | None = (pair for src in sources for pair in documents(src))
    else:  # one source per domain: written one domain at a time
        records = None
        for dom, src in zip(domains, sources):
            dom.documents = (text for _name, text in documents(src))
    extra = {"import": {"text_field": text_field, "domain_field": domain_field, "skip_bad_lines": skip_bad_lines,
                        "unassigned": {str(p.resolve()): dict(c) for p, c in plan.unassigned.items() if c}}}
    manifest = write_corpus(out, domains, description="imported with `elmforest corpus import`",
                            records=records, extra=extra)
    return manifest, plan
