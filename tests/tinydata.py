"""Tiny synthetic multi-domain corpora and recipes for end-to-end tests (no network)."""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from elmforest.data.corpus import DomainSource, write_corpus

_WORDS = {
    "animals": "the cat dog bird fox owl sat ran flew slept on under near a mat log tree roof".split(),
    "code": "def return if else for in range x y z = + - ( ) : print value list".split(),
    "numbers": "one two three four five six seven eight nine ten plus minus equals and".split(),
    "legal": "the licensee shall not without prior written consent of licensor grant any right".split(),
}


def _document(rng: random.Random, words: list[str], n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        k = rng.randint(5, 12)
        start = rng.randrange(len(words))
        # mostly consecutive words: learnable local structure
        sentences.append(" ".join(words[(start + i + (rng.random() < 0.2)) % len(words)] for i in range(k)) + " .")
    return " ".join(sentences)


def make_corpus(out: Path, domains: tuple[str, ...] = ("animals", "code", "numbers"), docs: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    sources = []
    for name in domains:
        texts = [_document(rng, _WORDS[name], rng.randint(3, 8)) + f" #{i}" for i in range(docs)]
        sources.append(DomainSource(name, texts, source="synthetic", licence="test data"))
    write_corpus(out, sources, description="tiny synthetic test corpus")
    return out


def tiny_recipe(corpus: Path, out: Path, **overrides) -> dict:
    """A recipe that trains in seconds: 2 train domains, 1 novel, tiny GPT-2 with context 32."""
    recipe = {
        "corpus": str(corpus),
        "train_domains": ["animals", "code"],
        "novel_domains": ["numbers"],
        "tokenizer": {"vocab_size": 300, "sample_bytes_per_domain": 200000},
        "model": {"size": "tiny", "context": 32, "width": 32},
        "budget": {"total_tokens": 16384, "seed_fraction": 0.5, "batch_tokens": 256},
        "optim": {"lr": 0.01, "eval_every": 8, "checkpoint_every": 8, "log_every": 2, "threads": 1},
        "eval": {"max_tokens_per_domain": 1000, "prior_sequences": 8, "prior_batch": 2, "batch_size": 8,
                 "valid_windows_per_domain": 4},
        "launcher": {"kind": "sequential", "threads_per_worker": 1},
        "out": str(out),
    }
    for key, value in overrides.items():
        node = recipe
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path
