"""c-BTM: discover domains without labels and route by distance to cluster centres.

c-BTM (Gururangan et al. 2023) replaces metadata domains by clusters of documents:

    text --tf-idf--> sparse [n, V] --SVD--> [n, svd_dim] --L2 normalise--> z   (unit vectors)
    z --balanced k-means--> k centres; every cluster holds at most ceil(n/k * (1+tolerance)) docs

Each cluster becomes a domain and gets its own expert. At inference a context is routed by its
squared distance to the centres: w_c = softmax_c(-|z - centre_c|^2 / T), computed once per
document, not per token.

Nothing here is pickled: a fitted `ClusterModel` is saved as JSON (vocabulary, idf, settings)
plus `.npy` arrays (SVD components, centres) read with `allow_pickle=False`, and the tf-idf
transform is rebuilt by hand with scikit-learn's exact settings, so an untrusted clusterer
folder can be opened safely.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from elmforest import storage
from elmforest.corpus import SPLITS, Corpus, DomainSource, MANIFEST, write_corpus
from elmforest.errors import ElmError, require

CLUSTERER_FORMAT = "elmforest-clusterer/1"
CLUSTERER_JSON = "clusterer.json"
COMPONENTS_NPY = "svd_components.npy"
CENTRES_NPY = "centres.npy"
CLUSTER_JSON = "cluster.json"
TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of 2+ word characters
DEFAULT_TEMPERATURE = 0.1


# ----------------------------------------------------------------------------- tf-idf


@dataclass
class TfidfEncoder:
    """The tf-idf transform of a fitted `TfidfVectorizer(sublinear_tf=True)`, rebuilt by hand.

    For one document: lowercase, find tokens with `token_pattern`, drop stop words and words not
    in the vocabulary, count; tf = 1 + log(count); x_t = tf * idf_t; x /= |x|_2. This is exactly
    what scikit-learn computes (checked against it in the tests), but needs only a word list and
    an idf vector, so it loads without unpickling anything.
    """

    terms: list[str]  # column j holds terms[j]
    idf: np.ndarray  # [V] float64
    stop_words: frozenset[str]
    token_pattern: str = TOKEN_PATTERN

    def __post_init__(self) -> None:
        self._index = {t: j for j, t in enumerate(self.terms)}
        self._regex = re.compile(self.token_pattern)

    def encode(self, texts: list[str]) -> sp.csr_matrix:
        """[n, V] sparse tf-idf rows, each L2-normalised (all-zero rows stay zero)."""
        indptr, indices, data = [0], [], []
        for text in texts:
            counts: dict[int, int] = {}
            for tok in self._regex.findall(text.lower()):
                j = self._index.get(tok)
                if j is not None and tok not in self.stop_words:
                    counts[j] = counts.get(j, 0) + 1
            cols = sorted(counts)
            indices.extend(cols)
            data.extend(counts[j] for j in cols)
            indptr.append(len(indices))
        x = sp.csr_matrix(
            (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), np.asarray(indptr)),
            shape=(len(texts), len(self.terms)),
        )
        x.data = (np.log(x.data) + 1.0) * self.idf[x.indices]  # sublinear tf times idf
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())  # [n]
        row_of = np.repeat(np.arange(len(texts)), np.diff(x.indptr))
        x.data /= np.where(norms > 0, norms, 1.0)[row_of]
        return x


def fit_tfidf(texts: list[str], max_features: int, stop_words: bool) -> tuple[TfidfEncoder, sp.csr_matrix]:
    """Fit scikit-learn's `TfidfVectorizer` and return our encoder plus the [n, V] training matrix."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

    vec = TfidfVectorizer(
        sublinear_tf=True,
        stop_words="english" if stop_words else None,
        max_features=max_features,
        token_pattern=TOKEN_PATTERN,
        lowercase=True,
        dtype=np.float64,
    )
    try:
        x = vec.fit_transform(texts)
    except ValueError as e:  # "empty vocabulary; perhaps the documents only contain stop words"
        raise ElmError(f"cannot build a tf-idf vocabulary: {e}") from None
    terms = [""] * len(vec.vocabulary_)
    for term, j in vec.vocabulary_.items():
        terms[int(j)] = term
    encoder = TfidfEncoder(
        terms=terms,
        idf=np.asarray(vec.idf_, dtype=np.float64),
        stop_words=frozenset(ENGLISH_STOP_WORDS) if stop_words else frozenset(),
    )
    return encoder, x.tocsr()


