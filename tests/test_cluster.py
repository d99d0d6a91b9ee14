"""c-BTM clustering: balanced k-means bound, tf-idf rebuild, routing, save/load, corpus clustering, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import adjusted_rand_score
from typer.testing import CliRunner

from elmforest.cluster import (
    ClusterModel,
    ClusterRouter,
    balanced_assign,
    balanced_kmeans,
    cluster_capacity,
    cluster_corpus,
    cluster_router_weights,
    fit_clusters,
)
from elmforest.commands.cluster import corpus_cluster
from elmforest.corpus import Corpus, DomainSource, write_corpus
from elmforest.errors import ElmError

FRUIT = ("apple banana cherry grape lemon mango melon orange papaya peach pear plum "
         "kiwi lime apricot fig guava lychee nectarine quince").split()
MOTOR = ("engine piston gearbox clutch camshaft crankshaft carburetor radiator exhaust "
         "turbo valve spark cylinder throttle axle brake chassis manifold sprocket torque").split()


def documents(vocab: list[str], n: int, seed: int) -> list[str]:
    """n random documents of 12-24 words drawn from one vocabulary."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=int(rng.integers(12, 25)))) for _ in range(n)]


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


def greedy_reference(d2: np.ndarray, capacity: int) -> np.ndarray:
    """The plain walk over all (doc, cluster) pairs sorted by (distance, flat index)."""
    n, k = d2.shape
    labels = np.full(n, -1)
    sizes = np.zeros(k, dtype=int)
    for flat in np.lexsort((np.arange(n * k), d2.ravel())):
        i, c = divmod(int(flat), k)
        if labels[i] < 0 and sizes[c] < capacity:
            labels[i] = c
            sizes[c] += 1
    return labels


# ----------------------------------------------------------------------------- balanced k-means


def test_capacity_formula():
    assert cluster_capacity(300, 3, 0.1) == 110  # 100 * 1.1, not 111 from float round-off
    assert cluster_capacity(100, 4, 0.0) == 25
    assert cluster_capacity(10, 3, 0.0) == 4
    assert cluster_capacity(301, 3, 0.1) == 111


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
    c1, l1 = balanced_kmeans(z, 4, tolerance=0.05, seed=7)
    c2, l2 = balanced_kmeans(z, 4, tolerance=0.05, seed=7)
    np.testing.assert_array_equal(l1, l2)
    np.testing.assert_array_equal(c1, c2)
    texts = documents(FRUIT, 30, 0) + documents(MOTOR, 30, 1)
    m1, m2 = fit_clusters(texts, 3, seed=5), fit_clusters(texts, 3, seed=5)
    np.testing.assert_array_equal(m1.labels, m2.labels)
    np.testing.assert_array_equal(m1.centres, m2.centres)
    np.testing.assert_array_equal(m1.components, m2.components)


# ----------------------------------------------------------------------------- tf-idf, routing, save/load


def test_tfidf_rebuild_matches_sklearn():
    train = documents(FRUIT, 25, 0) + documents(MOTOR, 25, 1) + ["The APPLE and the apple, and an Engine!"]
    unseen = ["Apple apple APPLE pear zebra", "", "the of and", "Turbo-engine: 3 pistons; piston x"]
    model = fit_clusters(train, 2, svd_dim=5)
    vec = TfidfVectorizer(sublinear_tf=True, stop_words="english", max_features=50000).fit(train)
    assert model.encoder.terms == vec.get_feature_names_out().tolist()
    for texts in (train, unseen):
        ours = model.encoder.encode(texts).toarray()
        np.testing.assert_allclose(ours, vec.transform(texts).toarray(), rtol=0, atol=1e-12)
    # no stop words, capped vocabulary
    capped = fit_clusters(train, 2, svd_dim=5, stop_words=False, max_features=10)
    vec = TfidfVectorizer(sublinear_tf=True, max_features=10).fit(train)
    assert len(capped.encoder.terms) == 10
    np.testing.assert_allclose(capped.encoder.encode(unseen).toarray(), vec.transform(unseen).toarray(), atol=1e-12)


