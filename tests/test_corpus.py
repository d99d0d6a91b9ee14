"""`elmforest corpus import`: round trips, skipped-line counts, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from elmforest.cli import main
from elmforest.corpus import SPLITS, Corpus
from elmforest.corpus_import import import_sources, inspect_sources
from elmforest.errors import ElmError


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit status, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def _all_texts(corpus: Corpus, domain: str) -> dict[str, list[str]]:
    return {s: list(corpus.texts(domain, s)) for s in SPLITS}


def test_import_round_trip_jsonl_and_txt_folder(tmp_path, capsys):
    news = [f"news story number {i} about the weather." for i in range(300)]
    src = _write_jsonl(tmp_path / "news.jsonl", news)
    folder = tmp_path / "letters"
    folder.mkdir()
    (folder / "sub").mkdir()
    letters = [f"Dear friend {i},\nall is well.\n" for i in range(40)]
    for i, t in enumerate(letters):
        (folder / ("sub" if i % 2 else "") / f"{i:03d}.txt").write_text(t, encoding="utf-8")
    (folder / "notes.md").write_text("not a .txt file, ignored", encoding="utf-8")

    out = tmp_path / "corpus"
    code, stdout, stderr = _run(["corpus", "import", str(src), str(folder), "--out", str(out), "--novel", "letters"], capsys)
    assert code == 0, stderr
    assert "news" in stdout and "letters" in stdout and "skipped" not in stdout  # nothing was skipped

    corpus = Corpus(out)
    assert corpus.domains == ["news", "letters"]
    for domain, texts in (("news", news), ("letters", letters)):
        by_split = _all_texts(corpus, domain)
        got = [t for s in SPLITS for t in by_split[s]]
        # every text comes back (stripped), each exactly once: splits are disjoint and complete
        assert sorted(got) == sorted(t.strip() for t in texts)
        stats = corpus.manifest["domains"][domain]["splits"]
        for s in SPLITS:
            assert stats[s]["documents"] == len(by_split[s])
            assert stats[s]["bytes"] == sum(len(t.encode()) for t in by_split[s])
    # 300 news documents, ~5% each valid/test: both non-empty, train the large majority
    n = {s: corpus.manifest["domains"]["news"]["splits"][s]["documents"] for s in SPLITS}
    assert n["valid"] > 0 and n["test"] > 0 and n["train"] > 240
    assert corpus.manifest["domains"]["letters"]["role"] == "novel"
    assert corpus.manifest["domains"]["news"]["role"] == "train"

    # splits are a pure function of the text: a second import of the same data is identical
    out2 = tmp_path / "corpus2"
    import_sources([src, folder], out2)
    for domain in ("news", "letters"):
        for s in SPLITS:
            assert (out / domain / f"{s}.jsonl").read_bytes() == (out2 / domain / f"{s}.jsonl").read_bytes()


def test_import_counts_and_reports_skipped_lines(tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"body": "first good document"}).encode(),
        b"",  # blank
        b"   ",  # blank
        json.dumps({"body": "   "}).encode(),  # blank text
        b"\xff\xfe not utf-8",  # not UTF-8
        b"{not json",  # bad JSON
        b"[1, 2]",  # no field (not an object)
        json.dumps({"text": "wrong field"}).encode(),  # no field
        json.dumps({"body": 7}).encode(),  # field not a string
        json.dumps({"body": "second good document"}).encode(),
        json.dumps({"body": "second good document"}).encode(),  # exact duplicate
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")

    [dom] = inspect_sources([src], text_field="body")
    assert dom.usable == 3
    assert dict(dom.skipped) == {"blank": 3, "not UTF-8": 1, "bad JSON": 1, "missing field": 3}

    out = tmp_path / "c"
    code, stdout, stderr = _run(["corpus", "import", str(src), "--out", str(out), "--text-field", "body"], capsys)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    dom_m = manifest["domains"]["mixed"]
    assert sum(dom_m["splits"][s]["documents"] for s in SPLITS) == 2  # duplicate dropped
    assert dom_m["import"]["skipped"] == {"blank": 3, "not UTF-8": 1, "bad JSON": 1, "missing field": 3}
    # the skipped table names the domain with its counts per reason and the duplicate
    skipped_part = stdout[stdout.index("skipped"):]
    row = next(line for line in skipped_part.splitlines() if line.startswith("│ mixed "))
    assert [c.strip() for c in row.strip("│ ").split("│")][2:] == ["3", "1", "1", "3", "1"]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI args after `corpus import`, the file the error must name)."""
    good = _write_jsonl(tmp / "good.jsonl", ["a fine document"])
    binary = tmp / "binary.jsonl"
    binary.write_bytes(b'{"text": "x"}\n\x00\x01\x02\x89PNG')
    empty = tmp / "empty.jsonl"
    empty.write_text("\n\n{\"other\": \"x\"}\nnot json\n", encoding="utf-8")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    dup1 = _write_jsonl(tmp / "a" / "news.jsonl", ["one"])
    dup2 = _write_jsonl(tmp / "b" / "news.jsonl", ["two"])
    unsafe = _write_jsonl(tmp / "bad name!.jsonl", ["x"])
    dotted = _write_jsonl(tmp / "..jsonl", ["x"])
    nofiles = tmp / "nofiles"
    nofiles.mkdir()
    (nofiles / "x.md").write_text("markdown only", encoding="utf-8")
    blankdir = tmp / "blankdir"
    blankdir.mkdir()
    (blankdir / "a.txt").write_text("  \n", encoding="utf-8")
    bindir = tmp / "bindir"
    bindir.mkdir()
    (bindir / "ok.txt").write_text("fine", encoding="utf-8")
    (bindir / "img.txt").write_bytes(b"\x89PNG\x00\x00")
    missing = tmp / "missing.jsonl"
    out = str(tmp / "out")
    cases = {
        "missing": ([str(good), str(missing), "--out", out], str(missing)),
        "binary": ([str(binary), "--out", out], str(binary)),
        "zero usable": ([str(good), str(empty), "--out", out], str(empty)),
        "duplicate domain": ([str(dup1), str(dup2), "--out", out], str(dup2)),
        "unsafe name": ([str(unsafe), "--out", out], str(unsafe)),
        "dotted name": ([str(dotted), "--out", out], str(dotted)),
        "folder without txt": ([str(nofiles), "--out", out], str(nofiles)),
        "folder all blank": ([str(blankdir), "--out", out], str(blankdir)),
        "binary txt in folder": ([str(bindir), "--out", out], str(bindir / "img.txt")),
    }
    if os.geteuid() != 0:  # root can read anything
        unreadable = _write_jsonl(tmp / "locked.jsonl", ["x"])
        unreadable.chmod(0)
        cases["unreadable"] = ([str(unreadable), "--out", out], str(unreadable))
    return cases


@pytest.mark.parametrize(
    "case",
    ["missing", "binary", "zero usable", "duplicate domain", "unsafe name", "dotted name",
     "folder without txt", "folder all blank", "binary txt in folder", "unreadable"],
)
def test_bad_input_exits_2_with_one_line_naming_the_file(tmp_path, capsys, case):
    cases = _bad_inputs(tmp_path)
    if case not in cases:
        pytest.skip("running as root: every file is readable")
    args, named = cases[case]
    code, stdout, stderr = _run(["corpus", "import", *args], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elmforest: error: ")
    assert named in lines[0]
    assert "Traceback" not in stderr
    # validated before writing: nothing was created
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_reading_sources(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", ["text"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ElmError, match="not empty"):
        import_sources([src], out)
    assert (out / "keep.txt").read_text() == "mine"
    import_sources([src], tmp_path / "fresh")
    with pytest.raises(ElmError, match="already exists"):
        import_sources([src], tmp_path / "fresh")


def test_novel_must_name_an_imported_domain(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", ["text"])
    with pytest.raises(ElmError, match="'other' is not one of the imported domains"):
        import_sources([src], tmp_path / "out", novel=["other"])
    assert not (tmp_path / "out").exists()
