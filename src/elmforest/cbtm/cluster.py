"""c-BTM: discover domains without labels, one cluster of documents per expert.

c-BTM (Gururangan et al. 2023) replaces metadata domains by clusters of documents:

    text --tf-idf--> sparse [n, V] --SVD--> [n, svd_dim] --L2 normalise--> z   (unit vectors)
    z --balanced k-means--> k centres; every cluster holds at most ceil(T/k * (1+tolerance))
                            tokens (T: all tokens), or documents with balance="documents"

Each cluster becomes a domain and gets its own expert. At inference a context is routed by its
squared distance to the centres (`elmforest.cbtm.cluster_router`). The pieces: `elmforest.cbtm.tfidf`
(the encoder), `elmforest.cbtm.balanced_kmeans` (the size-bounded assignment), this module (the
fitted `ClusterModel`, document sizes, clustering a corpus into a new one).

Nothing here is pickled: a fitted `ClusterModel` is saved as JSON (vocabulary, idf, settings)
plus `.npy` arrays (SVD components, centres) read with `allow_pickle=False`, and the tf-idf
transform is rebuilt by hand with scikit-learn's exact settings, so an untrusted clusterer
folder can be opened safely.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from elmforest import storage
from elmforest.cbtm.balanced_kmeans import balanced_kmeans, cluster_capacity, over_capacity, squared_distances
from elmforest.data.corpus import SPLITS, Corpus, DomainSource, MANIFEST, write_corpus
from elmforest.errors import ElmError, require
from elmforest.cbtm.tfidf import TfidfEncoder, fit_tfidf

CLUSTERER_FORMAT = "elmforest-clusterer/1"
CLUSTERER_JSON = "clusterer.json"
COMPONENTS_NPY = "svd_components.npy"
CENTRES_NPY = "centres.npy"
CLUSTER_JSON = "cluster.json"
BALANCES = ("tokens", "documents")
N_INIT = 1  # k-means++ seedings per clustering, the lowest objective kept (README, "Domains without labels")
BYTES = "UTF-8 bytes"  # the token proxy without a tokenizer (see `document_sizes`)


# ----------------------------------------------------------------------------- the model


@dataclass
class ClusterModel:
    """A fitted clusterer: tf-idf encoder, SVD components [d, V], centres [k, d].

    `labels` is the balanced assignment of the texts it was fitted on (None after `load`).
    """

    encoder: TfidfEncoder
    components: np.ndarray
    centres: np.ndarray
    labels: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.centres.shape[0])

    def project(self, x: sp.csr_matrix) -> np.ndarray:
        """tf-idf rows [n, V] -> unit vectors [n, d] (zero rows stay zero)."""
        z = np.asarray(x @ self.components.T)  # [n, d]
        norms = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.where(norms > 0, norms, 1.0)

    def transform(self, texts: list[str]) -> np.ndarray:
        """[n, d] L2-normalised SVD vectors of the texts."""
        return self.project(self.encoder.encode(list(texts)))

    def assign(self, texts: list[str]) -> np.ndarray:
        """[n] index of the nearest centre (no capacity limit: this is the routing rule)."""
        return squared_distances(self.transform(texts), self.centres).argmin(1)

    def save(self, folder: str | Path) -> None:
        """Write `clusterer.json` (settings, vocabulary, idf) and two `.npy` arrays; no pickle."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, arr in ((COMPONENTS_NPY, self.components), (CENTRES_NPY, self.centres)):
            with storage.atomic_path(folder / name) as tmp, open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(arr, dtype=np.float64), allow_pickle=False)
        storage.write_json(
            folder / CLUSTERER_JSON,
            {
                "format": CLUSTERER_FORMAT,
                "k": self.k,
                "svd_dim": int(self.components.shape[0]),
                "tfidf": {
                    "lowercase": True,
                    "sublinear_tf": True,
                    "norm": "l2",
                    "token_pattern": self.encoder.token_pattern,
                    "stop_words": sorted(self.encoder.stop_words),
                },
                "terms": self.encoder.terms,
                "idf": [float(v) for v in self.encoder.idf],  # repr floats round-trip exactly
            },
        )

    @classmethod
    def load(cls, folder: str | Path) -> ClusterModel:
        """Open a folder written by `save`, validating every field and shape."""
        folder = Path(folder)
        meta_path = folder / CLUSTERER_JSON
        if not meta_path.is_file():
            raise ElmError("not a clusterer folder: clusterer.json is missing", folder)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise ElmError("not valid JSON", meta_path) from None
        require(isinstance(meta, dict) and meta.get("format") == CLUSTERER_FORMAT,
                f"field 'format' must be {CLUSTERER_FORMAT!r}", meta_path)
        terms, idf, tfidf = meta.get("terms"), meta.get("idf"), meta.get("tfidf")
        require(isinstance(terms, list) and all(isinstance(t, str) for t in terms)
                and len(set(terms)) == len(terms), "field 'terms' must be a list of distinct strings", meta_path)
        require(isinstance(idf, list) and len(idf) == len(terms)
                and all(isinstance(v, (int, float)) for v in idf), "field 'idf' must be one number per term", meta_path)
        require(isinstance(tfidf, dict) and isinstance(tfidf.get("token_pattern"), str)
                and isinstance(tfidf.get("stop_words"), list), "field 'tfidf' is malformed", meta_path)
        require(tfidf.get("lowercase") is True and tfidf.get("sublinear_tf") is True and tfidf.get("norm") == "l2",
                "field 'tfidf' has settings this version cannot reproduce", meta_path)
        try:
            re.compile(tfidf["token_pattern"])
        except re.error:
            raise ElmError("field 'tfidf.token_pattern' is not a valid regular expression", meta_path) from None
        components = _load_matrix(folder / COMPONENTS_NPY)
        centres = _load_matrix(folder / CENTRES_NPY)
        require(components.shape[1] == len(terms),
                f"shape {components.shape} does not match {len(terms)} terms", folder / COMPONENTS_NPY)
        require(centres.shape[1] == components.shape[0] and centres.shape[0] >= 1,
                f"shape {centres.shape} does not match {components.shape[0]} SVD dimensions", folder / CENTRES_NPY)
        encoder = TfidfEncoder(
            terms=terms,
            idf=np.asarray(idf, dtype=np.float64),
            stop_words=frozenset(str(w) for w in tfidf["stop_words"]),
            token_pattern=tfidf["token_pattern"],
        )
        return cls(encoder=encoder, components=components, centres=centres)