def test_svd_dim_is_capped_below_the_vocabulary():
    model = fit_clusters(documents(["alpha", "beta", "gamma", "delta"], 20, 0), 2, svd_dim=100)
    assert model.components.shape == (3, 4)  # 4 words -> at most 3 SVD dimensions
    z = model.transform(["alpha beta", "delta"])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0)


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


def test_save_load_round_trip_without_pickle(tmp_path):
    texts = documents(FRUIT, 30, 0) + documents(MOTOR, 30, 1)
    model = fit_clusters(texts, 3, svd_dim=8, seed=1)
    model.save(tmp_path / "clusterer")
    files = sorted(p.name for p in (tmp_path / "clusterer").iterdir())
    assert files == ["centres.npy", "clusterer.json", "svd_components.npy"]
    for name in ("centres.npy", "svd_components.npy"):
        np.load(tmp_path / "clusterer" / name, allow_pickle=False)  # plain arrays, no object dtype
    loaded = ClusterModel.load(tmp_path / "clusterer")
    probe = texts[:5] + ["pear engine unknownword", ""]
    np.testing.assert_array_equal(loaded.transform(probe), model.transform(probe))
    np.testing.assert_array_equal(loaded.assign(probe), model.assign(probe))
    assert loaded.k == 3 and loaded.labels is None


