"""The evaluation protocol's arithmetic: windows spread over the split, per-document sums, the
paired bootstrap, verdicts and the compute multiple at which dense matches the forest."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elmforest.combine.bootstrap import FAILS, HOLDS, UNCLEAR, Bootstrap, DomainDocs, compare, crossing, verdict
from elmforest.errors import ElmError
from elmforest.combine.evaluate import document_sums, spread_windows

EOS = 0


def doc_array(lengths: list[int]) -> np.ndarray:
    """Documents of the given lengths, each followed by EOS; a non-EOS token at position p is p + 1,
    so a window's start can be read off its tokens."""
    ends = np.cumsum([n + 1 for n in lengths]) - 1
    array = np.arange(1, ends[-1] + 2, dtype=np.int64)
    array[ends] = EOS
    return array


def window_start(row: np.ndarray) -> int:
    return int(row[0]) - 1 if row[0] != EOS else int(row[1]) - 2


def test_spread_windows_cover_the_whole_split_and_label_documents():
    lengths = [40] * 50  # 50 documents of 41 tokens (EOS included): 2,050 tokens
    array = doc_array(lengths)
    context = 8
    w = spread_windows(array, context, 60, seed=[0, 1], eos_id=EOS)
    assert w.tokens.shape == (60, context + 1) and w.docs.shape == (60, context)
    starts = [window_start(row) for row in w.tokens.numpy()]
    for s, row in zip(starts, w.tokens.numpy()):
        assert s % context == 0 and np.array_equal(array[s : s + context + 1], row)  # a grid window
    assert len(set(starts)) == 60
    # spread: windows come from both ends of the split, not just its first tokens
    assert min(starts) < len(array) // 4 and max(starts) > 3 * len(array) // 4
    # document labels: position p belongs to document p // 41 (each document is 41 tokens)
    for s, docs in zip(starts, w.docs.numpy()):
        assert docs.tolist() == [(s + t) // 41 for t in range(1, context + 1)]
    assert w.split_documents == 50 and w.n_tokens == 60 * context
    assert w.documents == len({d for row in w.docs.tolist() for d in row})
    # deterministic, and another seed draws other windows
    again = spread_windows(array, context, 60, seed=[0, 1], eos_id=EOS)
    assert torch.equal(again.tokens, w.tokens)
    other = spread_windows(array, context, 60, seed=[1, 1], eos_id=EOS)
    assert not torch.equal(other.tokens, w.tokens)


def test_spread_windows_take_every_window_when_asked_for_more():
    array = doc_array([10, 10, 10])
    w = spread_windows(array, 4, 10_000, seed=0, eos_id=EOS)
    assert len(w) == (len(array) - 1) // 4
    with pytest.raises(ElmError, match="too few tokens"):
        spread_windows(array[:3], 4, 1, seed=0, eos_id=EOS)


def test_document_sums_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    docs = torch.tensor([[3, 3, 5], [5, 7, 7]])
    ids, sums, counts = document_sums(lp, docs)
    assert ids == [3, 5, 7]
    assert sums == pytest.approx([3.0, 7.0, 11.0]) and counts == [2, 2, 2]


def _docs(rng: np.random.Generator, n: int, scale: float = 1.0, seeds: int = 1) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(20, 200, size=n).astype(np.float64)
    nll = tokens * rng.uniform(2.0, 4.0, size=n) * scale
    return tokens, np.tile(nll, (seeds, 1))


def test_point_estimates_are_geometric_means_of_per_domain_perplexities():
    rng = np.random.default_rng(0)
    domains = {}
    for name in ("a", "b", "c"):
        tokens, nll = _docs(rng, 30)
        domains[name] = DomainDocs(tokens, {"m": nll})
    boot = Bootstrap(domains, {"train": ["a", "b"], "novel": ["c"]}, resamples=200)
    per = {d: domains[d].nll["m"].sum() / domains[d].tokens.sum() for d in domains}
    assert boot.part_point("m", "train") == pytest.approx((per["a"] + per["b"]) / 2)
    assert math.exp(boot.part_point("m", "novel")) == pytest.approx(math.exp(per["c"]))
    lo, hi = boot.part_ci("m", "train")
    assert lo < math.exp(boot.part_point("m", "train")) < hi


def test_paired_ratio_of_a_uniformly_worse_method_is_exact():
    """b costs exactly 10% more NLL on every document: a paired bootstrap gives the ratio e^(0.1 x mean NLL)
    with a zero-width interval; resampling the methods independently would not."""
    rng = np.random.default_rng(1)
    tokens, nll = _docs(rng, 40)
    dom = DomainDocs(tokens, {"a": nll, "b": nll * 1.1, "same": nll.copy()})
    boot = Bootstrap({"d": dom}, {"train": ["d"], "novel": []}, resamples=300)
    ratio, ci = boot.ratio("b", "a", "train")
    mean_nll = nll.sum() / tokens.sum()
    # every resample's ratio is exp(0.1 * resampled mean NLL): positive, narrow, around exp(0.1 * mean)
    assert ratio == pytest.approx(math.exp(0.1 * mean_nll))
    assert ci[0] > 1.0 and ci[1] - ci[0] < 0.05 * ratio
    assert boot.ratio("same", "a", "train") == (pytest.approx(1.0), [pytest.approx(1.0), pytest.approx(1.0)])
    rows = compare(boot, "a", "b", "a beats b")
    assert [r["part"] for r in rows] == ["train"] and rows[0]["verdict"] == HOLDS
    assert compare(boot, "b", "a", "b beats a")[0]["verdict"] == FAILS


def test_noise_makes_a_difference_indistinguishable():
    rng = np.random.default_rng(2)
    tokens, nll = _docs(rng, 8)
    noisy = nll[0] * rng.uniform(0.8, 1.25, size=8)
    dom = DomainDocs(tokens, {"a": nll, "b": noisy[None, :]})
    boot = Bootstrap({"d": dom}, {"train": ["d"], "novel": []}, resamples=500)
    _, ci = boot.ratio("a", "b", "train")
    assert ci[0] < 1.0 < ci[1]
    assert verdict(ci) == UNCLEAR


def test_seeds_widen_the_interval_only_when_they_disagree():
    rng = np.random.default_rng(3)
    tokens, nll = _docs(rng, 30)
    one = Bootstrap({"d": DomainDocs(tokens, {"m": nll})}, {"train": ["d"]}, resamples=400, seed=5)
    same = Bootstrap({"d": DomainDocs(tokens, {"m": np.vstack([nll, nll])})}, {"train": ["d"]}, resamples=400, seed=5)
    spread = np.vstack([nll * 0.8, nll * 1.2])
    apart = Bootstrap({"d": DomainDocs(tokens, {"m": spread})}, {"train": ["d"]}, resamples=400, seed=5)
    width = lambda b: b.part_ci("m", "train")[1] - b.part_ci("m", "train")[0]  # noqa: E731
    assert same.part_point("m", "train") == pytest.approx(one.part_point("m", "train"))
    assert width(apart) > 3 * width(same)
    # the point estimate averages seeds in log space: mean of the two seeds' mean NLLs
    assert apart.part_point("m", "train") == pytest.approx(nll.sum() / tokens.sum())


def test_verdicts():
    assert verdict([0.9, 0.99]) == HOLDS
    assert verdict([1.01, 1.2]) == FAILS
    assert verdict([0.95, 1.05]) == UNCLEAR


def test_crossing_interpolates_log_linearly():
    ks = [1.0, 2.0, 4.0]
    logp = [math.log(100.0), math.log(80.0), math.log(60.0)]
    # 70 lies between the 2x (80) and 4x (60) points: log k = log 2 + f (log 4 - log 2), f = (log 80 - log 70) / (log 80 - log 60)
    f = (math.log(80) - math.log(70)) / (math.log(80) - math.log(60))
    assert crossing(ks, logp, math.log(70.0)) == pytest.approx(2.0 * 2.0**f)
    assert crossing(ks, logp, math.log(80.0)) == pytest.approx(2.0)
    assert crossing(ks, logp, math.log(120.0)) == "<1"
    assert crossing(ks, logp, math.log(50.0)) == ">4"
