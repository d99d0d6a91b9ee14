"""`elmforest corpus import` of Parquet, compressed JSONL, Arrow and `datasets` folders, and `--domain-field`.

Every format is checked against the plain JSONL import of the same documents: the corpus
(manifest counts, each split file byte for byte) must be identical. Bad records stop the import
with one line naming the file and record, writing nothing; --skip-bad-lines counts them.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from cli_runner import run_cli
from elmforest.data.corpus import SPLITS

DOMAINS = ("news", "legal", "code")


def _docs() -> list[tuple[str, str]]:
    """(domain, text) pairs, interleaved across domains, with unicode, inner newlines and a duplicate."""
    pairs = []
    for i in range(1300):  # > one Parquet record batch (1024 rows), so batch boundaries are crossed
        d = DOMAINS[i % 3 if i % 7 else 0]  # uneven domain sizes
        pairs.append((d, f"{d} document {i}: café №{i * 7919 % 1000}\nsecond line of {i}"))
    pairs.append(("legal", pairs[1][1]))  # an exact duplicate within legal
    return pairs


def _records(pairs) -> list[dict]:
    return [{"id": i, "content": {"body": t}, "meta": {"set": d, "n": i}} for i, (d, t) in enumerate(pairs)]


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _per_domain_jsonl(tmp: Path, pairs) -> list[Path]:
    """The reference: one plain JSONL file per domain, named after it, documents in `text`."""
    folder = tmp / "ref"
    folder.mkdir()
    paths = []
    for d in DOMAINS:
        path = folder / f"{d}.jsonl"
        path.write_bytes(_jsonl_bytes([{"text": t} for dd, t in pairs if dd == d]))
        paths.append(path)
    return paths


def _import(args, capsys, out: Path) -> dict:
    capsys.readouterr()  # drop what writing the sources printed (datasets' progress bars)
    code, stdout, stderr = run_cli(["corpus", "import", *args, "--out", out], capsys)
    assert code == 0, stderr
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _same_corpus(a: Path, b: Path, domains) -> None:
    """Same domains in the same order, same counts, and every split file identical."""
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert list(ma["domains"]) == list(mb["domains"]) == list(domains)
    for d in domains:
        assert ma["domains"][d]["splits"] == mb["domains"][d]["splits"]
        for s in SPLITS:
            assert (a / d / f"{s}.jsonl").read_bytes() == (b / d / f"{s}.jsonl").read_bytes(), (d, s)


def _error_line(capsys, args, out: Path) -> str:
    capsys.readouterr()
    code, stdout, stderr = run_cli(["corpus", "import", *args, "--out", out], capsys)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elmforest: error: "), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()  # nothing written
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary leftovers
    return lines[0][len("elmforest: error: "):]


def test_parquet_with_a_domain_field_gives_the_same_corpus_as_per_domain_jsonl(tmp_path, capsys):
    pairs = _docs()
    ref = _import(_per_domain_jsonl(tmp_path, pairs), capsys, tmp_path / "ref_corpus")
    table = pa.Table.from_pylist(_records(pairs))
    pq.write_table(table, tmp_path / "mixed.parquet", row_group_size=500)  # several row groups
    got = _import([tmp_path / "mixed.parquet", "--domain-field", "meta.set", "--text-field", "content.body"],
                  capsys, tmp_path / "pq_corpus")
    _same_corpus(tmp_path / "ref_corpus", tmp_path / "pq_corpus", DOMAINS)
    # worked out here: every distinct text of each domain lands in exactly one split
    for d in DOMAINS:
        distinct = {t for dd, t in pairs if dd == d}
        assert sum(got["domains"][d]["splits"][s]["documents"] for s in SPLITS) == len(distinct)
    assert sum(ref["domains"]["legal"]["splits"][s]["documents"] for s in SPLITS) == len({t for d, t in pairs if d == "legal"})
    assert got["domains"]["news"]["import"]["domain_field"] == "meta.set"
    assert got["import"]["domain_field"] == "meta.set" and got["import"]["unassigned"] == {}


def _write_format(fmt: str, path_stem: Path, rows: list[dict]) -> Path:
    """`rows` as a source of format `fmt`, named so that its domain is path_stem.name."""
    if fmt == "jsonl.gz":  # two gzip members, as `cat a.gz b.gz` makes
        path = path_stem.with_name(path_stem.name + ".jsonl.gz")
        half = len(rows) // 2
        path.write_bytes(gzip.compress(_jsonl_bytes(rows[:half])) + gzip.compress(_jsonl_bytes(rows[half:])))
    elif fmt == "jsonl.zst":  # two zstd frames, with checksums as the zstd tool writes them
        path = path_stem.with_name(path_stem.name + ".jsonl.zst")
        cctx = zstandard.ZstdCompressor(write_checksum=True)
        half = len(rows) // 3
        path.write_bytes(cctx.compress(_jsonl_bytes(rows[:half])) + cctx.compress(_jsonl_bytes(rows[half:])))
    elif fmt == "parquet":
        path = path_stem.with_name(path_stem.name + ".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=300)
    elif fmt in ("arrow-file", "arrow-stream"):
        path = path_stem.with_name(path_stem.name + ".arrow")
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink:
            new = pa.ipc.new_file if fmt == "arrow-file" else pa.ipc.new_stream
            with new(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=250)
    elif fmt == "datasets":
        datasets = pytest.importorskip("datasets")  # in the dev extra: never skipped in CI
        path = path_stem
        datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=2)
    else:
        raise AssertionError(fmt)
    return path


FORMATS = ["jsonl.gz", "jsonl.zst", "parquet", "arrow-file", "arrow-stream", "datasets"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_round_trips_like_plain_jsonl(tmp_path, capsys, fmt):
    pairs = [(d, t) for d, t in _docs() if d == "news"][:400]
    rows = [{"text": t, "id": i} for i, (_d, t) in enumerate(pairs)]
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "news.jsonl").write_bytes(_jsonl_bytes(rows))
    _import([tmp_path / "ref" / "news.jsonl"], capsys, tmp_path / "ref_corpus")
    (tmp_path / "src").mkdir()
    src = _write_format(fmt, tmp_path / "src" / "news", rows)
    manifest = _import([src], capsys, tmp_path / "corpus")
    _same_corpus(tmp_path / "ref_corpus", tmp_path / "corpus", ["news"])
    kind = {"arrow-file": "arrow", "arrow-stream": "arrow", "datasets": "datasets folder"}.get(fmt, fmt)
    assert manifest["domains"]["news"]["import"]["kind"] == kind
    assert sum(manifest["domains"]["news"]["splits"][s]["documents"] for s in SPLITS) == 400


@pytest.mark.parametrize("fmt", ["jsonl.zst", "arrow-stream", "datasets"])
def test_nested_dotted_fields_in_each_kind_of_reader(tmp_path, capsys, fmt):
    pairs = _docs()[:600]
    (tmp_path / "src").mkdir()
    src = _write_format(fmt, tmp_path / "src" / "mixed", _records(pairs))
    _import([src, "--text-field", "content.body", "--domain-field", "meta.set"], capsys, tmp_path / "corpus")
    _import(_per_domain_jsonl(tmp_path, pairs), capsys, tmp_path / "ref_corpus")
    _same_corpus(tmp_path / "ref_corpus", tmp_path / "corpus", DOMAINS)


def test_a_domain_spans_shards_and_a_field_named_with_a_dot_is_found_as_written(tmp_path, capsys):
    pairs = _docs()
    rows = [{"meta.set": d, "text": t} for d, t in pairs]  # a top-level column whose name holds a dot
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), tmp_path / "shard0.parquet")
    (tmp_path / "shard1.jsonl").write_bytes(_jsonl_bytes(rows[half:]))
    manifest = _import([tmp_path / "shard0.parquet", tmp_path / "shard1.jsonl", "--domain-field", "meta.set"],
                       capsys, tmp_path / "corpus")
    _import(_per_domain_jsonl(tmp_path, pairs), capsys, tmp_path / "ref_corpus")
    _same_corpus(tmp_path / "ref_corpus", tmp_path / "corpus", DOMAINS)
    assert [Path(p).name for p in manifest["domains"]["news"]["import"]["sources"]] == ["shard0.parquet", "shard1.jsonl"]


def test_a_datasets_class_label_names_the_domain(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    pairs = _docs()[:300]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(DOMAINS))})
    ds = datasets.Dataset.from_dict({"text": [t for _d, t in pairs], "label": [DOMAINS.index(d) for d, _t in pairs]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "labelled"))
    _import([tmp_path / "labelled", "--domain-field", "label"], capsys, tmp_path / "corpus")
    _import(_per_domain_jsonl(tmp_path, pairs), capsys, tmp_path / "ref_corpus")
    _same_corpus(tmp_path / "ref_corpus", tmp_path / "corpus", DOMAINS)


# ---- bad records: one line naming the file and record, nothing written; --skip-bad-lines counts them

HINT = "fix the record or pass --skip-bad-lines to skip such records"


def test_a_record_without_the_domain_field_stops_the_import_or_is_counted(tmp_path, capsys):
    rows = _records(_docs()[:40])
    rows[2]["meta"] = None  # record 3: no meta.set
    rows[30]["meta"] = {"n": 30}  # record 31: meta without set
    src = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    args = [src, "--domain-field", "meta.set", "--text-field", "content.body"]
    line = _error_line(capsys, args, tmp_path / "out")
    assert line == f"{src}: record 3: no field 'meta.set' (see --domain-field; its columns: id, content, meta); {HINT}"
    manifest = _import([*args, "--skip-bad-lines"], capsys, tmp_path / "out")
    assert manifest["import"]["unassigned"] == {str(src.resolve()): {"missing field": 2}}
    kept = [t for i, (d, t) in enumerate(_docs()[:40]) if i not in (2, 30)]
    assert sum(manifest["domains"][d]["splits"][s]["documents"] for d in DOMAINS for s in SPLITS) == len(kept)


def test_non_string_text_stops_the_import_or_is_counted_against_its_domain(tmp_path, capsys):
    rows = [{"text": f"document {i}", "d": "news" if i % 2 else "legal"} for i in range(20)]
    rows[5]["text"] = 5  # line 6
    rows[8]["text"] = None  # line 9
    src = tmp_path / "mixed.jsonl.gz"
    src.write_bytes(gzip.compress(_jsonl_bytes(rows)))
    line = _error_line(capsys, [src, "--domain-field", "d"], tmp_path / "out")
    assert line == (f"{src}: line 6: field 'text' is a JSON number, not a string; "
                    "fix the line or pass --skip-bad-lines to skip such lines")
    manifest = _import([src, "--domain-field", "d", "--skip-bad-lines"], capsys, tmp_path / "out")
    assert manifest["domains"]["news"]["import"]["skipped"] == {"missing field": 1}  # line 6 (i = 5: news)
    assert manifest["domains"]["legal"]["import"]["skipped"] == {"missing field": 1}  # line 9 (i = 8: legal)
    # a table column of numbers: the first record is bad
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "nums.parquet")
    line = _error_line(capsys, [tmp_path / "nums.parquet"], tmp_path / "out2")
    assert line == f"{tmp_path / 'nums.parquet'}: record 1: field 'text' is a number, not a string; {HINT}"


def _compressed_lines(n: int) -> bytes:
    """JSONL that compresses only so far (random words), so the stream spans many blocks."""
    rng = random.Random(0)
    return _jsonl_bytes([{"text": f"line {i}: " + " ".join(f"{rng.getrandbits(24):x}" for _ in range(30))}
                         for i in range(n)])


@pytest.mark.parametrize("case", ["gzip truncated", "gzip bad crc", "not gzip", "zstd truncated", "zstd bad checksum"])
def test_corrupt_compressed_data_stops_the_import_or_keeps_what_came_before(tmp_path, capsys, case):
    data = _compressed_lines(2000)
    if case.startswith("gzip"):
        packed = gzip.compress(data)
    elif case.startswith("zstd"):
        packed = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    else:
        packed = data
    if "truncated" in case:
        packed = packed[: len(packed) // 2]
    if "bad" in case:  # the stored checksum of the data no longer matches
        packed = packed[:-6] + bytes([packed[-6] ^ 0xFF]) + packed[-5:]
    src = tmp_path / ("d.jsonl.zst" if case.startswith("zstd") else "d.jsonl.gz")
    src.write_bytes(packed)
    line = _error_line(capsys, [src], tmp_path / "out")
    fmt = "zstd" if case.startswith("zstd") else "gzip"
    assert line.startswith(f"{src}: line ") and f": corrupt {fmt} data (" in line
    assert line.endswith("the file cannot be read past this point; repair or fetch it again, "
                         "or pass --skip-bad-lines to keep the lines before it")
    lineno = int(line.split(": line ")[1].split(":")[0])
    if "truncated" in case:  # stops inside the data: the lines before it are whole
        assert 1 < lineno < 2000
    elif case == "not gzip":
        assert lineno == 1 and "Not a gzipped file" in line
    if case == "not gzip":
        return  # with --skip-bad-lines nothing is left: the zero-usable error (tested elsewhere)
    manifest = _import([src, "--skip-bad-lines"], capsys, tmp_path / "out")
    dom = manifest["domains"]["d"]
    assert dom["import"]["skipped"] == {"corrupt data": 1}
    assert sum(dom["splits"][s]["documents"] for s in SPLITS) == lineno - 1  # every line before the corrupt point


def test_a_file_that_is_not_parquet_or_arrow_names_itself(tmp_path, capsys):
    fake = tmp_path / "news.parquet"
    fake.write_bytes(_compressed_lines(10))
    line = _error_line(capsys, [fake, "--skip-bad-lines"], tmp_path / "out")
    assert line.startswith(f"{fake}: not a Parquet file (") and "magic bytes" in line
    fake_arrow = tmp_path / "news.arrow"
    fake_arrow.write_bytes(_compressed_lines(10))
    line = _error_line(capsys, [fake_arrow], tmp_path / "out")
    assert line.startswith(f"{fake_arrow}: not an Arrow IPC file or stream (")


def test_truncated_parquet_is_not_parquet_and_a_truncated_arrow_stream_is_corrupt(tmp_path, capsys):
    rows = [{"text": f"record {i} " * 20} for i in range(3000)]
    full = tmp_path / "full.arrow"
    _write_format("arrow-stream", tmp_path / "full", rows)
    cut = tmp_path / "news.arrow"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    line = _error_line(capsys, [cut], tmp_path / "out")
    assert line.startswith(f"{cut}: record ") and ": cannot read the records from here on (" in line
    n = int(line.split(": record ")[1].split(":")[0])
    manifest = _import([cut, "--skip-bad-lines"], capsys, tmp_path / "out")
    assert manifest["domains"]["news"]["import"]["skipped"] == {"corrupt data": 1}
    assert sum(manifest["domains"]["news"]["splits"][s]["documents"] for s in SPLITS) == n - 1
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "whole.parquet")
    cut_pq = tmp_path / "legal.parquet"
    cut_pq.write_bytes((tmp_path / "whole.parquet").read_bytes()[:-100])  # the footer is gone
    assert _error_line(capsys, [cut_pq], tmp_path / "out2").startswith(f"{cut_pq}: not a Parquet file (")


def test_labels_that_are_not_folder_names_become_domains_and_are_recorded(tmp_path, capsys):
    rows = [{"text": f"doc {i}", "d": d} for i, d in enumerate(["news", "PubMed Central", "ArXiv/cs.CL", "news",
                                                                  "PubMed Central", "..hidden  set!"] * 4)]
    src = tmp_path / "x.jsonl"
    src.write_bytes(_jsonl_bytes(rows))
    manifest = _import([src, "--domain-field", "d"], capsys, tmp_path / "out")
    assert list(manifest["domains"]) == ["news", "PubMed_Central", "ArXiv_cs.CL", "hidden_set"]
    assert manifest["domains"]["PubMed_Central"]["import"]["label"] == "PubMed Central"
    assert manifest["domains"]["hidden_set"]["import"]["label"] == "..hidden  set!"
    assert "label" not in manifest["domains"]["news"]["import"]
    assert sum(manifest["domains"]["PubMed_Central"]["splits"][sp]["documents"] for sp in SPLITS) == 8


def test_two_labels_for_one_domain_name_or_a_label_with_no_name_name_the_record(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_bytes(_jsonl_bytes([{"text": "a", "d": "PubMed Central"}, {"text": "b", "d": "PubMed_Central"}]))
    line = _error_line(capsys, [src, "--domain-field", "d"], tmp_path / "out")
    assert line == (f"{src}: line 2: field 'd' gives 'PubMed_Central' and elsewhere "
                    "'PubMed Central': both would be domain 'PubMed_Central'")
    src.write_bytes(_jsonl_bytes([{"text": "a", "d": "news"}, {"text": "b", "d": "!!"}]))
    line = _error_line(capsys, [src, "--domain-field", "d", "--skip-bad-lines"], tmp_path / "out")
    assert line == f"{src}: line 2: field 'd' gives '!!', which names no domain (it needs a letter or digit)"


def test_folders_domain_field_and_dataset_dicts_are_refused_clearly(tmp_path, capsys):
    letters = tmp_path / "letters"
    letters.mkdir()
    (letters / "a.txt").write_text("a letter", encoding="utf-8")
    line = _error_line(capsys, [letters, "--domain-field", "d"], tmp_path / "out")
    assert line.startswith(f"{letters}: --domain-field does not apply to a folder of .txt files")
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]}),
                               "test": datasets.Dataset.from_dict({"text": ["y"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    line = _error_line(capsys, [tmp_path / "dd"], tmp_path / "out")
    assert line.startswith(f"{tmp_path / 'dd'}: a DatasetDict folder (several splits); pass one split's folder")
    assert str(tmp_path / "dd" / "train") in line


@pytest.mark.parametrize("missing,fmt", [("pyarrow", "parquet"), ("pyarrow", "arrow-file"), ("zstandard", "jsonl.zst")])
def test_a_missing_optional_package_is_one_line_saying_what_to_install(tmp_path, capsys, monkeypatch, missing, fmt):
    (tmp_path / "src").mkdir()
    src = _write_format(fmt, tmp_path / "src" / "news", [{"text": "a document"}])
    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import` of it now raises ImportError
    monkeypatch.setitem(sys.modules, missing, None)
    line = _error_line(capsys, [src], tmp_path / "out")
    assert line.startswith(f"{src}: reading ") and f"needs the {missing} package: pip install 'elmforest[data]'" in line


def test_the_digest_set_finds_exact_duplicates_across_its_growth():
    from elmforest.data.corpus import DigestSet

    seen = DigestSet(slots=8)  # grows from 8 slots to 32768 on the way
    texts = [f"document {i}" for i in range(10_000)]
    assert [seen.add(t) for t in texts] == [True] * 10_000
    assert seen.size == 10_000 and len(seen.table) == 32768  # kept at most half full
    # every text again (in another order) is a duplicate; texts differing in one character are not
    assert not any(seen.add(t) for t in reversed(texts))
    assert all(seen.add(t + ".") for t in texts[:500])
    assert seen.size == 10_500


def test_parquet_is_read_a_batch_at_a_time_not_a_row_group_at_once(tmp_path):
    from elmforest.data.record_formats import RecordSource

    rng = random.Random(1)
    texts = [rng.randbytes(3000).hex() for _ in range(10_000)]  # 60 MB of text that snappy hardly compresses
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"text": texts, "other": list(range(10_000))}), path, row_group_size=10**6)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    size = path.stat().st_size
    base, peak, n = pa.total_allocated_bytes(), 0, 0
    for _path, n, row in RecordSource(path, "parquet", ["text"]):
        assert row == {"text": texts[n - 1]}  # only the column asked for
        if n % 256 == 0:
            peak = max(peak, pa.total_allocated_bytes() - base)
    assert n == 10_000
    # pyarrow's defaults hold the whole column chunk (about the file's size) besides the batch;
    # a 1024-row batch of 6000-byte texts is ~6 MB, and the buffered page reader adds ~2 batches
    assert peak < size / 3, (peak, size)


def test_encoding_one_batch_ahead_keeps_every_document_in_order(monkeypatch):
    """The token cache's encoder overlaps batches in a worker thread; the ids must come out
    exactly as encoding each document alone gives them, in order, across batch boundaries."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import elmforest.data.tokens as tokens_mod

    rng = random.Random(2)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "δέλτα", "x1", "\n"]) for _ in range(rng.randint(1, 40)))
             for _ in range(11)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    monkeypatch.setattr(tokens_mod, "BATCH_DOCUMENTS", 3)  # batches of 3, 3, 3, 2
    got = list(tokens_mod.encode_documents(SimpleNamespace(backend_tokenizer=tk), iter(texts)))
    assert got == [tk.encode(t, add_special_tokens=False).ids for t in texts]
    assert list(tokens_mod.encode_documents(SimpleNamespace(backend_tokenizer=tk), iter([]))) == []