# ----------------------------------------------------------------------------- balanced k-means


def squared_distances(z: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[n, k] squared Euclidean distances: |z|^2 + |c|^2 - 2 z.c, clipped at 0 against round-off."""
    d2 = (z * z).sum(1)[:, None] + (centres * centres).sum(1)[None, :] - 2.0 * z @ centres.T
    return np.maximum(d2, 0.0)


def kmeans_plus_plus(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: first centre uniform, each next one drawn with probability ~ D(x)^2."""
    n = z.shape[0]
    chosen = [int(rng.integers(n))]
    d2 = squared_distances(z, z[chosen]).ravel()  # [n] distance to the nearest chosen centre
    for _ in range(1, k):
        total = d2.sum()
        # All remaining points coincide with a centre (duplicates): any point will do.
        p = d2 / total if total > 0 else np.full(n, 1.0 / n)
        i = int(rng.choice(n, p=p))
        chosen.append(i)
        d2 = np.minimum(d2, squared_distances(z, z[i : i + 1]).ravel())
    return z[chosen].copy()


def cluster_capacity(n: int, k: int, tolerance: float) -> int:
    """The size bound of balanced k-means: ceil(n/k * (1 + tolerance)); always >= n/k."""
    return math.ceil(n / k * (1.0 + tolerance) - 1e-9)  # -1e-9: 100/4*1.0 must stay 25, not 26


def balanced_assign(d2: np.ndarray, capacity: int) -> np.ndarray:
    """Capacity-constrained assignment: greedy over (document, cluster) pairs by ascending distance.

    Reference algorithm: sort all n*k pairs by (distance, doc*k + cluster); walk them in order
    and accept a pair when its document is still unassigned and its cluster holds fewer than
    `capacity` documents. That walk is done here in at most k vectorised rounds: every
    unassigned document proposes its nearest open cluster; the proposals are accepted in greedy
    order up to the first one that overflows a cluster; that cluster is closed, and the rest
    propose again. (Before a cluster fills, the walk accepts exactly each document's first
    pair to an open cluster, so the rounds reproduce the walk.)

    Bound, and why every document is placed: no cluster ever exceeds `capacity` (a full cluster
    is closed). A document left over would mean all k clusters were full, i.e. k * capacity
    documents placed, but k * capacity >= n (capacity >= n/k), a contradiction.

    Afterwards, any empty cluster takes its nearest document from a cluster holding more than
    one (sizes only move 1 -> 0 + 1, so the bound still holds); with n >= k no cluster is empty.
    """
    n, k = d2.shape
    require(capacity * k >= n, f"capacity {capacity} x {k} clusters cannot hold {n} documents")
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)  # free places per cluster
    todo = np.arange(n)
    while todo.size:
        m = todo.size
        dist = np.where(room > 0, d2[todo], np.inf)  # [m, k]; closed clusters are unreachable
        nearest = dist.argmin(1)  # lowest cluster index among ties, as in the flat sort
        best = dist[np.arange(m), nearest]
        order = np.lexsort((todo * k + nearest, best))  # greedy order of the proposals
        c_in_order = nearest[order]
        counts = np.bincount(c_in_order, minlength=k)
        over = np.flatnonzero(counts > room)
        if over.size == 0:
            stop = m  # nobody overflows: accept all proposals
        else:
            # rank r of cluster c in greedy order sits at grouped[starts[c] + r]
            grouped = np.argsort(c_in_order, kind="stable")
            starts = np.cumsum(counts) - counts
            stop = int(grouped[starts[over] + room[over] - 1].min()) + 1  # first cluster to fill
        take = order[:stop]
        labels[todo[take]] = nearest[take]
        room -= np.bincount(nearest[take], minlength=k)
        todo = np.delete(todo, take)
    sizes = np.bincount(labels, minlength=k)
    for c in np.flatnonzero(sizes == 0):
        donors = sizes[labels] > 1  # documents whose cluster can spare one
        i = int(np.flatnonzero(donors)[d2[donors, c].argmin()])
        sizes[labels[i]] -= 1
        labels[i] = c
        sizes[c] = 1
    return labels