def _load_matrix(path: Path) -> np.ndarray:
    """A finite 2-D float array from a `.npy` file, never unpickling."""
    if not path.is_file():
        raise ElmError("file is missing", path)
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ElmError(f"not a readable .npy array ({e})", path) from None
    require(isinstance(arr, np.ndarray) and arr.ndim == 2 and arr.dtype.kind == "f",
            "must hold a 2-D float array", path)
    require(np.isfinite(arr).all(), "holds NaN or infinite values", path)
    return arr.astype(np.float64)


def fit_clusters(
    texts: list[str],
    k: int,
    svd_dim: int = 100,
    seed: int = 0,
    tolerance: float = 0.1,
    max_features: int = 50000,
    stop_words: bool = True,
    max_iter: int = 50,
    sizes: np.ndarray | list[int] | None = None,
    n_init: int = N_INIT,
) -> ClusterModel:
    """Fit tf-idf (sublinear tf) -> TruncatedSVD -> L2 normalise -> balanced k-means.

    The SVD keeps min(svd_dim, V - 1, n) dimensions (V = vocabulary size, n = documents).
    `sizes`: [n] each text's size (tokens, see `document_sizes`); every cluster of the fitted
    texts then holds at most ceil(sum(sizes)/k * (1 + tolerance)) of it. None balances
    documents: at most ceil(n/k * (1 + tolerance)) each. See `balanced_assign`, also for a
    document larger than that bound. `n_init`: k-means++ seedings tried, the lowest size-weighted
    objective kept (see `balanced_kmeans`).
    """
    from sklearn.decomposition import TruncatedSVD

    texts = list(texts)
    n = len(texts)
    require(isinstance(k, (int, np.integer)) and 1 <= k <= n,
            f"k={k} must be between 1 and the number of documents ({n})")
    require(tolerance >= 0, f"tolerance={tolerance} must be >= 0")
    require(svd_dim >= 1, f"svd_dim={svd_dim} must be >= 1")
    require(max_features >= 2, f"max_features={max_features} must be >= 2")
    if sizes is not None:
        sizes = np.asarray(sizes, dtype=np.int64)
        require(sizes.shape == (n,), f"sizes has {sizes.size} entries for {n} texts")
    encoder, x = fit_tfidf(texts, max_features=max_features, stop_words=stop_words)
    vocab = len(encoder.terms)
    require(vocab >= 2, f"the documents have only {vocab} distinct word(s); tf-idf + SVD needs at least 2")
    dim = min(svd_dim, vocab - 1, n)
    svd = TruncatedSVD(n_components=dim, algorithm="randomized", random_state=seed).fit(x)
    model = ClusterModel(encoder=encoder, components=np.asarray(svd.components_, dtype=np.float64),
                         centres=np.zeros((k, svd.components_.shape[0])))
    z = model.project(x)  # the same arithmetic as `transform`, without re-tokenising
    model.centres, model.labels = balanced_kmeans(z, k, tolerance=tolerance, seed=seed, max_iter=max_iter,
                                                  sizes=sizes, n_init=n_init)
    return model


