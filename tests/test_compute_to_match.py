"""Compute to match, per part: the train part's figure from train-domain perplexities, the novel
part's from novel-domain perplexities (numbers worked out here, different for the two parts)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from elmforest.combine.bootstrap import Bootstrap, DomainDocs, compute_to_match

# Per-token NLL of each method on each domain: dense at 1x and 2x the compute, and the forest.
RATES = {
    "news": {"dense": 4.0, "dense_x2": 3.0, "forest": 3.5},  # train: forest halfway (in log ppl) -> 2^0.5
    "code": {"dense": 3.0, "dense_x2": 2.0, "forest": 2.5},  # train: halfway as well
    "tweets": {"dense": 5.0, "dense_x2": 4.0, "forest": 4.75},  # novel: a quarter of the way -> 2^0.25
}
DENSE = {1.0: "dense", 2.0: "dense_x2"}


def _boot() -> Bootstrap:
    rng = np.random.default_rng(0)
    domains = {}
    for d, rates in RATES.items():
        tokens = rng.integers(5, 50, size=12)
        domains[d] = DomainDocs(tokens=tokens, nll={m: (r * tokens)[None, :].astype(float) for m, r in rates.items()})
    return Bootstrap(domains, {"train": ["news", "code"], "novel": ["tweets"]}, resamples=50, seed=0)


def test_each_part_crosses_at_its_own_multiple():
    boot = _boot()
    train = compute_to_match(boot, "forest", DENSE, "train")
    novel = compute_to_match(boot, "forest", DENSE, "novel")
    assert train["multiple"] == pytest.approx(2**0.5)
    assert novel["multiple"] == pytest.approx(2**0.25)
    # dense's perplexity at each multiple: the part's geometric mean
    assert train["points"] == pytest.approx({"1": math.exp(3.5), "2": math.exp(2.5)})
    assert novel["points"] == pytest.approx({"1": math.exp(5.0), "2": math.exp(4.0)})
    # every document has the same per-token NLL, so every resample gives the point
    assert novel["ci"] == pytest.approx([2**0.25, 2**0.25])
    assert compute_to_match(boot, "forest", DENSE, "empty") is None
