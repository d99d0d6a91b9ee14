"""c-BTM's default document size (no tokenizer) tracks a BPE tokenizer's token count across kinds
of text, where whitespace-separated words undercount code several times over."""

from __future__ import annotations

import math
import random

from elmforest.cbtm.cluster import document_sizes
from elmforest.data.corpus import Corpus, DomainSource, write_corpus
from elmforest.data.tokenizer import load_tokenizer, train_tokenizer

_rng = random.Random(5)
VOCAB = ["".join(_rng.choice("etaoinshrdlucmfwyp") for _ in range(_rng.randint(2, 9))) for _ in range(3000)]
IDS = ["total", "items", "weights", "i", "j", "k", "count", "value", "result", "x", "y"]


def prose(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(60, 90))) + "."


def code(rng: random.Random) -> str:
    """Dense code: few spaces, many tokens per whitespace-separated 'word'."""
    lines = []
    for _ in range(rng.randint(6, 10)):
        a, b, c = (rng.choice(IDS) for _ in range(3))
        lines.append(f"    {a}[{b}]+={c}[{b}]*{a}({c},{rng.randint(0, 99)});")
    return "def f():\n" + "\n".join(lines)


def test_default_size_tracks_tokens_where_words_do_not(tmp_path):
    rng = random.Random(0)
    write_corpus(tmp_path / "c", [DomainSource("prose", [prose(rng) for _ in range(200)]),
                                  DomainSource("code", [code(rng) for _ in range(200)])])
    tok_dir = train_tokenizer(Corpus(tmp_path / "c"), ["prose", "code"], 1000, tmp_path / "tok")
    tok = load_tokenizer(tok_dir)
    docs = {"prose": [prose(rng) for _ in range(20)], "code": [code(rng) for _ in range(20)]}

    def total(kind: str, size) -> int:
        return sum(size(d) for d in docs[kind])

    tokens = {k: total(k, lambda d: len(tok.encode(d, add_special_tokens=False))) for k in docs}
    default = {k: int(document_sizes(docs[k]).sum()) for k in docs}
    words = {k: total(k, lambda d: len(d.split())) for k in docs}
    assert default == {k: total(k, lambda d: len(d.encode("utf-8"))) for k in docs}  # UTF-8 bytes

    # How far each count puts code's size relative to prose's, against the tokenizer's ratio.
    want = tokens["code"] / tokens["prose"]
    off_default = abs(math.log(default["code"] / default["prose"] / want))
    off_words = abs(math.log(words["code"] / words["prose"] / want))
    assert off_default < math.log(1.5), f"default sizes put code at {math.exp(off_default):.2f}x its token share"
    assert off_words > math.log(3)  # the old whitespace count: code several times too small