# ----------------------------------------------------------------------------- document sizes


def document_sizes(texts: list[str], tokenizer_dir: str | Path | None = None) -> np.ndarray:
    """[n] int64 size of each text: its tokens under the tokenizer folder, else its UTF-8 bytes.

    Without a tokenizer the size is `len(text.encode("utf-8"))`, which tracks a byte-level BPE's
    token count: on the demo corpus each domain's share of the bytes is within 2 points of its
    share of the demo tokenizer's tokens, where whitespace-separated words (c-BTM's own count)
    put code at 17% of the text instead of 25% (code packs ~9 bytes into a "word", prose ~6).
    A small BPE trained on a sample of the documents measured no better (adjusted Rand index of
    the demo's six domains over three seeds: bytes 0.30/0.30/0.44, sample BPE 0.21/0.61/0.20,
    words 0.45/0.22/0.45, the demo's tokenizer 0.45/0.45/0.33) and costs a training and a full
    encoding; README, "Domains without labels".
    """
    if tokenizer_dir is None:
        return np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    from elmforest.data.tokenizer import load_tokenizer
    from elmforest.data.tokens import encode_documents

    tokenizer = load_tokenizer(Path(tokenizer_dir))
    return np.fromiter((len(ids) for ids in encode_documents(tokenizer, texts)), dtype=np.int64, count=len(texts))


# ----------------------------------------------------------------------------- corpora


def _all_texts(corpus: Corpus, domain: str) -> Iterator[str]:
    """Every document of a domain, all splits (a function, so each carried domain binds its own name)."""
    for split in SPLITS:
        yield from corpus.texts(domain, split)