def test_load_rejects_bad_files(tmp_path):
    model = fit_clusters(documents(FRUIT, 20, 0) + documents(MOTOR, 20, 1), 2, svd_dim=4)
    folder = tmp_path / "c"
    with pytest.raises(ElmError, match="clusterer.json is missing"):
        ClusterModel.load(folder)
    model.save(folder)
    # an object array needs pickle to load: refused, never unpickled
    np.save(folder / "centres.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ElmError, match="centres.npy"):
        ClusterModel.load(folder)
    np.save(folder / "centres.npy", np.zeros((2, 99)))
    with pytest.raises(ElmError, match="does not match"):
        ClusterModel.load(folder)
    model.save(folder)
    meta = json.loads((folder / "clusterer.json").read_text())
    meta["idf"] = meta["idf"][:-1]
    (folder / "clusterer.json").write_text(json.dumps(meta))
    with pytest.raises(ElmError, match="idf"):
        ClusterModel.load(folder)


def test_bad_k_is_a_user_error():
    texts = documents(FRUIT, 5, 0)
    for k in (0, -1, 6):
        with pytest.raises(ElmError, match="k="):
            fit_clusters(texts, k)
    with pytest.raises(ElmError, match="tolerance"):
        fit_clusters(texts, 2, tolerance=-0.1)
    with pytest.raises(ElmError, match="vocabulary"):
        fit_clusters(["the of and", "a an the"], 1)


# ----------------------------------------------------------------------------- corpora and CLI


@pytest.fixture
def two_domain_corpus(tmp_path):
    write_corpus(tmp_path / "src", [
        DomainSource("fruit", documents(FRUIT, 80, 0), licence="CC0"),
        DomainSource("motor", documents(MOTOR, 80, 1), licence="CC-BY"),
        DomainSource("mixed", documents(FRUIT + MOTOR, 20, 2)),
    ])
    return Corpus(tmp_path / "src")


def test_cluster_corpus_recovers_the_domains(two_domain_corpus, tmp_path):
    out = tmp_path / "clustered"
    summary = cluster_corpus(two_domain_corpus, ["fruit", "motor"], 2, out, svd_dim=10, seed=0)
    assert summary["adjusted_rand_index"] > 0.95
    counts = np.asarray(summary["contingency"]["counts"])
    assert summary["contingency"]["rows"] == ["fruit", "motor"] and counts.shape == (2, 2)
    assert counts.sum() == 160
    assert sorted(counts.max(axis=1).tolist()) == [80, 80]  # each domain lands in one cluster
    n_train = sum(two_domain_corpus.manifest["domains"][d]["splits"]["train"]["documents"] for d in ("fruit", "motor"))
    assert max(summary["sizes"]["train"]) <= summary["capacity"] == cluster_capacity(n_train, 2, 0.1)

    new = Corpus(out)
    assert new.domains == ["cluster0", "cluster1"]
    total = sum(len(list(new.texts(d, s))) for d in new.domains for s in ("train", "valid", "test"))
    assert total == 160
    for c, d in enumerate(new.domains):  # splits are by document hash, so train stays train
        assert len(list(new.texts(d, "train"))) == summary["sizes"]["train"][c]
    assert new.manifest["clustering"]["adjusted_rand_index"] == summary["adjusted_rand_index"]
    assert new.manifest["domains"]["cluster0"]["licence"] == "CC-BY; CC0"
    assert json.loads((out / "cluster.json").read_text()) == summary
    loaded = ClusterModel.load(out / "clusterer")
    fruit_cluster = int(np.argmax(counts[0]))
    assert loaded.assign(documents(FRUIT, 3, 9)).tolist() == [fruit_cluster] * 3
    assert not list(tmp_path.glob(".*.tmp"))  # no leftovers of the atomic build

    with pytest.raises(ElmError, match="already exists"):
        cluster_corpus(two_domain_corpus, None, 2, out)


def test_cluster_corpus_user_errors(two_domain_corpus, tmp_path):
    out = tmp_path / "bad"
    for k in (0, 10_000):
        with pytest.raises(ElmError, match="k="):
            cluster_corpus(two_domain_corpus, None, k, out)
    with pytest.raises(ElmError, match="nope"):
        cluster_corpus(two_domain_corpus, ["fruit", "nope"], 2, out)
    assert not out.exists()
    (out / "x").mkdir(parents=True)
    with pytest.raises(ElmError, match="not empty"):
        cluster_corpus(two_domain_corpus, None, 2, out)


def test_cli_command_prints_table_and_ari(two_domain_corpus, tmp_path):
    app = typer.Typer()
    app.command("cluster")(corpus_cluster)

    @app.callback()
    def _group() -> None:
        """Stand-in for the `elmforest corpus` group."""

    runner = CliRunner()
    out = tmp_path / "cli_out"
    args = ["cluster", str(two_domain_corpus.path), "--k", "2", "--out", str(out),
            "--domains", "fruit,motor", "--svd-dim", "10", "--seed", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "adjusted Rand index vs source domains: 1.0000" in result.output
    assert "cluster1" in result.output and "fruit" in result.output
    assert Corpus(out).domains == ["cluster0", "cluster1"]
    assert "--tolerance" in runner.invoke(app, ["cluster", "--help"]).output


def test_cli_wiring_under_corpus(two_domain_corpus, tmp_path, capsys):
    from elmforest import cli
    from elmforest.commands import corpus as corpus_commands

    assert hasattr(corpus_commands, "corpus_app"), "elmforest.commands.corpus does not define corpus_app yet"
    with pytest.raises(SystemExit) as exc:
        cli.main(["corpus", "cluster", str(two_domain_corpus.path), "--k", "0", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "k=0" in capsys.readouterr().err


def test_carried_domains_keep_their_own_documents(two_domain_corpus, tmp_path):
    # Cluster nothing but one domain and carry both: each carried domain must hold its own text.
    out = tmp_path / "carried"
    cluster_corpus(two_domain_corpus, ["fruit"], 2, out, svd_dim=5, seed=0, carry=["motor"])
    new = Corpus(out)
    for d in ("motor",):
        for split in ("train", "valid", "test"):
            assert sorted(new.texts(d, split)) == sorted(two_domain_corpus.texts(d, split))
    out2 = tmp_path / "carried2"
    cluster_corpus(two_domain_corpus, ["fruit", "motor"], 2, out2, svd_dim=5, seed=0)
    three = tmp_path / "three"
    write_corpus(three, [DomainSource(n, list(Corpus(out2).texts("cluster0", "train")) if n == "a" else
                                      list(Corpus(out2).texts("cluster1", "train")), source="t")
                         for n in ("a", "b")] +
                 [DomainSource(n, list(two_domain_corpus.texts(n, "train")), source="t") for n in ("fruit", "motor")])
    out3 = tmp_path / "carried3"
    cluster_corpus(Corpus(three), ["a", "b"], 2, out3, svd_dim=5, seed=0, carry=["fruit", "motor"])
    for d in ("fruit", "motor"):
        got = sorted(t for s in ("train", "valid", "test") for t in Corpus(out3).texts(d, s))
        assert got == sorted(two_domain_corpus.texts(d, "train"))
