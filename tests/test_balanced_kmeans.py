"""Balanced k-means: the size bound (documents or tokens), the greedy walk, oversize documents."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from elmforest.cbtm.balanced_kmeans import balanced_assign, balanced_kmeans, cluster_capacity, over_capacity
from elmforest.errors import ElmError


def blobs(sizes: list[int], dim: int = 4, spread: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs: centres 1 apart along the axes, small spread."""
    rng = np.random.default_rng(seed)
    points, truth = [], []
    for i, n in enumerate(sizes):
        centre = np.zeros(dim)
        centre[i % dim] = 1.0
        points.append(centre + spread * rng.standard_normal((n, dim)))
        truth += [i] * n
    return np.concatenate(points), np.asarray(truth)


def ceil_capacity(total: int, k: int, tenths: int) -> int:
    """ceil(total / k * (1 + tenths/10)) in integer arithmetic, independent of the library's float."""
    return -(-total * (10 + tenths) // (10 * k))


def loads(labels: np.ndarray, sizes: np.ndarray, k: int) -> list[int]:
    """Each cluster's summed size, by a plain loop."""
    out = [0] * k
    for c, s in zip(labels.tolist(), sizes.tolist()):
        out[c] += s
    return out


def greedy_reference(d2: np.ndarray, capacity: int, sizes: np.ndarray | None = None) -> np.ndarray:
    """`balanced_assign` written as plain loops over all (doc, cluster) pairs sorted by (distance, flat index):
    oversize documents alone first, then the documents above the always-fits bound, then the
    rest, each accepted where it fits; what fits nowhere goes where most room is left."""
    n, k = d2.shape
    sizes = np.ones(n, dtype=int) if sizes is None else sizes
    pairs = [divmod(int(f), k) for f in np.lexsort((np.arange(n * k), d2.ravel()))]
    labels = np.full(n, -1)
    room = [capacity] * k
    for i, c in pairs:
        if sizes[i] > capacity and labels[i] < 0 and room[c] == capacity:
            labels[i], room[c] = c, -1
    rest = [i for i in range(n) if labels[i] < 0]
    open_ = [c for c in range(k) if room[c] >= 0]
    slack = sum(room[c] for c in open_) - sum(sizes[i] for i in rest)
    bound = slack / (len(open_) - 1) if len(open_) > 1 else float("inf")
    for group in ({i for i in rest if sizes[i] > bound}, {i for i in rest if sizes[i] <= bound}):
        for i, c in pairs:
            if i in group and labels[i] < 0 and sizes[i] <= room[c]:
                labels[i] = c
                room[c] -= sizes[i]
    for i in range(n):
        if labels[i] < 0:
            c = min(open_, key=lambda c: (-room[c], d2[i, c], c))
            labels[i] = c
            room[c] -= sizes[i]
    return labels


# ----------------------------------------------------------------------------- balancing documents


def test_capacity_formula():
    assert cluster_capacity(300, 3, 0.1) == 110  # 100 * 1.1, not 111 from float round-off
    assert cluster_capacity(100, 4, 0.0) == 25
    assert cluster_capacity(10, 3, 0.0) == 4
    assert cluster_capacity(301, 3, 0.1) == 111
    for total, k in ((1_234_567, 6), (46_000_001, 7), (999, 5)):
        assert cluster_capacity(total, k, 0.1) == ceil_capacity(total, k, 1)


def test_unequal_blobs_respect_the_size_bound():
    z, _ = blobs([50, 100, 150])
    centres, labels = balanced_kmeans(z, 3, tolerance=0.1, seed=0)
    sizes = np.bincount(labels, minlength=3)
    assert sizes.sum() == 300
    assert sizes.max() <= 110  # ceil(300/3 * 1.1)
    assert sizes.min() >= 1
    assert centres.shape == (3, 4)


@pytest.mark.parametrize("n,k,tol", [(97, 5, 0.0), (200, 7, 0.1), (64, 64, 0.0), (50, 1, 0.3), (31, 4, 0.5)])
def test_balanced_assign_bound_and_reference_walk(n, k, tol):
    rng = np.random.default_rng(n * 31 + k)
    d2 = rng.random((n, k))
    d2[: n // 4] = np.round(d2[: n // 4], 1)  # ties, so the tie-break order matters too
    cap = cluster_capacity(n, k, tol)
    labels = balanced_assign(d2, cap)
    sizes = np.bincount(labels, minlength=k)
    assert labels.min() >= 0 and sizes.sum() == n
    assert sizes.max() <= cap
    assert sizes.min() >= 1
    reference = greedy_reference(d2, cap)
    if (np.bincount(reference, minlength=k) > 0).all():  # no empty-cluster repair needed
        np.testing.assert_array_equal(labels, reference)


def test_empty_cluster_is_repaired_within_the_bound():
    d2 = np.array([[0.0, 5.0, 9.0], [0.1, 5.0, 8.0], [0.2, 5.0, 7.0], [5.0, 0.0, 6.0]])
    labels = balanced_assign(d2, capacity=3)  # cluster 2 is nobody's choice
    assert sorted(np.bincount(labels, minlength=3).tolist()) == [1, 1, 2]
    assert labels[2] == 2  # the document nearest to centre 2 among those that can move


def test_equal_blobs_are_recovered_exactly():
    z, truth = blobs([60, 60, 60], seed=1)
    _, labels = balanced_kmeans(z, 3, tolerance=0.1, seed=3)
    assert adjusted_rand_score(truth, labels) == 1.0


def test_balanced_kmeans_is_deterministic():
    z, _ = blobs([40, 70, 30, 60], spread=0.4, seed=2)
    sizes = np.random.default_rng(0).integers(1, 50, size=200)
    for s in (None, sizes):
        c1, l1 = balanced_kmeans(z, 4, tolerance=0.05, seed=7, sizes=s)
        c2, l2 = balanced_kmeans(z, 4, tolerance=0.05, seed=7, sizes=s)
        np.testing.assert_array_equal(l1, l2)
        np.testing.assert_array_equal(c1, c2)


# ----------------------------------------------------------------------------- balancing tokens


def huge_and_tiny(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three blobs of points; a few documents of 400-900 tokens among many of 1-30 tokens.

    Blob 0 holds 6 of the huge documents, so it holds far more tokens than a third of the total.
    Returns (z [n, 4], sizes [n], blob [n]).
    """
    rng = np.random.default_rng(seed)
    z, blob = blobs([150, 150, 150], spread=0.2, seed=seed)
    sizes = rng.integers(1, 31, size=450)
    huge = np.concatenate([rng.choice(150, 6, replace=False), 150 + rng.choice(300, 3, replace=False)])
    sizes[huge] = rng.integers(400, 901, size=huge.size)
    return z, sizes, blob


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_balancing_respects_the_capacity_with_huge_and_tiny_documents(seed):
    z, sizes, _ = huge_and_tiny(seed)
    k = 3
    cap = ceil_capacity(int(sizes.sum()), k, 1)
    assert sizes.max() <= cap  # no oversize document here: the bound must hold for every cluster
    _, labels = balanced_kmeans(z, k, tolerance=0.1, seed=seed, sizes=sizes)
    assert labels.min() >= 0 and len(labels) == len(sizes)
    per_cluster = loads(labels, sizes, k)
    assert max(per_cluster) <= cap, (per_cluster, cap)
    assert min(np.bincount(labels, minlength=k)) >= 1
    # balancing documents instead ignores the tokens: blob 0's huge documents overflow one cluster
    _, by_docs = balanced_kmeans(z, k, tolerance=0.1, seed=seed)
    assert max(np.bincount(by_docs, minlength=k)) <= ceil_capacity(len(sizes), k, 1)
    assert max(loads(by_docs, sizes, k)) > cap
    assert adjusted_rand_score(by_docs, labels) < 1.0  # different clusters


@pytest.mark.parametrize("seed", range(6))
def test_weighted_assign_is_the_greedy_walk(seed):
    rng = np.random.default_rng(seed)
    n, k = 120, 4
    d2 = np.round(rng.random((n, k)), 2)  # many ties
    sizes = rng.integers(1, 20, size=n)
    sizes[rng.choice(n, 3, replace=False)] = rng.integers(60, 150, size=3)  # a few large documents
    cap = ceil_capacity(int(sizes.sum()), k, seed % 3)  # tolerance 0, 0.1 or 0.2
    labels = balanced_assign(d2, cap, sizes)
    reference = greedy_reference(d2, cap, sizes)
    if (np.bincount(reference, minlength=k) > 0).all():
        np.testing.assert_array_equal(labels, reference)
    per_cluster = loads(labels, sizes, k)
    if seed % 3:  # with 10-20% slack these packings fit: every cluster within the capacity
        assert max(per_cluster) <= cap and over_capacity(labels, sizes, k, cap) == []
    else:  # with no slack a cluster may overflow, by less than one document, and is reported
        assert max(per_cluster) < cap + sizes.max()
        assert over_capacity(labels, sizes, k, cap) == [c for c in range(k) if per_cluster[c] > cap]
    # every document sits in its nearest cluster among those that could still take it at the
    # end (rooms only shrink while the walk runs, so this is implied by the walk)
    room = cap - np.asarray(loads(labels, sizes, k))
    for i in range(n):
        could = [c for c in range(k) if c == labels[i] or room[c] >= sizes[i]]
        assert d2[i, labels[i]] == min(d2[i, c] for c in could)


def test_oversize_document_gets_a_cluster_of_its_own():
    # 30 one-token documents and one of 40 tokens: total 70, k=3, capacity ceil(70/3*1.1) = 26
    z, _ = blobs([10, 10, 11], spread=0.05, seed=4)
    sizes = np.ones(31, dtype=int)
    sizes[0] = 40  # in blob 0, larger than the capacity
    cap = ceil_capacity(70, 3, 1)
    assert cap == 26
    d2 = ((z[:, None, :] - np.eye(4)[None, :3, :]) ** 2).sum(-1)  # distances to the blob centres
    labels = balanced_assign(d2, cap, sizes)
    alone = labels[0]
    assert alone == 0 and (labels == alone).sum() == 1  # its nearest cluster, alone
    per_cluster = loads(labels, sizes, 3)
    assert per_cluster[alone] == 40 and max(per_cluster[c] for c in range(3) if c != alone) <= cap
    assert over_capacity(labels, sizes, 3, cap) == [alone]
    assert sorted(per_cluster) == [10, 20, 40] or max(per_cluster[1:]) <= cap  # the 30 small ones share 2 clusters
    # the same through k-means: still placed, still alone
    _, km = balanced_kmeans(z, 3, tolerance=0.1, seed=0, sizes=sizes)
    assert (km == km[0]).sum() == 1 and max(loads(km, sizes, 3)[c] for c in range(3) if c != km[0]) <= cap


def test_impossible_packing_goes_where_most_room_is_left():
    # three documents of 40 tokens (and two tiny ones) into two clusters of capacity
    # ceil(123/2*1.1) = 68: no packing of the three fits, so one cluster must exceed it
    d2 = np.array([[0.0, 1.0], [0.1, 0.15], [0.2, 0.3], [0.0, 0.5], [0.0, 0.5]])
    sizes = np.array([40, 40, 40, 1, 2])
    cap = ceil_capacity(123, 2, 1)
    assert cap == 68
    labels = balanced_assign(d2, cap, sizes)
    # the walk, large documents first: doc0 -> 0 (28 left), doc1 -> 1 (28 left), doc2 fits
    # nowhere; then doc3, doc4 -> 0 (25 left); doc2 goes to the cluster with most room, 1,
    # although 0 is nearer
    assert labels.tolist() == [0, 1, 1, 0, 0]
    assert over_capacity(labels, sizes, 2, cap) == [1]


def test_sizes_are_validated():
    d2 = np.zeros((3, 2))
    with pytest.raises(ElmError, match="non-negative"):
        balanced_assign(d2, 5, np.array([1, -1, 2]))
    with pytest.raises(ElmError, match="cannot hold"):
        balanced_assign(d2, 2, np.array([3, 1, 1]))


# ----------------------------------------------------------------------------- restarts (n_init)


def weighted_objective(z: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> float:
    """sum over documents of size * |z - the size-weighted mean of its cluster|^2, by a plain loop."""
    total = 0.0
    for c in set(labels.tolist()):
        members = labels == c
        w = sizes[members].astype(float)
        mean = (w[:, None] * z[members]).sum(0) / w.sum()
        total += float((w * ((z[members] - mean) ** 2).sum(1)).sum())
    return total


def test_restarts_keep_the_run_with_the_lowest_objective(monkeypatch):
    """n_init runs Lloyd from n seedings; the result must be the run whose objective is lowest."""
    import elmforest.cbtm.balanced_kmeans as bk

    rng = np.random.default_rng(3)
    z = rng.random((240, 2))  # no blob structure: seedings end in different local optima
    sizes = rng.integers(1, 40, size=240)
    runs: list[np.ndarray] = []
    real = bk._lloyd

    def recording(*args, **kwargs):
        centres, labels = real(*args, **kwargs)
        runs.append(labels.copy())
        return centres, labels

    monkeypatch.setattr(bk, "_lloyd", recording)
    picked_not_first = picked_not_last = False
    for seed in range(6):
        runs.clear()
        _, labels = bk.balanced_kmeans(z, 5, tolerance=0.1, seed=seed, sizes=sizes, n_init=4)
        assert len(runs) == 4
        objectives = [weighted_objective(z, r, sizes) for r in runs]
        best = int(np.argmin(objectives))
        np.testing.assert_array_equal(labels, runs[best])
        assert weighted_objective(z, labels, sizes) == pytest.approx(min(objectives))
        picked_not_first |= objectives[best] < objectives[0] - 1e-9
        picked_not_last |= objectives[best] < objectives[-1] - 1e-9
        # the first restart is exactly the n_init=1 clustering of the same seed
        first = runs[0]
        runs.clear()
        _, single = bk.balanced_kmeans(z, 5, tolerance=0.1, seed=seed, sizes=sizes)
        assert len(runs) == 1
        np.testing.assert_array_equal(single, first)
    assert picked_not_first and picked_not_last  # the choice mattered: neither the first nor the last run


def test_restart_runs_differ_and_n_init_is_checked():
    rng = np.random.default_rng(3)
    z = rng.random((240, 2))
    sizes = rng.integers(1, 40, size=240)
    _, one = balanced_kmeans(z, 5, seed=1, sizes=sizes)
    _, many = balanced_kmeans(z, 5, seed=1, sizes=sizes, n_init=6)
    assert weighted_objective(z, many, sizes) <= weighted_objective(z, one, sizes) + 1e-9
    for bad in (0, -1, 1.5):
        with pytest.raises(ElmError, match="n_init"):
            balanced_kmeans(z, 5, sizes=sizes, n_init=bad)