def cluster_corpus(
    corpus: Corpus,
    domains: list[str] | None,
    k: int,
    out: str | Path,
    svd_dim: int = 100,
    seed: int = 0,
    tolerance: float = 0.1,
    max_features: int = 50000,
    stop_words: bool = True,
    carry: list[str] | None = None,
    balance: str = "tokens",
    tokenizer: str | Path | None = None,
    n_init: int = N_INIT,
) -> dict[str, Any]:
    """Re-split the documents of `domains` (all of them if None) into k clusters, written as a new corpus.

    `carry`: other domains copied unchanged into the new corpus (e.g. the novel domains a study
    evaluates on); they are not clustered and not in the contingency table.

    `balance`: "tokens" (c-BTM: every cluster holds at most ceil(T/k * (1 + tolerance)) of the
    T train tokens, counted with the `tokenizer` folder when given, else as UTF-8 bytes, see
    `document_sizes`) or "documents" (at most ceil(n/k * (1 + tolerance)) train documents).

    Fitted on the train split (balanced assignment); valid/test documents go to their nearest
    centre. The new corpus has domains cluster0..cluster{k-1}; it holds `clusterer/` (the
    fitted `ClusterModel`) and `cluster.json` (settings, the size unit, capacity, each cluster's
    documents per split and train size, contingency tables of source domain x cluster over all
    splits in documents and in size units, adjusted Rand index against the source domains);
    its manifest gets a short `clustering` entry. The whole folder appears atomically.
    Returns the `cluster.json` content. All documents are held in memory.
    """
    from sklearn.metrics import adjusted_rand_score

    out = Path(out)
    require(balance in BALANCES, f"balance={balance!r} must be one of {', '.join(BALANCES)}")
    require(tokenizer is None or balance == "tokens", "a tokenizer counts tokens: it needs balance='tokens'")
    domains = list(corpus.domains) if domains is None else list(domains)
    require(domains, "no domains to cluster", corpus.path)
    require(len(set(domains)) == len(domains), f"duplicate domains in {domains}")
    corpus.require(domains)
    carry = list(carry or [])
    corpus.require(carry)
    both = sorted(set(carry) & set(domains))
    require(not both, f"domain {both[0]!r} is both clustered and carried" if both else "")
    if (out / MANIFEST).exists():
        raise ElmError("a corpus already exists here; choose another --out or delete it", out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ElmError("output folder exists and is not empty", out)

    texts = {s: [] for s in SPLITS}  # split -> documents
    truth = {s: [] for s in SPLITS}  # split -> source domain index per document
    for i, d in enumerate(domains):
        for s in SPLITS:
            docs = list(corpus.texts(d, s))
            texts[s].extend(docs)
            truth[s].extend([i] * len(docs))
    n_train = len(texts["train"])
    require(1 <= k <= n_train, f"k={k} must be between 1 and the number of train documents ({n_train})", corpus.path)
    if balance == "documents":
        unit = "documents"
        sizes = {s: np.ones(len(texts[s]), dtype=np.int64) for s in SPLITS}
    else:
        unit = "tokens" if tokenizer is not None else BYTES
        sizes = {s: document_sizes(texts[s], tokenizer) for s in SPLITS}

    model = fit_clusters(texts["train"], k, svd_dim=svd_dim, seed=seed, tolerance=tolerance,
                         max_features=max_features, stop_words=stop_words,
                         sizes=None if balance == "documents" else sizes["train"], n_init=n_init)
    labels = {s: model.labels if s == "train" else model.assign(texts[s]) for s in SPLITS}
    all_truth = np.concatenate([np.asarray(truth[s], dtype=np.int64) for s in SPLITS])
    all_labels = np.concatenate([np.asarray(labels[s], dtype=np.int64) for s in SPLITS])
    all_sizes = np.concatenate([sizes[s] for s in SPLITS])
    table = np.zeros((len(domains), k), dtype=np.int64)  # [source domain, cluster] documents
    np.add.at(table, (all_truth, all_labels), 1)
    size_table = np.zeros((len(domains), k), dtype=np.int64)  # [source domain, cluster] sizes
    np.add.at(size_table, (all_truth, all_labels), all_sizes)
    train_total = int(sizes["train"].sum())
    capacity = cluster_capacity(train_total, k, tolerance)
    names = [f"cluster{c}" for c in range(k)]
    summary: dict[str, Any] = {
        "method": f"c-BTM: tf-idf (sublinear) -> TruncatedSVD -> L2 -> k-means balanced by {balance}",
        "source_corpus": str(corpus.path),
        "source_domains": domains,
        "k": k,
        "svd_dim": int(model.components.shape[0]),
        "tolerance": tolerance,
        "seed": seed,
        "n_init": n_init,
        "max_features": max_features,
        "stop_words": stop_words,
        "balance": balance,
        "size_unit": unit,  # what `capacity`, `train_size` and `size_contingency` count
        "tokenizer": None if tokenizer is None else str(tokenizer),
        "capacity": capacity,  # ceil(train total / k * (1 + tolerance)), in size_unit
        "train_size": np.bincount(labels["train"], weights=sizes["train"], minlength=k).astype(int).tolist(),
        "over_capacity": over_capacity(labels["train"], sizes["train"], k, capacity),
        "clusters": names,
        "sizes": {s: np.bincount(labels[s], minlength=k).astype(int).tolist() for s in SPLITS},
        "contingency": {"rows": domains, "columns": names, "counts": table.tolist()},
        "size_contingency": {"rows": domains, "columns": names, "unit": unit, "counts": size_table.tolist()},
        "adjusted_rand_index": float(adjusted_rand_score(all_truth, all_labels)) if all_truth.size else 0.0,
    }
    if tokenizer is not None:
        from elmforest.data.tokenizer import tokenizer_hash

        summary["tokenizer_hash"] = tokenizer_hash(Path(tokenizer))

    src = corpus.manifest["domains"]
    licences = sorted({str(src[d].get("licence", "")) for d in domains} - {""})

    members: list[list[str]] = [[] for _ in range(k)]  # cluster -> its documents, all splits
    for s in SPLITS:
        for text, c in zip(texts[s], labels[s]):
            members[c].append(text)
    sources = [
        DomainSource(name=names[c], documents=members[c],
                     source=f"c-BTM cluster {c} of {corpus.path} ({', '.join(domains)})",
                     licence="; ".join(licences), extra={"cluster": c})
        for c in range(k)
    ]
    sources += [
        DomainSource(name=d, documents=_all_texts(corpus, d),
                     source=f"{d} of {corpus.path}, carried unchanged", licence=str(src[d].get("licence", "")))
        for d in carry
    ]
    summary["carried"] = carry
    if out.exists():
        out.rmdir()  # empty (checked above); atomic_dir creates it afresh
    with storage.atomic_dir(out) as tmp:
        # write_corpus builds its own temporary folder and renames it onto `tmp`; the clusterer
        # and cluster.json go in beside it, and the outer rename publishes everything at once.
        write_corpus(tmp, sources, description=f"{k} c-BTM clusters of {corpus.path}")
        model.save(tmp / "clusterer")
        storage.write_json(tmp / CLUSTER_JSON, summary)
        short = {key: summary[key] for key in ("source_corpus", "source_domains", "k", "balance", "size_unit",
                                                "adjusted_rand_index")}
        short.update(clusterer="clusterer", details=CLUSTER_JSON)
        Corpus(tmp).update_manifest(lambda m: m.update(clustering=short))
    return summary
