"""Rich tables printed to a pipe (not a terminal) keep every row on one line."""

from __future__ import annotations

import json

from cli_runner import run_cli
from elmforest.console import PIPE_WIDTH, stdout_console
from elmforest.data.corpus import SPLITS


def test_piped_table_rows_are_never_wrapped(tmp_path, capsys):
    # Two domains with 60-character names: the manifest table is ~110 columns wide, past the
    # 80 columns rich assumes off a terminal, so a wrapping console would split the names.
    names = ["a_rather_long_domain_name_for_a_collection_of_weather_reports",
             "another_long_domain_name_for_a_collection_of_court_decisions"]
    sources = []
    for k, name in enumerate(names):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": f"document {i} of source {k}"}) + "\n" for i in range(50 + 25 * k)),
                       encoding="utf-8")
        sources.append(src)
    out = tmp_path / "corpus"
    code, stdout, stderr = run_cli(["corpus", "import", *sources, "--out", out], capsys)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    lines = stdout.splitlines()
    for name in names:
        splits = manifest["domains"][name]["splits"]
        docs = [splits[s]["documents"] for s in SPLITS]
        # the row: name, role, documents, MB, train, valid, test -- all on one line, in order
        [row] = [line for line in lines if name in line]
        cells = [c.strip() for c in row.strip().strip("│").split("│")]
        assert cells == [name, "train", str(sum(docs)), "0.0", *map(str, docs)]
    assert max(len(line) for line in lines) > 80  # the table really is wider than rich's pipe default
    assert "\x1b[" not in stdout  # no colour codes into a pipe


def test_console_width_on_and_off_a_terminal(capsys, monkeypatch):
    import sys

    assert stdout_console().width == PIPE_WIDTH  # captured by pytest: not a terminal
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)  # now it claims to be one
    monkeypatch.setenv("COLUMNS", "93")
    console = stdout_console()
    assert console.is_terminal and console.width == 93  # the terminal's width, as rich sets it
