"""A small synthetic corpus named like the demo corpus, to run the paper-125m recipe without data/demo.

Nine domains with the demo corpus's names, each a learnable synthetic language of its own
(tinydata's sentence generator over a per-domain word list), so `--set corpus=...` is the only
change a recipe written for data/demo needs. Used by tests/test_paper_recipe.py and
scripts/gpu-check.sh (`python tests/paperdata.py OUT`).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from elmforest.data.corpus import DomainSource, write_corpus
from tinydata import _WORDS, _document

DEMO_NAMES = ("news", "legal", "code", "health_tweets", "drama", "speeches", "reviews", "factbook", "dialogue")


def make_paper_corpus(out: Path, docs: int = 160, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lists = list(_WORDS.values())
    sources = []
    for i, name in enumerate(DEMO_NAMES):
        # a shared base list plus words only this domain uses: domains overlap but differ
        words = lists[i % len(lists)] + [f"{name[:4]}{k}" for k in range(8)]
        texts = [_document(rng, words, rng.randint(3, 8)) + f" #{j}" for j in range(docs)]
        sources.append(DomainSource(name, texts, source="synthetic", licence="test data"))
    write_corpus(out, sources, description="synthetic corpus with the demo corpus's domain names")
    return out


if __name__ == "__main__":  # run as a script, this folder is on sys.path, so tinydata imports
    print(make_paper_corpus(Path(sys.argv[1]), docs=int(sys.argv[2]) if len(sys.argv) > 2 else 160))
