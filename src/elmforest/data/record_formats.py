"""The records of one import source, whatever its format, read one at a time.

    kind             source                                    a record is                 numbered by
    jsonl            any file not named below                  a line holding a JSON value  line, from 1
    jsonl.gz         *.gz: gzip-compressed JSONL               (same)                       (same)
    jsonl.zst        *.zst: zstd-compressed JSONL              (same)                       (same)
    parquet          *.parquet                                 a row, as a dict             record, from 1
    arrow            *.arrow: Arrow IPC, file or stream format  (same)                       (same)
    datasets folder  a folder `datasets.Dataset.save_to_disk`  a row of one of its .arrow   record, from 1
                     wrote (it holds state.json or              shards (the error names
                     dataset_info.json)                          the shard)

Nothing is read whole: compressed files go through a decompressing line reader, Parquet
files 1024 rows at a time (pages read through a small buffer, whatever the row group size),
Arrow files one record batch at a time as they were written (`datasets` writes 1000 rows a
batch; a file written as one huge batch is read as one), with only the columns asked for
(nested fields come back as dicts). A line or record that cannot be used is yielded as a `Bad` naming why, so
the caller decides whether to stop or count it; data that cannot be read past some point (a
truncated or corrupt gzip/zstd stream, an unreadable Parquet page) is one `Bad` with reason
`CORRUPT`, after which the source ends. A file that is not of its format at all (not
Parquet, not Arrow) raises `ElmError`. Parquet and Arrow need pyarrow, zstd needs zstandard
(`pip install 'elmforest[data]'`); a missing one is a one-line `ElmError` saying so.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from elmforest.errors import ElmError

# Why a record is skipped: the keys of the skipped counts.
BLANK = "blank"
NOT_UTF8 = "not UTF-8"
BAD_JSON = "bad JSON"
MISSING_FIELD = "missing field"
CORRUPT = "corrupt data"
SKIP_REASONS = (BLANK, NOT_UTF8, BAD_JSON, MISSING_FIELD, CORRUPT)

JSONL_KINDS = ("jsonl", "jsonl.gz", "jsonl.zst")
TXT_FOLDER = "txt folder"
DATASETS_FOLDER = "datasets folder"
_BATCH_ROWS = 1024  # rows per Parquet record batch: a few MB of text at most
_PARQUET_BUFFER = 1 << 20
_ZSTD_READ = 1 << 12  # compressed bytes fed to zstd at a time, bounding what one call can expand to
_INSTALL = "pip install 'elmforest[data]'"


@dataclass(frozen=True)
class Bad:
    """A line or record that cannot be used: `reason` (one of SKIP_REASONS) and what is wrong."""

    reason: str
    what: str


BLANK_LINE = Bad(BLANK, "blank line")


def source_kind(path: Path) -> tuple[str, str]:
    """(kind, the domain the source is named after) from a path's name or folder contents."""
    if path.is_dir():
        name = path.resolve().name
        if (path / "dataset_dict.json").is_file():
            splits = _dataset_dict_splits(path)
            raise ElmError("a DatasetDict folder (several splits); pass one split's folder instead, e.g. "
                           f"{path / (splits[0] if splits else 'train')}", path)
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            return DATASETS_FOLDER, name
        return TXT_FOLDER, name
    lower = path.name.lower()
    if lower.endswith(".parquet"):
        return "parquet", path.name[: -len(".parquet")]
    if lower.endswith(".arrow"):
        return "arrow", path.name[: -len(".arrow")]
    if lower.endswith(".gz"):
        return "jsonl.gz", Path(path.name[: -len(".gz")]).stem
    if lower.endswith(".zst"):
        return "jsonl.zst", Path(path.name[: -len(".zst")]).stem
    return "jsonl", path.stem


def _dataset_dict_splits(folder: Path) -> list[str]:
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        return [s for s in splits if isinstance(s, str)]
    except (OSError, ValueError, AttributeError):
        return []


