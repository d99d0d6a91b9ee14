"""Streaming import: peak memory and time of `elmforest corpus import` on a large JSONL file, and
the token cache's tokens/s against the `tokenizers` library's own `encode_batch`, same text, same run.

    python bench/import_stream.py                      # 1 GB of JSONL (and the same as Parquet) in the temp folder
    python bench/import_stream.py --size-mb 200 --tokens-mb 8 --repeats 3    # smaller
    python bench/import_stream.py --quick              # 8 MB, 1 repeat, print only (smoke test)

Import rows (each a fresh child process reporting its own peak RSS, VmHWM, as it exits; RssAnon
is sampled from /proc every 2 ms; wall time includes interpreter start and imports):

    cli       `elmforest corpus import big.jsonl --out ...`: what a user runs (the CLI imports
              every command module, torch among them, before it reads a line)
    library   `corpus_import.import_sources([big.jsonl], out)` in a bare interpreter
    parquet   `elmforest corpus import big.parquet --domain-field meta.domain`: the same records
              as Parquet, split into domains by a nested field (one pass feeds all domains)
    startup   `elmforest corpus import --help`: the CLI's floor, reading nothing

The documents are the demo corpus's train splits (`--demo`, default data/demo), cycled with a
copy number appended so that every document is distinct (de-duplication keeps a 16-byte digest
per document: that set is the part of the memory that grows with the input); without the demo
corpus, seeded random words. The token rows tokenise the first `--tokens-mb` MB of the same
documents, imported as their own corpus: `token_array` builds the split's cache from scratch
(cache removed before each repeat; tokenizer load, JSON parsing and the .bin write included;
transformers is imported once before timing)
against `Tokenizer.encode_batch` / `encode_batch_fast` over the same texts already in memory,
1024 documents a call. The tokenizer is `--tokenizer`, or one trained here (byte-level BPE,
vocabulary 4096, `elmforest.data.tokenizer.train_tokenizer`). The token cache's ids are checked
equal to encode_batch's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import record
from averaging import rss_anon_mb

ROOT = Path(__file__).resolve().parents[1]
# Each child reports its own peak (VmHWM) when it exits. The parent's ru_maxrss for a child
# would not do: Linux carries the RSS the child had right after fork, before exec, into it, and
# this process holds the generated documents.
CHILD = """
import atexit, os, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["BENCH_PEAK_FILE"], "w") as out:
        out.write(kb)
atexit.register(_peak)
"""
CLI_CHILD = CHILD + "from elmforest.cli import main\nmain(sys.argv[1:])\n"
LIBRARY_CHILD = CHILD + "from elmforest.data.corpus_import import import_sources\nimport_sources([sys.argv[1]], sys.argv[2])\n"
REF_BATCH = 1024  # documents per encode_batch call in the reference rows


def demo_documents(demo: Path) -> list[tuple[str, str]]:
    """(domain, text) of every train document of the demo corpus, or [] without one."""
    manifest = demo / "manifest.json"
    if not manifest.is_file():
        return []
    from elmforest.data.corpus import Corpus

    corpus = Corpus(demo)
    return [(d, t) for d in corpus.domains for t in corpus.texts(d, "train")]


def synthetic_documents(n: int = 20_000) -> list[tuple[str, str]]:
    rng = random.Random(0)
    words = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    return [(f"d{i % 5}", " ".join(rng.choice(words) for _ in range(rng.randint(20, 400)))) for i in range(n)]


def records(docs: list[tuple[str, str]]) -> Iterator[dict]:
    """The documents again and again, each copy made distinct by its copy number."""
    copy = 0
    while True:
        for domain, text in docs:
            yield {"text": f"{text}\n[copy {copy}]", "meta": {"domain": domain, "copy": copy}}
        copy += 1


def measured(cmd: list[str]) -> tuple[float, float, float]:
    """Run a CHILD -> (wall seconds, its peak RSS MB (VmHWM), peak anonymous RSS MB sampled every 2 ms)."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile() as err:
        peak_file = Path(tmp) / "peak"
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, env=dict(os.environ, BENCH_PEAK_FILE=str(peak_file)),
                                stdout=subprocess.DEVNULL, stderr=err)
        anon = 0.0
        while proc.poll() is None:
            anon = max(anon, rss_anon_mb(proc.pid))
            time.sleep(0.002)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[3:6])} ... failed ({proc.returncode}): {err.read().decode(errors='replace')[-2000:]}")
        return seconds, int(peak_file.read_text()) / 1024, anon


