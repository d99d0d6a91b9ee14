"""Balanced k-means: Lloyd iterations whose assignment step respects a size bound per cluster.

c-BTM (Gururangan et al. 2023) trains one expert per cluster with the same compute each, so a
cluster should hold about 1/k of the training *tokens*. Every document has a size (its tokens,
or 1 to balance documents); with T the total size, every cluster holds at most

    capacity C = ceil(T/k * (1 + tolerance))

and each document goes to the nearest cluster that still has room for it (`balanced_assign`).
The one exception is a document larger than C itself, which fits nowhere: it is placed alone in
a cluster of its own (see `balanced_assign`).
"""

from __future__ import annotations

import math

import numpy as np

from elmforest.errors import require


def squared_distances(z: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances: |z|^2 + |c|^2 - 2 z.c, clipped at 0 against round-off."""
    d2 = (z * z).sum(1)[:, None] + (centres * centres).sum(1)[None, :] - 2.0 * z @ centres.T
    return np.maximum(d2, 0.0)


def kmeans_plus_plus(z: np.ndarray, k: int, rng: np.random.Generator, weights: np.ndarray | None = None) -> np.ndarray:
    """k-means++ seeding: first centre drawn ~ weight, each next one ~ weight * D(x)^2.

    weights: [n] (a document's tokens), None for 1 each (plain k-means++: first centre uniform).
    """
    n = z.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.sum() <= 0:
        w = np.ones(n)
    chosen = [int(rng.choice(n, p=w / w.sum())) if weights is not None else int(rng.integers(n))]
    d2 = squared_distances(z, z[chosen]).ravel()  # [n] distance to the nearest chosen centre
    for _ in range(1, k):
        total = (w * d2).sum()
        # All remaining points coincide with a centre (duplicates): any point will do.
        p = w * d2 / total if total > 0 else np.full(n, 1.0 / n)
        i = int(rng.choice(n, p=p))
        chosen.append(i)
        d2 = np.minimum(d2, squared_distances(z, z[i : i + 1]).ravel())
    return z[chosen].copy()


def cluster_capacity(total: int, k: int, tolerance: float) -> int:
    """The size bound of balanced k-means: ceil(total/k * (1 + tolerance)); always >= total/k.

    `total` is the summed size of the documents: their number when balancing documents, their
    tokens when balancing tokens.
    """
    return math.ceil(total / k * (1.0 + tolerance) - 1e-9)  # -1e-9: 100/4*1.0 must stay 25, not 26


def _walk(d2: np.ndarray, sizes: np.ndarray, todo: np.ndarray, labels: np.ndarray, room: np.ndarray) -> np.ndarray:
    """The greedy walk for documents `todo`; fills `labels`, lowers `room`; returns those that fit nowhere.

    Reference algorithm: sort all (document, cluster) pairs of `todo` by (distance, doc*k +
    cluster); walk them in order and accept a pair when its document is still unplaced and the
    cluster's room is at least the document's size. Done here in vectorised rounds: every
    unplaced document proposes its nearest cluster with room for it; the proposals are accepted
    in greedy order up to the first one that no longer fits (its cluster took earlier proposals
    of this round); the rest propose again. This reproduces the walk: a pair skipped by a
    proposal went to a cluster without room, and rooms only shrink, so the walk rejects it too;
    and the re-proposal of a cut document is never before the cut in greedy order. Each round
    accepts at least its first proposal. A document with no room anywhere can never fit later
    (rooms only shrink) and is returned.
    """
    n, k = d2.shape
    stuck = []
    while todo.size:
        s = sizes[todo]  # [m]
        dist = np.where(s[:, None] <= room[None, :], d2[todo], np.inf)  # [m, k]; no room: unreachable
        nearest = dist.argmin(1)  # lowest cluster index among ties, as in the flat sort
        best = dist[np.arange(todo.size), nearest]
        nowhere = ~np.isfinite(best)
        if nowhere.any():
            stuck.extend(todo[nowhere].tolist())
            todo, s, nearest, best = todo[~nowhere], s[~nowhere], nearest[~nowhere], best[~nowhere]
            if not todo.size:
                break
        order = np.lexsort((todo * k + nearest, best))  # greedy order of the proposals
        c_ord, s_ord = nearest[order], s[order]
        # Running load of each cluster over its proposals in greedy order: group the proposals
        # by cluster (stable, so greedy order within a group), cumulative sum within the group.
        grouped = np.argsort(c_ord, kind="stable")  # positions in `order`, grouped by cluster
        counts = np.bincount(c_ord, minlength=k)
        starts = np.cumsum(counts) - counts  # first slot of each cluster's group in `grouped`
        csum = np.cumsum(s_ord[grouped])
        c_grp = c_ord[grouped]
        first = starts[c_grp]
        running = csum - csum[first] + s_ord[grouped][first]  # load taken within the group so far
        over = running > room[c_grp]
        stop = int(grouped[over].min()) if over.any() else todo.size  # first proposal that overflows
        take = order[:stop]
        labels[todo[take]] = nearest[take]
        room -= np.bincount(nearest[take], weights=s[take], minlength=k).astype(room.dtype)
        todo = np.delete(todo, take)
    return np.asarray(stuck, dtype=np.int64)


def balanced_assign(d2: np.ndarray, capacity: int, sizes: np.ndarray | None = None) -> np.ndarray:
    """Capacity-constrained assignment of n documents to k clusters: each cluster's summed size <= capacity.

    d2: [n, k] squared distances; sizes: [n] non-negative integers (None: every document 1, so
    `capacity` counts documents); returns labels [n]. With T = sizes.sum() and the slack
    S = k * capacity - T >= 0:

    1. A document larger than `capacity` fits nowhere. Each such document is placed *alone* in
       the nearest cluster not yet taken by another one (greedy by distance); that cluster then
       holds only it. There are at most k - 1 of them (k would exceed k * capacity >= T), and
       they only add slack for the others (each takes a whole cluster and more than C tokens).
    2. The other documents are walked greedily by distance (`_walk`): each goes to its nearest
       cluster with room for it. A document of size s <= S'/(k'-1) (k' open clusters, S' their
       slack) always finds room: if every open cluster had room < s, the open clusters would
       hold more than k' * capacity - k' * s >= T' - s tokens, more than all the others. So
       the walk first places the *large* documents (size above that bound, usually none), then
       the rest, which then cannot fail.
    3. A large document that still fits nowhere (a packing that is truly impossible, e.g. three
       documents of 0.4 T into two clusters) goes to the open cluster with the most room left,
       which then exceeds `capacity` by less than that document's size. Together with 1. this
       is the only way a cluster's size can exceed `capacity`; `over_capacity` finds them.
    4. Any empty cluster takes its nearest document from a cluster holding more than one
       (a document of size <= capacity, so the bound still holds); with n >= k none stays empty.
    """
    n, k = d2.shape
    sizes = np.ones(n, dtype=np.int64) if sizes is None else np.asarray(sizes, dtype=np.int64)
    require(sizes.shape == (n,) and (sizes >= 0).all(), f"sizes must be {n} non-negative integers")
    total = int(sizes.sum())
    require(capacity * k >= total, f"capacity {capacity} x {k} clusters cannot hold {total} (documents or tokens)")
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)  # free size per cluster

    # 1. oversize documents, one per cluster; a taken cluster is closed (room -1 fits nothing)
    oversize = np.flatnonzero(sizes > capacity)
    for flat in np.lexsort(((oversize[:, None] * k + np.arange(k)).ravel(), d2[oversize].ravel())):
        i, c = int(oversize[flat // k]), int(flat % k)
        if labels[i] < 0 and room[c] == capacity:
            labels[i], room[c] = c, -1
    open_ = room >= 0

    # 2. large documents first, then the rest; both by the greedy walk
    rest = np.flatnonzero(labels < 0)
    k_open, slack = int(open_.sum()), int(room[open_].sum()) - int(sizes[rest].sum())
    bound = slack / (k_open - 1) if k_open > 1 else math.inf  # sizes up to this always fit
    large = sizes[rest] > bound
    stuck = _walk(d2, sizes, rest[large], labels, room)
    stuck = np.concatenate([stuck, _walk(d2, sizes, rest[~large], labels, room)])  # the second is always empty

    # 3. what fits nowhere: the open cluster with the most room (then the nearest)
    for i in stuck:
        c = int(np.lexsort((d2[i], np.where(open_, -room.astype(np.float64), np.inf)))[0])
        labels[i] = c
        room[c] -= sizes[i]

    # 4. no empty cluster
    counts = np.bincount(labels, minlength=k)
    for c in np.flatnonzero(counts == 0):
        donors = (counts[labels] > 1) & (sizes <= capacity)  # documents whose cluster can spare one
        i = int(np.flatnonzero(donors)[d2[donors, c].argmin()])
        counts[labels[i]] -= 1
        labels[i] = c
        counts[c] = 1
    return labels


def over_capacity(labels: np.ndarray, sizes: np.ndarray, k: int, capacity: int) -> list[int]:
    """The clusters whose summed size exceeds `capacity` (see `balanced_assign` for when)."""
    load = np.bincount(labels, weights=np.asarray(sizes, dtype=np.float64), minlength=k)
    return [int(c) for c in np.flatnonzero(load > capacity)]


def balanced_objective(z: np.ndarray, centres: np.ndarray, labels: np.ndarray, sizes: np.ndarray | None = None) -> float:
    """What balanced k-means lowers: sum over documents of size * |z - its centre|^2 (size 1 each if None)."""
    d2 = ((z - centres[labels]) ** 2).sum(1)
    w = np.ones(z.shape[0]) if sizes is None else np.maximum(np.asarray(sizes, dtype=np.float64), 1e-9)
    return float((w * d2).sum())


def _lloyd(z: np.ndarray, centres: np.ndarray, capacity: int, sizes: np.ndarray | None, w: np.ndarray,
           max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced Lloyd iterations from the given centres -> (centres, labels)."""
    k = centres.shape[0]
    labels = np.full(z.shape[0], -1, dtype=np.int64)
    for _ in range(max_iter):
        new = balanced_assign(squared_distances(z, centres), capacity, sizes)
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, w[:, None] * z)
        centres = sums / np.bincount(labels, weights=w, minlength=k)[:, None]  # no cluster is empty
    return centres, labels


