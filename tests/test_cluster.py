"""c-BTM clustering: tf-idf rebuild, save/load, corpus clustering balanced by tokens or documents, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import typer
from sklearn.feature_extraction.text import TfidfVectorizer
from typer.testing import CliRunner

from cli_runner import run_cli
from elmforest.cbtm.cluster import ClusterModel, cluster_corpus, document_sizes, fit_clusters
from elmforest.cli.cluster import corpus_cluster
from elmforest.data.corpus import Corpus, DomainSource, write_corpus
from elmforest.errors import ElmError

FRUIT = ("apple banana cherry grape lemon mango melon orange papaya peach pear plum "
         "kiwi lime apricot fig guava lychee nectarine quince").split()
MOTOR = ("engine piston gearbox clutch camshaft crankshaft carburetor radiator exhaust "
         "turbo valve spark cylinder throttle axle brake chassis manifold sprocket torque").split()


def documents(vocab: list[str], n: int, seed: int) -> list[str]:
    """n random documents of 12-24 words drawn from one vocabulary."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=int(rng.integers(12, 25)))) for _ in range(n)]


# ----------------------------------------------------------------------------- tf-idf, save/load


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
    # motor's words are longer (6.9 letters against fruit's 5.3): ~56% of the bytes, so a slack of
    # 20% lets each domain fit in one cluster
    summary = cluster_corpus(two_domain_corpus, ["fruit", "motor"], 2, out, svd_dim=10, seed=0, tolerance=0.2)
    assert summary["adjusted_rand_index"] > 0.95
    counts = np.asarray(summary["contingency"]["counts"])
    assert summary["contingency"]["rows"] == ["fruit", "motor"] and counts.shape == (2, 2)
    assert counts.sum() == 160
    assert sorted(counts.max(axis=1).tolist()) == [80, 80]  # each domain lands in one cluster
    # balanced by tokens (UTF-8 bytes without a tokenizer): ceil(bytes / 2 * 1.2) each
    size = sum(len(t.encode("utf-8")) for d in ("fruit", "motor") for t in two_domain_corpus.texts(d, "train"))
    assert summary["balance"] == "tokens" and summary["size_unit"] == "UTF-8 bytes"
    assert summary["capacity"] == -(-size * 12 // 20) and sum(summary["train_size"]) == size
    assert max(summary["train_size"]) <= summary["capacity"] and summary["over_capacity"] == []

    new = Corpus(out)
    assert new.domains == ["cluster0", "cluster1"]
    total = sum(len(list(new.texts(d, s))) for d in new.domains for s in ("train", "valid", "test"))
    assert total == 160
    for c, d in enumerate(new.domains):  # splits are by document hash, so train stays train
        assert len(list(new.texts(d, "train"))) == summary["sizes"]["train"][c]
        assert sum(len(t.encode("utf-8")) for t in new.texts(d, "train")) == summary["train_size"][c]
    assert new.manifest["clustering"]["adjusted_rand_index"] == summary["adjusted_rand_index"]
    assert new.manifest["domains"]["cluster0"]["licence"] == "CC-BY; CC0"
    assert json.loads((out / "cluster.json").read_text()) == summary
    loaded = ClusterModel.load(out / "clusterer")
    fruit_cluster = int(np.argmax(counts[0]))
    assert loaded.assign(documents(FRUIT, 3, 9)).tolist() == [fruit_cluster] * 3
    assert not list(tmp_path.glob(".*.tmp"))  # no leftovers of the atomic build

    with pytest.raises(ElmError, match="already exists"):
        cluster_corpus(two_domain_corpus, None, 2, out)


def test_n_init_reaches_the_k_means_and_cluster_json(two_domain_corpus, tmp_path, monkeypatch):
    import elmforest.cbtm.cluster as cluster

    seen = []
    real = cluster.balanced_kmeans

    def spy(*args, **kwargs):
        seen.append(kwargs["n_init"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cluster, "balanced_kmeans", spy)
    summary = cluster_corpus(two_domain_corpus, ["fruit", "motor"], 2, tmp_path / "o", svd_dim=10, tolerance=0.2,
                             n_init=3)
    assert seen == [3] and summary["n_init"] == 3
    fit_clusters(documents(FRUIT, 10, 0) + documents(MOTOR, 10, 1), 2, svd_dim=5)
    assert seen == [3, 1]  # the default: one k-means++ seeding


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
            "--domains", "fruit,motor", "--svd-dim", "10", "--seed", "0", "--tolerance", "0.2"]  # motor: ~56% of the bytes
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "adjusted Rand index vs source domains: 1.0000" in result.output
    assert "cluster1" in result.output and "fruit" in result.output
    assert Corpus(out).domains == ["cluster0", "cluster1"]
    assert "--tolerance" in runner.invoke(app, ["cluster", "--help"]).output


def test_cli_wiring_under_corpus(two_domain_corpus, tmp_path, capsys):
    from elmforest import cli
    from elmforest.cli import corpus as corpus_commands

    assert hasattr(corpus_commands, "corpus_app"), "elmforest.cli.corpus does not define corpus_app yet"
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


# ----------------------------------------------------------------------------- balancing tokens vs documents


@pytest.fixture
def huge_and_tiny_corpus(tmp_path):
    """fruit: 10 documents of 220-280 words; motor: 320 documents of 6-8 (longer) words: about as many bytes."""
    rng = np.random.default_rng(0)
    fruit = [" ".join(rng.choice(FRUIT, size=int(rng.integers(220, 281)))) for _ in range(10)]
    motor = [" ".join(rng.choice(MOTOR, size=int(rng.integers(6, 9)))) for _ in range(320)]
    write_corpus(tmp_path / "src", [DomainSource("fruit", fruit), DomainSource("motor", motor)])
    return Corpus(tmp_path / "src")


def test_token_balancing_finds_the_domains_that_document_balancing_splits(huge_and_tiny_corpus, tmp_path, capsys):
    corpus = huge_and_tiny_corpus
    train = {d: list(corpus.texts(d, "train")) for d in ("fruit", "motor")}
    nbytes = {d: sum(len(t.encode("utf-8")) for t in train[d]) for d in train}  # the default size: bytes
    n_docs = len(train["fruit"]) + len(train["motor"])
    byte_cap = -(-(nbytes["fruit"] + nbytes["motor"]) * 11 // 20)  # ceil(bytes / 2 * 1.1)
    doc_cap = -(-n_docs * 11 // 20)
    assert max(nbytes.values()) <= byte_cap and len(train["motor"]) > doc_cap  # so the outcomes differ

    by_tokens, by_docs = tmp_path / "by_tokens", tmp_path / "by_docs"
    code, out_t, err = run_cli(["corpus", "cluster", corpus.path, "--k", 2, "--out", by_tokens, "--svd-dim", 10], capsys)
    assert code == 0, err
    code, out_d, err = run_cli(["corpus", "cluster", corpus.path, "--k", 2, "--out", by_docs, "--svd-dim", 10,
                                "--balance", "documents"], capsys)
    assert code == 0, err

    # tokens: every cluster's train bytes (counted here from the written corpus) within the bound,
    # and each source domain whole in one cluster
    new = Corpus(by_tokens)
    cluster_bytes = [sum(len(t.encode("utf-8")) for t in new.texts(c, "train")) for c in new.domains]
    assert max(cluster_bytes) <= byte_cap
    summary = json.loads((by_tokens / "cluster.json").read_text())
    assert summary["capacity"] == byte_cap and summary["train_size"] == cluster_bytes
    assert sorted(max(row) / sum(row) for row in summary["contingency"]["counts"]) == [1.0, 1.0]
    assert summary["adjusted_rand_index"] == 1.0
    assert "balanced by UTF-8 bytes" in out_t and "adjusted Rand index vs source domains: 1.0000" in out_t

    # documents: every cluster within ceil(n/2 * 1.1) train documents, so motor must be split
    new = Corpus(by_docs)
    cluster_docs = [len(list(new.texts(c, "train"))) for c in new.domains]
    assert max(cluster_docs) <= doc_cap
    summary_d = json.loads((by_docs / "cluster.json").read_text())
    assert summary_d["balance"] == "documents" and summary_d["capacity"] == doc_cap
    motor_row = summary_d["contingency"]["counts"][1]
    assert min(motor_row) > 0  # motor in both clusters
    assert summary_d["adjusted_rand_index"] < 0.5
    assert summary_d["contingency"]["counts"] != summary["contingency"]["counts"]
    assert "balanced by documents" in out_d


def test_tokenizer_sizes_are_its_token_counts(two_domain_corpus, tmp_path):
    from elmforest.data.tokenizer import load_tokenizer, train_tokenizer

    tok_dir = train_tokenizer(two_domain_corpus, ["fruit", "motor"], 300, tmp_path / "tok")
    out = tmp_path / "clustered"
    summary = cluster_corpus(two_domain_corpus, ["fruit", "motor"], 2, out, svd_dim=10, seed=0, tokenizer=tok_dir)
    tok = load_tokenizer(tok_dir)
    new = Corpus(out)
    tokens = [sum(len(tok.encode(t, add_special_tokens=False)) for t in new.texts(c, "train")) for c in new.domains]
    size = [sum(len(t.encode("utf-8")) for t in new.texts(c, "train")) for c in new.domains]
    assert summary["size_unit"] == "tokens" and summary["tokenizer"] == str(tok_dir)
    assert summary["train_size"] == tokens != size  # BPE tokens, not the default's bytes
    assert summary["capacity"] == -(-sum(tokens) * 11 // 20) >= max(tokens)
    texts = ["apple banana", "engine piston turbo", "kiwi"]
    np.testing.assert_array_equal(document_sizes(texts, tok_dir), [len(tok.encode(t, add_special_tokens=False)) for t in texts])
    np.testing.assert_array_equal(document_sizes(texts), [12, 19, 4])  # UTF-8 bytes by default


def test_balance_options_are_checked(two_domain_corpus, tmp_path, capsys):
    code, _, err = run_cli(["corpus", "cluster", two_domain_corpus.path, "--k", 2, "--out", tmp_path / "o",
                            "--balance", "bytes"], capsys)
    assert code == 2 and "--balance" in err and "bytes" in err
    code, _, err = run_cli(["corpus", "cluster", two_domain_corpus.path, "--k", 2, "--out", tmp_path / "o",
                            "--balance", "documents", "--tokenizer", tmp_path], capsys)
    assert code == 2 and "balance='tokens'" in err
    code, _, err = run_cli(["corpus", "cluster", two_domain_corpus.path, "--k", 2, "--out", tmp_path / "o",
                            "--tokenizer", tmp_path / "nothing"], capsys)
    assert code == 2 and str(tmp_path / "nothing") in err
    assert not (tmp_path / "o").exists()