def generate(work: Path, docs: list[tuple[str, str]], size: int, tokens_size: int) -> dict[str, Path | int]:
    """big.jsonl (~size bytes), big.parquet (the same records), tok/tok.jsonl (first tokens_size bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    big, parquet, tok = work / "big.jsonl", work / "big.parquet", work / "tok" / "tok.jsonl"
    tok.parent.mkdir(parents=True, exist_ok=True)
    written = n = 0
    rows: list[dict] = []
    schema = pa.schema([("text", pa.string()), ("meta", pa.struct([("domain", pa.string()), ("copy", pa.int64())]))])
    with open(big, "w", encoding="utf-8") as f, open(tok, "w", encoding="utf-8") as ft, \
            pq.ParquetWriter(str(parquet), schema) as pw:
        for rec in records(docs):
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            f.write(line)
            if written < tokens_size:
                ft.write(line)
            written += len(line.encode("utf-8"))
            n += 1
            rows.append(rec)
            if len(rows) == 20_000:
                pw.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
            if written >= size:
                break
        if rows:
            pw.write_table(pa.Table.from_pylist(rows, schema=schema))
    return {"jsonl": big, "parquet": parquet, "tok": tok, "bytes": written, "records": n}


def token_rows(work: Path, tok_jsonl: Path, tokenizer: Path | None, repeats: int) -> tuple[list[list], list[str]]:
    import numpy as np
    from tokenizers import Tokenizer

    from elmforest.data.corpus import Corpus
    from elmforest.data.corpus_import import import_sources
    from elmforest.data.tokenizer import load_tokenizer, train_tokenizer
    from elmforest.data.tokens import CACHE_DIR, token_array

    corpus_dir = work / "tok_corpus"
    shutil.rmtree(corpus_dir, ignore_errors=True)
    import_sources([tok_jsonl], corpus_dir)
    corpus = Corpus(corpus_dir)
    if tokenizer is None:
        tokenizer = work / "tokenizer"
        shutil.rmtree(tokenizer, ignore_errors=True)
        train_tokenizer(corpus, ["tok"], 4096, tokenizer, sample_bytes_per_domain=4_000_000)
    texts = list(corpus.texts("tok", "train"))
    load_tokenizer(tokenizer)  # import transformers now: a once-per-process cost, not the cache build's
    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    counts: dict[str, int] = {}
    arrays: dict[str, np.ndarray] = {}

    def reference(encode) -> tuple[float, int]:
        t = time.perf_counter()
        n = 0
        for i in range(0, len(texts), REF_BATCH):
            n += sum(len(enc.ids) for enc in encode(texts[i:i + REF_BATCH], add_special_tokens=False))
        return time.perf_counter() - t, n

    def run(name: str) -> float:
        if name == "token_array":
            shutil.rmtree(corpus_dir / CACHE_DIR, ignore_errors=True)
            t = time.perf_counter()
            arr = token_array(Corpus(corpus_dir), tokenizer, "tok", "train")
            seconds = time.perf_counter() - t
            counts[name] = int(arr.size) - len(texts)  # text tokens: the EOS after each document not counted
            arrays.setdefault("cache", np.array(arr))
        else:
            seconds, counts[name] = reference(getattr(backend, name))
        return counts[name] / seconds

    contenders = ["token_array", "encode_batch"] + (["encode_batch_fast"] if hasattr(backend, "encode_batch_fast") else [])
    results = record.interleaved(contenders, repeats, run)
    # the cache is encode_batch's ids with the end-of-text id after each document
    eos = int(arrays["cache"][-1])
    expect = [i for enc in backend.encode_batch(texts[:200], add_special_tokens=False) for i in (*enc.ids, eos)]
    assert arrays["cache"][: len(expect)].tolist() == expect, "token cache differs from encode_batch"
    assert len(set(counts.values())) == 1, f"token counts differ: {counts}"
    base = record.median(results["encode_batch"])
    rows = [[name, f"{counts[name]:,}", f"{record.median(v):,.0f}", record.spread(v), f"{record.median(v) / base:.2f}"]
            for name, v in results.items()]
    notes = [f"token rows: {len(texts):,} train documents, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB, "
             f"{counts['token_array']:,} tokens; tokenizer {tokenizer} (vocab {backend.get_vocab_size():,}); "
             f"token cache equals encode_batch ids + EOS (first 200 documents checked)"]
    return rows, notes


def main() -> None:
    p = record.parser(__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=1000, help="size of the JSONL to import, MB")
    p.add_argument("--tokens-mb", type=float, default=16, help="MB of the same documents for the token rows")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder, removed at the end [default: a new folder in the system temp folder]")
    p.add_argument("--demo", type=Path, default=ROOT / "data" / "demo", help="demo corpus to draw documents from")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder [default: train one here]")
    a = p.parse_args()
    size_mb, tokens_mb, repeats = (8, 2, 1) if a.quick else (a.size_mb, a.tokens_mb, a.repeats or 3)
    if a.work is None:
        a.work = Path(tempfile.mkdtemp(prefix="elmforest-import-bench-"))
    elif a.work.exists() and any(a.work.iterdir()):
        p.error(f"--work {a.work} exists and is not empty")
    a.work.mkdir(parents=True, exist_ok=True)
    docs = demo_documents(a.demo)
    origin = f"demo corpus {a.demo} train splits" if docs else "seeded random words (no demo corpus)"
    docs = docs or synthetic_documents()
    t = time.perf_counter()
    data = generate(a.work, docs, int(size_mb * 1e6), int(tokens_mb * 1e6))
    gen_s = time.perf_counter() - t
    cli = [sys.executable, "-c", CLI_CHILD, "corpus", "import"]
    runs = [
        ("cli", "jsonl", [*cli, str(data["jsonl"]), "--out", str(a.work / "c_cli")]),
        ("library", "jsonl", [sys.executable, "-c", LIBRARY_CHILD, str(data["jsonl"]), str(a.work / "c_lib")]),
        ("parquet --domain-field meta.domain", "parquet",
         [*cli, str(data["parquet"]), "--domain-field", "meta.domain", "--out", str(a.work / "c_pq")]),
        ("startup (--help)", "-", [*cli, "--help"]),
    ]
    rows = []
    for name, fmt, cmd in runs:
        seconds, rss, anon = measured(cmd)
        src = data.get(fmt)
        mb = Path(src).stat().st_size / 1e6 if isinstance(src, Path) else 0.0
        rows.append([name, f"{mb:,.0f}", f"{seconds:,.1f}", f"{mb / seconds:,.1f}" if mb else "-",
                     f"{rss:,.0f}", f"{anon:,.0f}", "yes" if rss < 500 else "no"])
    manifest = json.loads((a.work / "c_cli" / "manifest.json").read_text())
    kept = sum(s["documents"] for d in manifest["domains"].values() for s in d["splits"].values())
    table = record.markdown_table(
        ["import", "input MB", "seconds", "MB/s", "peak RSS MB", "peak anon MB", "< 500 MB"], rows)
    tok_rows, tok_notes = token_rows(a.work, data["tok"], a.tokenizer, repeats)
    table += "\n\n" + record.markdown_table(
        ["tokeniser", "tokens", "tokens/s (median)", "range", "x encode_batch"], tok_rows)
    notes = [
        f"input: {data['records']:,} documents from {origin}, {len(docs):,} distinct texts cycled with a copy "
        f"number; {kept:,} documents written (generating the files took {gen_s:.0f} s)",
        "peak RSS: the child's own VmHWM at exit (mapped libraries included); peak anon: RssAnon sampled every 2 ms; wall time includes "
        "interpreter start and imports; the CLI row's floor is the startup row",
        *tok_notes,
        "x encode_batch: ratio of median tokens/s; target: token_array >= 0.8x encode_batch",
    ]
    settings = (f"JSONL {size_mb:g} MB in {a.work}, token rows on the first {tokens_mb:g} MB, "
                f"{repeats} interleaved repeats of the token rows")
    record.emit("import_stream", settings, table, notes, a.quick)
    shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