def balanced_kmeans(
    z: np.ndarray,
    k: int,
    tolerance: float = 0.1,
    seed: int = 0,
    max_iter: int = 50,
    sizes: np.ndarray | None = None,
    n_init: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations with the capacity-constrained assignment of `balanced_assign`.

    z: [n, d]; sizes: [n] document sizes (tokens), None to balance documents. k-means++ seeding
    from `seed`, then: assign (every cluster's summed size <= ceil(T/k * (1+tolerance)), none
    empty), move each centre to the mean of its documents' vectors, until the assignment stops
    changing or `max_iter` rounds. With sizes, seeding and means weigh each document by its
    size: the objective is sum over tokens of |z_doc - centre|^2 (`balanced_objective`), so a
    few long documents are not outvoted by many short ones (with plain means and seeding, 87%
    short tweets draw most centres to tweets). `n_init` runs from that many k-means++ seedings
    (successive draws of one generator seeded with `seed`, so n_init=1 is the first of them)
    and keeps the run with the lowest objective (the earliest on a tie). Deterministic for a
    given seed. Returns (centres [k, d], labels [n]).
    """
    n = z.shape[0]
    require(1 <= k <= n, f"k={k} must be between 1 and the number of documents ({n})")
    require(tolerance >= 0, f"tolerance={tolerance} must be >= 0")
    require(isinstance(n_init, (int, np.integer)) and n_init >= 1, f"n_init={n_init} must be an integer >= 1")
    total = n if sizes is None else int(np.asarray(sizes).sum())
    capacity = cluster_capacity(total, k, tolerance)
    # Balancing tokens, every token counts: seeding and centre means weigh a document by its
    # size (a centre is the mean over its cluster's tokens). A size-0 document still counts a
    # little (weight 1e-9 of a token), so a cluster of only such documents has a centre.
    w = np.ones(n) if sizes is None else np.maximum(np.asarray(sizes, dtype=np.float64), 1e-9)
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(n_init):
        centres, labels = _lloyd(z, kmeans_plus_plus(z, k, rng, None if sizes is None else w), capacity, sizes,
                                 w, max_iter)
        objective = balanced_objective(z, centres, labels, sizes)
        if best is None or objective < best[0]:
            best = (objective, centres, labels)
    return best[1], best[2]
