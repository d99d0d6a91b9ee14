"""Each domain's evaluation windows are its own draw: two domains holding the very same text get
windows at different places (a draw that ignored the domain would put them at the same ones)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from elmforest.combine.evaluate import spread_windows, window_seed
from elmforest.combine.scoring import prior_windows, split_windows
from elmforest.data.corpus import Corpus, DomainSource, write_corpus
from elmforest.data.tokenizer import train_tokenizer
from elmforest.data.tokens import token_array
from tinydata import _WORDS, _document

CONTEXT = 8


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A corpus of two domains with identical documents (so identical splits and token arrays)."""
    root = tmp_path_factory.mktemp("twins")
    rng = random.Random(3)
    texts = [_document(rng, _WORDS["animals"], rng.randint(3, 8)) + f" #{i}" for i in range(300)]
    write_corpus(root / "corpus", [DomainSource(d, texts, source="synthetic", licence="test data") for d in ("alpha", "beta")])
    corpus = Corpus(root / "corpus")
    tok = train_tokenizer(corpus, ["alpha"], 300, root / "tok")
    return corpus, tok


@pytest.mark.parametrize("split", ["test", "valid"])
def test_identical_domains_get_different_windows(twins, split):
    corpus, tok = twins
    arrays = [np.asarray(token_array(corpus, tok, d, split)) for d in ("alpha", "beta")]
    assert np.array_equal(*arrays)  # nothing but the domain's name tells the two apart
    grid = (len(arrays[0]) - 1) // CONTEXT
    count = grid // 4  # a quarter of the grid: two independent draws share only ~1/4 of their windows
    assert count >= 20
    a, b = (split_windows(corpus, tok, d, split, CONTEXT, count * CONTEXT, seed=0) for d in ("alpha", "beta"))
    assert len(a) == len(b) == count
    assert not torch.equal(a.starts, b.starts)
    shared = len(set(a.starts.tolist()) & set(b.starts.tolist()))
    assert shared < 0.6 * count, f"{shared} of {count} windows at the same place in both domains"
    # The draw is a function of (seed, domain, split): the same again, another with another seed.
    assert torch.equal(split_windows(corpus, tok, "alpha", split, CONTEXT, count * CONTEXT, seed=0).starts, a.starts)
    assert not torch.equal(split_windows(corpus, tok, "alpha", split, CONTEXT, count * CONTEXT, seed=1).starts, a.starts)


def test_cached_prior_windows_differ_between_domains(twins):
    corpus, tok = twins
    a, b = (prior_windows(corpus, tok, d, CONTEXT, sequences=20, seed=0) for d in ("alpha", "beta"))
    assert a.shape == b.shape == (20, CONTEXT + 1)
    assert not torch.equal(a, b)


def test_window_seed_names_domain_and_split():
    seeds = {tuple(window_seed(0, d, s)) for d in ("alpha", "beta") for s in ("test", "valid")}
    assert len(seeds) == 4
    flat = np.arange(10_000) % 97  # any array: the draw depends on the seed alone
    starts = [spread_windows(flat, CONTEXT, 50, window_seed(0, d, "test"), eos_id=None).starts for d in ("alpha", "beta")]
    assert not torch.equal(*starts)
