"""c-BTM routing: softmax(-d^2 / T) over the cluster centres, temperature limits, top-k, the cached router."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from elmforest.cbtm.cluster import fit_clusters
from elmforest.cbtm.cluster_router import ClusterRouter, cluster_router_weights, routing_weights
from elmforest.errors import ElmError
from test_cluster import FRUIT, MOTOR, documents


def by_hand(d2_row: list[float], temperature: float, top_k: int | None = None) -> list[float]:
    """softmax(-d2 / T) of one row with math.exp, then keep the top_k largest and renormalise."""
    e = [math.exp(-(d - min(d2_row)) / temperature) for d in d2_row]
    if top_k is not None:
        keep = sorted(range(len(e)), key=lambda j: (-e[j], j))[:top_k]
        e = [v if j in keep else 0.0 for j, v in enumerate(e)]
    return [v / sum(e) for v in e]


@pytest.fixture(scope="module")
def model():
    return fit_clusters(documents(FRUIT, 30, 0) + documents(MOTOR, 30, 1) + documents(FRUIT + MOTOR, 30, 2),
                        3, svd_dim=8, seed=0)


def test_weights_match_the_formula_computed_by_hand(model):
    texts = documents(FRUIT, 3, 20) + documents(MOTOR, 2, 21) + documents(FRUIT + MOTOR, 2, 22)
    z = model.transform(texts)
    d2 = [[float(((zi - c) ** 2).sum()) for c in model.centres] for zi in z]  # [n, k] by hand
    for t in (0.1, 0.5, 2.0):
        got = cluster_router_weights(model, texts, temperature=t)
        np.testing.assert_allclose(got, [by_hand(row, t) for row in d2], rtol=1e-9, atol=1e-12)
        for top_k in (1, 2):
            got = cluster_router_weights(model, texts, temperature=t, top_k=top_k)
            np.testing.assert_allclose(got, [by_hand(row, t, top_k) for row in d2], rtol=1e-9, atol=1e-12)
            assert ((got > 0).sum(1) == top_k).all()


def test_temperature_limits():
    d2 = np.array([[0.30, 0.10, 0.70, 0.20], [1.9, 2.0, 0.4, 3.1]])
    cold = routing_weights(d2, temperature=1e-6)
    np.testing.assert_array_equal(cold, [[0, 1, 0, 0], [0, 0, 1, 0]])  # all on the nearest centre
    hot = routing_weights(d2, temperature=1e6)
    np.testing.assert_allclose(hot, 0.25, atol=1e-6)  # near uniform
    warm = routing_weights(d2, temperature=0.1)  # c-BTM's default
    np.testing.assert_allclose(warm, [by_hand(list(r), 0.1) for r in d2], rtol=1e-12)
    assert 0.25 < warm[0].max() < 1.0 and warm[0].argmax() == 1


def test_top_k_zeroes_all_but_k_and_renormalises():
    d2 = np.array([[0.30, 0.10, 0.70, 0.20]])
    w = routing_weights(d2, temperature=0.5, top_k=2)
    # by hand: exp(-d/0.5) for the two nearest centres (1 and 3), renormalised
    a, b = math.exp(-0.10 / 0.5), math.exp(-0.20 / 0.5)
    np.testing.assert_allclose(w, [[0.0, a / (a + b), 0.0, b / (a + b)]], rtol=1e-12)
    np.testing.assert_allclose(routing_weights(d2, 0.5, top_k=4), routing_weights(d2, 0.5))  # k = all: no-op
    np.testing.assert_array_equal(routing_weights(d2, 0.5, top_k=1), [[0, 1, 0, 0]])
    ties = routing_weights(np.array([[0.2, 0.1, 0.1, 0.1]]), 1.0, top_k=2)
    np.testing.assert_allclose(ties, [[0, 0.5, 0.5, 0]])  # ties go to the lower cluster index
    for bad in (0, 5):
        with pytest.raises(ElmError, match="top_k"):
            routing_weights(d2, 0.5, top_k=bad)
    with pytest.raises(ElmError, match="temperature"):
        routing_weights(d2, 0.0)


def test_router_prefers_the_cluster_of_the_vocabulary():
    fruit, motor = documents(FRUIT, 40, 0), documents(MOTOR, 40, 1)
    model = fit_clusters(fruit + motor, 2, svd_dim=10, seed=0)
    fruit_cluster = np.bincount(model.labels[:40], minlength=2).argmax()
    assert adjusted_rand_score([0] * 40 + [1] * 40, model.labels) == 1.0
    new_fruit, new_motor = documents(FRUIT, 5, 10), documents(MOTOR, 5, 11)
    w = cluster_router_weights(model, new_fruit + new_motor, temperature=0.1)
    assert w.shape == (10, 2)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert (w[:5, fruit_cluster] > 0.9).all() and (w[5:, 1 - fruit_cluster] > 0.9).all()
    np.testing.assert_array_equal(model.assign(new_fruit), [fruit_cluster] * 5)
    # a flat temperature gives nearly uniform weights
    np.testing.assert_allclose(cluster_router_weights(model, new_fruit, temperature=1e6), 0.5, atol=1e-5)

    router = ClusterRouter(model, temperature=0.1, cache_size=2)
    a = router.weights_for(new_fruit[0])
    assert router.weights_for(new_fruit[0]) is a and router.computed == 1  # cached, not recomputed
    np.testing.assert_allclose(a, w[0])
    assert a.argmax() == fruit_cluster
    router.weights_for(new_motor[0])
    router.weights_for(new_motor[1])  # evicts new_fruit[0] (least recently used)
    router.weights_for(new_fruit[0])
    assert router.computed == 4
    with pytest.raises(ElmError):
        cluster_router_weights(model, new_fruit, temperature=0.0)


def test_router_top_k_and_temperature_are_applied_and_cached(model):
    text = documents(FRUIT + MOTOR, 1, 30)[0]
    router = ClusterRouter(model, temperature=0.5, top_k=2)
    w = router.weights_for(text)
    np.testing.assert_allclose(w, cluster_router_weights(model, [text], 0.5, top_k=2)[0])
    assert (w > 0).sum() == 2 and router.weights_for(text) is w and router.computed == 1
    with pytest.raises(ElmError, match="top_k"):
        ClusterRouter(model, top_k=4)
