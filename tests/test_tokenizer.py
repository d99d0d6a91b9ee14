"""Tokenizer training/loading and the token caches."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from elmforest.data import tokens as tokens_mod
from elmforest.cli import main
from elmforest.data.corpus import Corpus, DomainSource, write_corpus
from elmforest.errors import ElmError
from elmforest.data.tokenizer import EOS, load_tokenizer, tokenizer_hash, train_tokenizer, vocab_size
from elmforest.data.tokens import cache_paths, cached_token_count, token_array

WORDS = {
    "prose": "the a cat dog sat ran on under house garden quickly slowly and but".split(),
    "code": "def return if else for while x y = + ( ) : self import print".split(),
    "intl": "été naïve café 日本 語 ümlaut 🎉 señor façade — «quote»".split(),
}


def _documents(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = WORDS[domain]
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 4))]
        docs.append(f"{domain} document {i}\n" + "\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "corpus"
    write_corpus(out, [DomainSource(d, _documents(d, 300, k)) for k, d in enumerate(WORDS)])
    return out


@pytest.fixture(scope="module")
def tok_dir(corpus_dir, tmp_path_factory):
    return train_tokenizer(Corpus(corpus_dir), list(WORDS), 400, tmp_path_factory.mktemp("t") / "tok")


ROUND_TRIP = [
    "  two leading spaces and trailing  ",
    "lines\n\n\nwith\ttabs\r\nand CRLF",
    "unicode: été 日本語 🎉 Ωμέγα never seen: ♞ 𝔘𝔫𝔦",
    " x",
    "",
    "<|endoftext|> inside text",
]


def test_round_trip_and_autotokenizer(tok_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tok_dir / name).is_file()
    auto = AutoTokenizer.from_pretrained(str(tok_dir))
    assert isinstance(auto, PreTrainedTokenizerFast)
    assert auto.eos_token == auto.bos_token == auto.pad_token == EOS
    assert auto.eos_token_id == 0
    ours = load_tokenizer(tok_dir)
    assert vocab_size(ours) == len(auto) <= 400
    assert vocab_size(ours) > 257  # some merges were learned
    for text in ROUND_TRIP:
        for tok in (auto, ours):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.decode(ids) == text
    # merges compress the training text: fewer tokens than bytes
    sample = "the cat sat on the garden"
    assert len(ours.encode(sample, add_special_tokens=False)) < len(sample.encode()) / 2


def test_training_is_deterministic_and_balanced(corpus_dir, tok_dir, tmp_path):
    again = train_tokenizer(Corpus(corpus_dir), list(WORDS), 400, tmp_path / "tok2")
    assert tokenizer_hash(again) == tokenizer_hash(tok_dir)
    assert len(tokenizer_hash(again)) == 16
    info = json.loads((tok_dir / "elmforest_tokenizer.json").read_text())
    assert info["tokenizer_hash"] == tokenizer_hash(tok_dir)
    # a small budget takes the same number of bytes (up to one document cut) from every domain
    small = train_tokenizer(Corpus(corpus_dir), list(WORDS), 300, tmp_path / "tok3", sample_bytes_per_domain=2000)
    sampled = json.loads((small / "elmforest_tokenizer.json").read_text())["sampled_bytes"]
    assert set(sampled) == set(WORDS)
    for n in sampled.values():
        assert 2000 - 4 <= n <= 2000  # exact, but for a cut inside a multi-byte character
    assert tokenizer_hash(small) != tokenizer_hash(tok_dir)
    # hash ignores run-time padding settings
    obj = json.loads((again / "tokenizer.json").read_text())
    obj["padding"] = {"strategy": "BatchLongest"}
    (again / "tokenizer.json").write_text(json.dumps(obj))
    assert tokenizer_hash(again) == tokenizer_hash(tok_dir)


def test_tokenizer_errors(corpus_dir, tok_dir, tmp_path):
    with pytest.raises(ElmError, match="not empty"):
        train_tokenizer(Corpus(corpus_dir), ["prose"], 400, tok_dir)
    with pytest.raises(ElmError, match="too small"):
        train_tokenizer(Corpus(corpus_dir), ["prose"], 100, tmp_path / "x")
    with pytest.raises(ElmError, match="nope"):
        train_tokenizer(Corpus(corpus_dir), ["nope"], 400, tmp_path / "x")
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(ElmError, match=r"broken.*tokenizer\.json is missing"):
        load_tokenizer(broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ElmError, match=r"tokenizer\.json.*not valid JSON"):
        load_tokenizer(broken)
    (broken / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    with pytest.raises(ElmError, match=r"broken.*tokenizer_config\.json is missing"):
        load_tokenizer(broken)


def test_token_array_cached_and_decodes(corpus_dir, tok_dir, monkeypatch):
    corpus = Corpus(corpus_dir)
    arr = token_array(corpus, tok_dir, "intl", "train")
    assert arr.dtype == np.uint16 and arr.ndim == 1
    tok = load_tokenizer(tok_dir)
    docs = list(corpus.texts("intl", "train"))
    # doc0 EOS doc1 EOS ... docN EOS
    assert int(arr[-1]) == tok.eos_token_id
    assert int((np.asarray(arr) == tok.eos_token_id).sum()) == len(docs)
    assert tok.decode(np.asarray(arr).tolist()) == EOS.join(docs) + EOS
    bin_path, meta_path = cache_paths(corpus, tokenizer_hash(tok_dir), "intl", "train")
    assert bin_path.stat().st_size == arr.size * 2
    meta = json.loads(meta_path.read_text())
    assert meta["length"] == arr.size and meta["dtype"] == "uint16" and meta["documents"] == len(docs)
    # the count is recorded in the manifest on disk, keyed by tokenizer hash
    assert cached_token_count(Corpus(corpus_dir), tokenizer_hash(tok_dir), "intl", "train") == arr.size

    # second call reuses the cache: nothing is encoded, the file is not rewritten
    mtime = bin_path.stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("re-tokenised a cached split")

    monkeypatch.setattr(tokens_mod, "encode_documents", boom)
    again = token_array(Corpus(corpus_dir), tok_dir, "intl", "train")
    assert bin_path.stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(again), np.asarray(arr))


def test_changed_split_is_retokenised_and_empty_split_errors(tmp_path, tok_dir):
    out = tmp_path / "c"
    write_corpus(out, [DomainSource("prose", _documents("prose", 60, 7))])
    corpus = Corpus(out)
    first = np.asarray(token_array(corpus, tok_dir, "prose", "train")).copy()
    path = corpus.split_path("prose", "train")
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-1]), encoding="utf-8")  # drop the last document
    second = np.asarray(token_array(corpus, tok_dir, "prose", "train"))
    assert 0 < second.size < first.size
    assert np.array_equal(second, first[: second.size])
    path.write_text("", encoding="utf-8")
    with pytest.raises(ElmError, match=r"train\.jsonl.*empty"):
        token_array(corpus, tok_dir, "prose", "train")


def test_cli_train(corpus_dir, tmp_path, capsys):
    out = tmp_path / "cli_tok"
    main(["tokenizer", "train", str(corpus_dir), "--vocab-size", "300", "--out", str(out), "--domains", "prose,code"])
    text = capsys.readouterr().out
    assert f"hash       {tokenizer_hash(out)}" in text
    assert "vocab size 300" in text
    info = json.loads((out / "elmforest_tokenizer.json").read_text())
    assert info["domains"] == ["prose", "code"]
    assert "intl" in text and "(not trained on)" in text
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "train", str(corpus_dir), "--out", str(tmp_path / "y"), "--domains", "zzz"])
    assert e.value.code == 2
    assert "zzz" in capsys.readouterr().err


def test_resaved_tokenizer_keeps_hash_and_dtype_bounds(tok_dir, tmp_path):
    # an expert folder may hold the tokenizer re-saved by transformers; it is the same tokenizer
    load_tokenizer(tok_dir).save_pretrained(str(tmp_path / "resaved"))
    assert tokenizer_hash(tmp_path / "resaved") == tokenizer_hash(tok_dir)
    assert load_tokenizer(tmp_path / "resaved").decode(load_tokenizer(tok_dir).encode(ROUND_TRIP[2])) == ROUND_TRIP[2]
    assert tokens_mod.token_dtype(65536) == np.uint16  # ids 0..65535
    assert tokens_mod.token_dtype(65537) == np.uint32
