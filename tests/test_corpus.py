"""`elmforest corpus import`: round trips, strict bad-line errors, skipped-line counts, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli_runner import run_cli
from elmforest.data.corpus import SPLITS, Corpus
from elmforest.data.corpus_import import import_sources, inspect_sources
from elmforest.errors import ElmError


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


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
    code, stdout, stderr = run_cli(["corpus", "import", str(src), str(folder), "--out", str(out), "--novel", "letters"], capsys)
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


MIXED_LINES = [  # line number: what it is, with --text-field body
    json.dumps({"body": "first good document"}).encode(),  # 1
    b"",  # 2 blank
    b"   ",  # 3 blank
    json.dumps({"body": "   "}).encode(),  # 4 blank text
    b"\xff\xfe not utf-8",  # 5 not UTF-8
    b"{not json",  # 6 bad JSON
    b"[1, 2]",  # 7 no field (not an object)
    json.dumps({"text": "wrong field"}).encode(),  # 8 no field
    json.dumps({"body": 7}).encode(),  # 9 field not a string
    json.dumps({"body": "second good document"}).encode(),  # 10
    json.dumps({"body": "second good document"}).encode(),  # 11 exact duplicate
]


def test_skip_bad_lines_counts_and_reports_them(tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(MIXED_LINES) + b"\n")

    [dom] = inspect_sources([src], text_field="body", skip_bad_lines=True).domains
    assert dom.usable == 3
    assert dict(dom.skipped) == {"blank": 3, "not UTF-8": 1, "bad JSON": 1, "missing field": 3}

    out = tmp_path / "c"
    code, stdout, stderr = run_cli(
        ["corpus", "import", src, "--out", out, "--text-field", "body", "--skip-bad-lines"], capsys)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    dom_m = manifest["domains"]["mixed"]
    assert sum(dom_m["splits"][s]["documents"] for s in SPLITS) == 2  # duplicate dropped
    assert dom_m["import"]["skipped"] == {"blank": 3, "not UTF-8": 1, "bad JSON": 1, "missing field": 3}
    assert dom_m["import"]["skip_bad_lines"] is True
    # the skipped table names the domain with its counts per reason and the duplicate
    skipped_part = stdout[stdout.index("skipped"):]
    row = next(line for line in skipped_part.splitlines() if line.startswith("│ mixed "))
    assert [c.strip() for c in row.strip("│ ").split("│")][2:] == ["3", "1", "1", "3", "1"]


@pytest.mark.parametrize(
    "bad_line,message",
    [
        (b"\xff\xfe not utf-8", "line 3: not UTF-8 (byte 0xff at byte 1 of the line)"),
        (b'{"body": "unterminated', "line 3: bad JSON at column 10 (Unterminated string starting at)"),
        (b"[1, 2]", "line 3: a JSON array, not an object with a string field 'body'"),
        (b'{"text": "wrong field"}', "line 3: no field 'body' (see --text-field)"),
        (b'{"body": 7}', "line 3: field 'body' is a JSON number, not a string"),
        (b'{"body": null}', "line 3: field 'body' is a JSON null, not a string"),
    ],
    ids=["not-utf8", "bad-json", "not-object", "missing-field", "number-field", "null-field"],
)
def test_strict_import_stops_at_the_first_bad_line(tmp_path, capsys, bad_line, message):
    good = _write_jsonl(tmp_path / "good.jsonl", ["a fine document"], field="body")
    src = tmp_path / "broken.jsonl"
    lines = [json.dumps({"body": "line one"}).encode(), b"", bad_line,
             json.dumps({"body": "line four"}).encode(), b"{also bad"]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["corpus", "import", good, src, "--out", out, "--text-field", "body"], capsys)
    assert code == 2
    # one line: the file, the first bad line's number (line 2 is blank, skipped silently; line 5
    # is bad too but never reached) and what is wrong, then the way out
    hint = "fix the line or pass --skip-bad-lines to skip such lines"
    assert stderr.splitlines() == [f"elmforest: error: {src}: {message}; {hint}"]
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()  # nothing written, not even an empty folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_strict_import_counts_line_numbers_from_one_across_blank_lines(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join([json.dumps({"text": f"doc {i}"}) for i in range(40)] + ["", "", "oops", ""]) + "\n",
                   encoding="utf-8")
    code, _, stderr = run_cli(["corpus", "import", src, "--out", tmp_path / "out"], capsys)
    assert code == 2 and f"{src}: line 43: bad JSON at column 1 (Expecting value);" in stderr  # 40 documents, 2 blank, then it
    assert not (tmp_path / "out").exists()
    # blank lines alone are no error, and --skip-bad-lines imports the 40 documents
    code, _, stderr = run_cli(["corpus", "import", src, "--out", tmp_path / "out", "--skip-bad-lines"], capsys)
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["domains"]["d"]["import"]["skipped"] == {"blank": 3, "bad JSON": 1}
    assert sum(manifest["domains"]["d"]["splits"][s]["documents"] for s in SPLITS) == 40


def test_strict_import_names_a_txt_file_that_is_not_utf8(tmp_path, capsys):
    folder = tmp_path / "letters"
    folder.mkdir()
    (folder / "a.txt").write_text("a letter", encoding="utf-8")
    (folder / "b.txt").write_bytes(b"caf\xe9 latin-1")
    (folder / "c.txt").write_text("   ", encoding="utf-8")  # blank: skipped in both modes
    code, _, stderr = run_cli(["corpus", "import", folder, "--out", tmp_path / "out"], capsys)
    assert code == 2
    assert stderr.startswith(f"elmforest: error: {folder / 'b.txt'}: not UTF-8 (byte 0xe9 at byte 4)")
    assert not (tmp_path / "out").exists()
    code, _, stderr = run_cli(["corpus", "import", folder, "--out", tmp_path / "out", "--skip-bad-lines"], capsys)
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["domains"]["letters"]["import"]["skipped"] == {"not UTF-8": 1, "blank": 1}


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI args after `corpus import`, the file the error must name)."""
    good = _write_jsonl(tmp / "good.jsonl", ["a fine document"])
    binary = tmp / "binary.jsonl"
    binary.write_bytes(b'{"text": "x"}\n\x00\x01\x02\x89PNG')
    empty = tmp / "empty.jsonl"
    empty.write_text('\n\n{"text": "  "}\n\n', encoding="utf-8")  # blank lines and a blank text only
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
    code, stdout, stderr = run_cli(["corpus", "import", *args], capsys)
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