def balanced_kmeans(
    z: np.ndarray, k: int, tolerance: float = 0.1, seed: int = 0, max_iter: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd iterations with the capacity-constrained assignment of `balanced_assign`.

    k-means++ seeding from `seed`, then: assign (every cluster <= ceil(n/k * (1+tolerance))
    documents, none empty), move each centre to its documents' mean, until the assignment stops
    changing or `max_iter` rounds. Deterministic for a given seed. Returns (centres [k, d],
    labels [n]).
    """
    n = z.shape[0]
    require(1 <= k <= n, f"k={k} must be between 1 and the number of documents ({n})")
    require(tolerance >= 0, f"tolerance={tolerance} must be >= 0")
    capacity = cluster_capacity(n, k, tolerance)
    centres = kmeans_plus_plus(z, k, np.random.default_rng(seed))
    labels = np.full(n, -1, dtype=np.int64)
    for _ in range(max_iter):
        new = balanced_assign(squared_distances(z, centres), capacity)
        if np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, z)
        centres = sums / np.bincount(labels, minlength=k)[:, None]  # no cluster is empty
    return centres, labels


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
) -> ClusterModel:
    """Fit tf-idf (sublinear tf) -> TruncatedSVD -> L2 normalise -> balanced k-means.

    The SVD keeps min(svd_dim, V - 1, n) dimensions (V = vocabulary size, n = documents).
    Every cluster of the fitted texts holds at most ceil(n/k * (1 + tolerance)) documents
    (see `balanced_assign`).
    """
    from sklearn.decomposition import TruncatedSVD

    texts = list(texts)
    n = len(texts)
    require(isinstance(k, (int, np.integer)) and 1 <= k <= n,
            f"k={k} must be between 1 and the number of documents ({n})")
    require(tolerance >= 0, f"tolerance={tolerance} must be >= 0")
    require(svd_dim >= 1, f"svd_dim={svd_dim} must be >= 1")
    require(max_features >= 2, f"max_features={max_features} must be >= 2")
    encoder, x = fit_tfidf(texts, max_features=max_features, stop_words=stop_words)
    vocab = len(encoder.terms)
    require(vocab >= 2, f"the documents have only {vocab} distinct word(s); tf-idf + SVD needs at least 2")
    dim = min(svd_dim, vocab - 1, n)
    svd = TruncatedSVD(n_components=dim, algorithm="randomized", random_state=seed).fit(x)
    model = ClusterModel(encoder=encoder, components=np.asarray(svd.components_, dtype=np.float64),
                         centres=np.zeros((k, svd.components_.shape[0])))
    z = model.project(x)  # the same arithmetic as `transform`, without re-tokenising
    model.centres, model.labels = balanced_kmeans(z, k, tolerance=tolerance, seed=seed, max_iter=max_iter)
    return model


# ----------------------------------------------------------------------------- routing


def cluster_router_weights(
    model: ClusterModel, texts: list[str], temperature: float = DEFAULT_TEMPERATURE
) -> np.ndarray:
    """[n, k] routing weights: softmax over clusters of -|z - centre|^2 / temperature.

    One row per document (or context), computed once for the whole text, not per token; the
    rows sum to 1. With unit vectors d^2 lies in [0, 4]; a small temperature makes it sharp.
    """
    require(temperature > 0, f"temperature={temperature} must be > 0")
    logits = -squared_distances(model.transform(texts), model.centres) / temperature  # [n, k]
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


class ClusterRouter:
    """Routing weights per text with an LRU cache keyed by the text (one computation per document)."""

    def __init__(self, model: ClusterModel, temperature: float = DEFAULT_TEMPERATURE, cache_size: int = 4096):
        require(temperature > 0, f"temperature={temperature} must be > 0")
        require(cache_size >= 1, f"cache_size={cache_size} must be >= 1")
        self.model = model
        self.temperature = temperature
        self.cache_size = cache_size
        self.computed = 0  # how many texts were actually encoded (cache misses)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def weights_for(self, text: str) -> np.ndarray:
        """[k] weights over the clusters for one text (read-only; rows sum to 1)."""
        w = self._cache.get(text)
        if w is not None:
            self._cache.move_to_end(text)
            return w
        w = cluster_router_weights(self.model, [text], self.temperature)[0]
        w.flags.writeable = False
        self.computed += 1
        self._cache[text] = w
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # evict the least recently used
        return w


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
) -> dict[str, Any]:
    """Re-split the documents of `domains` (all of them if None) into k clusters, written as a new corpus.

    `carry`: other domains copied unchanged into the new corpus (e.g. the novel domains a study
    evaluates on); they are not clustered and not in the contingency table.

    Fitted on the train split (balanced assignment); valid/test documents go to their nearest
    centre. The new corpus has domains cluster0..cluster{k-1}; it holds `clusterer/` (the
    fitted `ClusterModel`) and `cluster.json` (settings, sizes, contingency table of source
    domain x cluster over all splits, adjusted Rand index against the source domains); its
    manifest gets a short `clustering` entry. The whole folder appears atomically.
    Returns the `cluster.json` content. All documents are held in memory.
    """
    from sklearn.metrics import adjusted_rand_score

    out = Path(out)
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

    model = fit_clusters(texts["train"], k, svd_dim=svd_dim, seed=seed, tolerance=tolerance,
                         max_features=max_features, stop_words=stop_words)
    labels = {s: model.labels if s == "train" else model.assign(texts[s]) for s in SPLITS}
    all_truth = np.concatenate([np.asarray(truth[s], dtype=np.int64) for s in SPLITS])
    all_labels = np.concatenate([np.asarray(labels[s], dtype=np.int64) for s in SPLITS])
    table = np.zeros((len(domains), k), dtype=np.int64)  # [source domain, cluster]
    np.add.at(table, (all_truth, all_labels), 1)
    names = [f"cluster{c}" for c in range(k)]
    summary: dict[str, Any] = {
        "method": "c-BTM: tf-idf (sublinear) -> TruncatedSVD -> L2 -> balanced k-means",
        "source_corpus": str(corpus.path),
        "source_domains": domains,
        "k": k,
        "svd_dim": int(model.components.shape[0]),
        "tolerance": tolerance,
        "seed": seed,
        "max_features": max_features,
        "stop_words": stop_words,
        "capacity": cluster_capacity(n_train, k, tolerance),
        "clusters": names,
        "sizes": {s: np.bincount(labels[s], minlength=k).astype(int).tolist() for s in SPLITS},
        "contingency": {"rows": domains, "columns": names, "counts": table.tolist()},
        "adjusted_rand_index": float(adjusted_rand_score(all_truth, all_labels)) if all_truth.size else 0.0,
    }

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
        short = {key: summary[key] for key in ("source_corpus", "source_domains", "k", "adjusted_rand_index")}
        short.update(clusterer="clusterer", details=CLUSTER_JSON)
        Corpus(tmp).update_manifest(lambda m: m.update(clustering=short))
    return summary