def _need(module: str, package: str, path: Path, what: str):
    """Import an optional dependency, or fail with one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ElmError(f"reading {what} needs the {package} package: {_INSTALL} (or pip install {package})",
                       path) from None


class RecordSource:
    """One source's records: iterate for (file, number, record-or-Bad) triples.

    `unit` is "line" for JSONL kinds and "record" for tables; `columns` the table's column
    names (None for JSONL); `labels` maps a column of class labels (a `datasets` ClassLabel)
    to its label names, so an integer label can name a domain.
    """

    def __init__(self, path: Path, kind: str, fields: Sequence[str] = ()):
        self.path = path
        self.kind = kind
        self.unit = "line" if kind in JSONL_KINDS else "record"
        # a dotted field `meta.set` lives in column `meta` (or in a column literally named so)
        self.wanted = list(dict.fromkeys(c for f in fields for c in (f, f.split(".")[0])))
        self.columns: list[str] | None = None
        self.labels: dict[str, list[str]] = {}
        self._files: list[Path] = [path]
        if kind == "parquet":
            pq = _need("pyarrow.parquet", "pyarrow", path, "Parquet files")
            self.columns = list(self._parquet(pq).schema_arrow.names)
        elif kind == "arrow":
            self.columns = self._arrow_schema(path)
        elif kind == DATASETS_FOLDER:
            self._files = _dataset_shards(path)
            self.labels = _class_labels(path)
            self.columns = self._arrow_schema(self._files[0]) if self._files else []

    def __iter__(self) -> Iterator[tuple[Path, int, Any]]:
        if self.kind in JSONL_KINDS:
            return _jsonl_records(self.path, self.kind)
        return self._table_records()

    def head(self, n: int = 8192) -> bytes:
        """The first `n` bytes of a JSONL source, decompressed (b"" if it cannot be read)."""
        try:
            with _open_lines(self.path, self.kind) as f:
                return f.read(n)
        except (EOFError, OSError, zlib.error, _ZstdCorrupt):
            return b""  # the line reader reports it, with its line number

    # ---- tables (Parquet, Arrow, datasets folders)

    def _parquet(self, pq):
        try:
            # Read a column chunk through a 1 MB buffer, page by page, and only when its batch is
            # due: pyarrow's defaults (pre_buffer, unbuffered chunks) hold about the whole file.
            return pq.ParquetFile(str(self.path), pre_buffer=False, buffer_size=_PARQUET_BUFFER)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own message
            raise ElmError(f"not a Parquet file ({_one_line(e)})", self.path) from None

    def _arrow_schema(self, path: Path) -> list[str]:
        with _open_arrow(path) as reader:
            return list(reader.schema.names)

    def _select(self) -> list[str]:
        keep = [c for c in self.wanted if c in (self.columns or [])]
        return keep or (self.columns or [])[:1]  # no field there: rows without it, still counted

    def _batches(self, path: Path) -> Iterator[Any]:
        if self.kind == "parquet":
            pq = _need("pyarrow.parquet", "pyarrow", path, "Parquet files")
            # one thread: decoding columns in parallel holds more memory and gains nothing on the
            # two or three columns an import reads, in a loop that Python bounds anyway
            reader = self._parquet(pq)
            yield from reader.iter_batches(batch_size=_BATCH_ROWS, columns=self._select(), use_threads=False)
            return
        with _open_arrow(path) as reader:
            if hasattr(reader, "num_record_batches"):  # file format: batches by index
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            for batch in batches:
                yield batch.select(self._select())

    def _table_records(self) -> Iterator[tuple[Path, int, Any]]:
        pa = _need("pyarrow", "pyarrow", self.path, f"{self.kind} sources")
        for path in self._files:
            n = 0
            batches = self._batches(path)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except (pa.ArrowException, OSError) as e:
                    yield path, n + 1, Bad(CORRUPT, f"cannot read the records from here on ({_one_line(e)})")
                    return
                for row in batch.to_pylist():
                    n += 1
                    yield path, n, row


class _open_arrow:
    """Context manager: an Arrow IPC reader (file or stream format, by the file's magic bytes)
    over plain reads, so the records read are the memory used (no mapping of the whole file)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        pa = _need("pyarrow", "pyarrow", self.path, "Arrow files")
        self.f = pa.OSFile(str(self.path))
        try:
            magic = self.f.read(6)
            self.f.seek(0)
            if magic == b"ARROW1":
                return pa.ipc.open_file(self.f)
            return pa.ipc.open_stream(self.f)
        except (pa.ArrowException, OSError) as e:
            self.f.close()
            raise ElmError(f"not an Arrow IPC file or stream ({_one_line(e)})", self.path) from None

    def __exit__(self, *exc) -> None:
        self.f.close()


def _dataset_shards(folder: Path) -> list[Path]:
    """The .arrow shards of a `save_to_disk` folder, in state.json's order."""
    state = folder / "state.json"
    if not state.is_file():
        shards = sorted(folder.glob("*.arrow"))
    else:
        try:
            files = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
            names = [f["filename"] for f in files]
        except (OSError, ValueError, KeyError, TypeError):
            raise ElmError("not a datasets state file: no list '_data_files' of {'filename': ...}", state) from None
        shards = []
        for name in names:
            shard = folder / str(name)
            if shard.resolve().parent != folder.resolve():  # a shard name must not leave the folder
                raise ElmError(f"shard {name!r} is not a file name inside the folder", state)
            if not shard.is_file():
                raise ElmError(f"shard {name!r} listed in state.json is missing", folder)
            shards.append(shard)
    if not shards:
        raise ElmError("datasets folder holds no .arrow shards", folder)
    return shards


def _class_labels(folder: Path) -> dict[str, list[str]]:
    """Top-level ClassLabel features of a datasets folder -> their label names."""
    try:
        features = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8")).get("features") or {}
        return {k: [str(n) for n in v["names"]] for k, v in features.items()
                if isinstance(v, dict) and v.get("_type") == "ClassLabel" and isinstance(v.get("names"), list)}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


# ---- JSONL, plain or compressed


class _ZstdCorrupt(Exception):
    pass


class _ZstdReader(io.RawIOBase):
    """Decompresses every frame of a zstd file. Unlike zstandard's stream reader it notices a file
    that ends inside a frame (truncated) instead of returning the data so far as if complete."""

    def __init__(self, path: Path):
        zstandard = _need("zstandard", "zstandard", path, ".zst files")
        self._error = zstandard.ZstdError
        self._dctx = zstandard.ZstdDecompressor()
        self._f = open(path, "rb")
        self._obj: Any = None  # the current frame's decompressor
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._pending:
            chunk = self._f.read(_ZSTD_READ)
            if not chunk:
                if self._obj is not None and not self._obj.eof:
                    raise _ZstdCorrupt("the file ends inside a frame (truncated)")
                return 0
            self._pending = memoryview(self._decompress(chunk))
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        try:
            while data:
                if self._obj is None or self._obj.eof:  # a new frame starts
                    self._obj = self._dctx.decompressobj()
                out.append(self._obj.decompress(data))
                data = self._obj.unused_data if self._obj.eof else b""
        except self._error as e:
            raise _ZstdCorrupt(str(e)) from None
        return b"".join(out)

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_lines(path: Path, kind: str) -> BinaryIO:
    if kind == "jsonl.gz":
        return gzip.open(path, "rb")
    if kind == "jsonl.zst":
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open(path, "rb")


def _jsonl_records(path: Path, kind: str) -> Iterator[tuple[Path, int, Any]]:
    """(path, line number, JSON value or Bad) for each line; a corrupt stream ends with one Bad."""
    fmt = {"jsonl.gz": "gzip", "jsonl.zst": "zstd"}.get(kind, "")
    with _open_lines(path, kind) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline()
            except (EOFError, gzip.BadGzipFile, zlib.error, _ZstdCorrupt) as e:
                yield path, lineno + 1, Bad(CORRUPT, f"corrupt {fmt} data ({_one_line(e)})")
                return
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                yield path, lineno, BLANK_LINE
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield path, lineno, Bad(NOT_UTF8, f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)")
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))  # without its line end, so errors read as in an editor
            except json.JSONDecodeError as e:
                value = Bad(BAD_JSON, f"bad JSON at column {e.colno} ({e.msg})")
            except ValueError as e:  # e.g. a number too large to convert
                value = Bad(BAD_JSON, f"bad JSON ({e})")
            yield path, lineno, value


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
