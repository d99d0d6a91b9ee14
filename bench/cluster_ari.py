"""c-BTM clustering of the demo corpus: how close can it come to the source domains (adjusted Rand index)?

    python bench/cluster_ari.py bound [--demo data/demo] [--tokenizer DIR]
    python bench/cluster_ari.py variants [--demo data/demo] [--seeds 0 1 2] [--only NAME ...]

`bound`: the best ARI (documents over all splits vs source domains, as `elmforest corpus cluster`
reports it) that *any* assignment respecting balanced k-means' train capacity can reach, for
k = 6 over the demo's six train domains, balanced by UTF-8 bytes, by tokens (with --tokenizer) and
by documents. Two figures each: an oracle assignment (a feasible one, so a lower bound on the
best) and an upper bound that no feasible assignment can beat (see `upper_bound`).

`variants`: the clustering itself (`fit_clusters`' recipe: tf-idf sublinear, SVD, L2, balanced
k-means by bytes) with changed settings, ARI over --seeds and the time per clustering. The
tf-idf fit is shared by the variants with the same vocabulary settings (it does not depend on
the seed) and timed once; each row's time is its SVD plus k-means (median over the seeds).
Prints markdown tables; appends nothing (the figures go to the README's c-BTM section).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import numpy as np

from elmforest.cbtm.balanced_kmeans import cluster_capacity, squared_distances
from elmforest.cbtm.cluster import document_sizes
from elmforest.data.corpus import SPLITS, Corpus

DOMAINS = ["news", "legal", "code", "health_tweets", "drama", "speeches"]
K, TOL = 6, 0.1


def load(demo: Path) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """split -> texts, split -> source domain index per text (the order `cluster_corpus` uses)."""
    corpus = Corpus(demo)
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    truth: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, d in enumerate(DOMAINS):
        for s in SPLITS:
            docs = list(corpus.texts(d, s))
            texts[s] += docs
            truth[s] += [i] * len(docs)
    return texts, {s: np.asarray(truth[s]) for s in SPLITS}


# ----------------------------------------------------------------------------- ARI from a table


def c2(x):
    return np.asarray(x, dtype=np.float64) * (np.asarray(x, dtype=np.float64) - 1) / 2


def ari_parts(index: float, a: float, b: float, n: int) -> float:
    """Hubert-Arabie ARI from the pair counts: index = sum C(n_ij,2), a = sum C(rows,2), b = sum C(cols,2)."""
    expected = a * b / c2(n)
    return float((index - expected) / ((a + b) / 2 - expected))


def ari_table(table: np.ndarray) -> float:
    """ARI of a [domain, cluster] contingency table of document counts."""
    return ari_parts(c2(table).sum(), c2(table.sum(1)).sum(), c2(table.sum(0)).sum(), int(table.sum()))


# ----------------------------------------------------------------------------- the bound


def oracle(train_sizes: list[np.ndarray], held: np.ndarray, capacity: int) -> tuple[float, np.ndarray]:
    """The best of a family of feasible assignments; returns (ARI, its [domain, cluster] table).

    Domain i's home is cluster i. A domain larger than `capacity` keeps its smallest train
    documents at home (as many as fit) and spills the rest, largest first (the fewest documents
    that free enough room); a domain's valid/test documents all stay at home (they are not
    capacity-bound). Each spilling domain names a first target cluster for its spill; what does
    not fit there goes first-fit to the clusters with the most room left. Every choice of
    targets is tried; the highest ARI is kept. Balancing documents, every size is 1.
    """
    n_dom = len(train_sizes)
    best = (-1.0, None)
    spills, base, load = {}, np.zeros((n_dom, n_dom), dtype=np.int64), np.zeros(n_dom, dtype=np.int64)
    for i, s in enumerate(train_sizes):
        s = np.sort(s)
        keep = int(np.searchsorted(np.cumsum(s), capacity, side="right"))
        base[i, i] = keep + held[i]
        load[i] = s[:keep].sum()
        if keep < s.size:
            spills[i] = s[keep:][::-1]
    movers = sorted(spills)
    for targets in itertools.product(range(n_dom), repeat=len(movers)):
        table, room, ok = base.copy(), capacity - load, True
        for i, first in zip(movers, targets):
            for size in spills[i]:
                order = [first] + [int(c) for c in np.argsort(-room, kind="stable") if c != first]
                c = next((c for c in order if c != i and room[c] >= size), None)
                if c is None:
                    ok = False
                    break
                table[i, c] += 1
                room[c] -= size
            if not ok:
                break
        if ok:
            score = ari_table(table)
            if score > best[0]:
                best = (score, table)
    return best


def upper_bound(train_sizes: list[np.ndarray], held: np.ndarray, capacity: int, k: int) -> float:
    """No assignment whose every cluster holds <= `capacity` of the train sizes beats this ARI.

    Domain i has a_i documents, V_i of them valid/test (free to go anywhere) and train sizes
    s_i. Any m clusters hold train documents of total size <= m * capacity, so at most g_i(m)
    of them (g_i(m): how many of the smallest fit in m * capacity). Sorted decreasingly, the
    domain's cells n_i1 >= n_i2 >= ... therefore have partial sums <= V_i + g_i(m), and the
    vector (V_i + g_i(1), g_i(2) - g_i(1), ...) majorises them; sum_j C(n_ij, 2) is
    Schur-convex, so it is at most the same sum over that vector: the pair index I <= I_max.
    ARI = (I - a b / P) / ((a + b)/2 - a b / P) (P = C(N, 2), a = sum_i C(a_i, 2) fixed,
    b = sum_j C(cluster size, 2)) grows with I and I <= b, so ARI <= max over b of
    ARI(min(I_max, b), b), maximised here over a fine grid of b and the point b = I_max.
    """
    index = 0.0
    a_rows = []
    for s, v in zip(train_sizes, held):
        s = np.sort(s)
        csum = np.cumsum(s)
        g = [int(np.searchsorted(csum, m * capacity, side="right")) for m in range(1, k + 1)]
        g[-1] = s.size  # documents larger than the capacity still go somewhere: count them in the last cell
        cells = np.diff([0] + g).astype(np.float64)
        cells[0] += v
        index += c2(cells).sum()
        a_rows.append(s.size + v)
    n = int(sum(a_rows))
    a = float(c2(a_rows).sum())
    grid = np.concatenate([np.geomspace(1.0, c2(n), 200001), [index]])
    return max(ari_parts(min(index, b), a, b, n) for b in grid)


def bound(a: argparse.Namespace) -> None:
    texts, truth = load(a.demo)
    held = np.asarray([sum(int((truth[s] == i).sum()) for s in ("valid", "test")) for i in range(len(DOMAINS))])
    counts = {"UTF-8 bytes": document_sizes(texts["train"]),
              "documents": np.ones(len(texts["train"]), dtype=np.int64)}
    if a.tokenizer:
        counts[f"tokens ({a.tokenizer})"] = document_sizes(texts["train"], a.tokenizer)
    print(f"k={K}, tolerance {TOL}; documents over all splits: {sum(len(t) for t in texts.values())}\n")
    print("| balanced by | capacity | share of the train size per domain (%) | oracle ARI | upper bound |")
    print("|---|---|---|---|---|")
    tables = {}
    for name, sizes in counts.items():
        per = [sizes[truth["train"] == i] for i in range(len(DOMAINS))]
        cap = cluster_capacity(int(sizes.sum()), K, TOL)
        score, table = oracle(per, held, cap)
        ub = upper_bound(per, held, cap, K)
        share = " / ".join(f"{100 * p.sum() / sizes.sum():.1f}" for p in per)
        print(f"| {name} | {cap:,} ({100 * cap / sizes.sum():.1f}%) | {share} | {score:.3f} | {ub:.3f} |")
        tables[name] = table
    for name, table in tables.items():
        print(f"\noracle table, {name} (rows {', '.join(DOMAINS)}; documents over all splits):")
        for d, row in zip(DOMAINS, table):
            print(f"  {d:>14}: {' '.join(f'{x:>6}' for x in row)}")


# ----------------------------------------------------------------------------- variants


VARIANTS = {  # name -> (tf-idf settings, SVD settings) that differ from fit_clusters' defaults
    "default": ({}, {}),
    "svd_dim 25": ({}, {"svd_dim": 25}),
    "svd_dim 50": ({}, {"svd_dim": 50}),
    "svd_dim 200": ({}, {"svd_dim": 200}),
    "max_features 10000": ({"max_features": 10000}, {}),
    "min_df 5": ({"min_df": 5}, {}),
    "SVD n_iter 10": ({}, {"n_iter": 10}),
}
RESTARTS = {"default": 10, "svd_dim 50": 5}  # these also report n_init = 2, 3, 5 (, 10) from the same runs


def embed(texts: dict[str, list[str]], tfidf: dict, seeds: list[int], svd: dict) -> tuple[dict, dict, float]:
    """seed -> {split: z}, seed -> SVD seconds; and the tf-idf seconds (fit_clusters' arithmetic)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    from elmforest.cbtm.tfidf import TOKEN_PATTERN

    t0 = time.perf_counter()
    settings = {"max_features": 50000, **tfidf}
    vec = TfidfVectorizer(sublinear_tf=True, stop_words="english", token_pattern=TOKEN_PATTERN, lowercase=True,
                          dtype=np.float64, **settings)
    x = {"train": vec.fit_transform(texts["train"])}
    t_tfidf = time.perf_counter() - t0
    x.update({s: vec.transform(texts[s]) for s in SPLITS if s != "train"})
    out, secs = {}, {}
    for seed in seeds:
        t0 = time.perf_counter()
        dim = min(svd.get("svd_dim", 100), x["train"].shape[1] - 1, x["train"].shape[0])
        comp = TruncatedSVD(n_components=dim, algorithm="randomized", random_state=seed,
                            n_iter=svd.get("n_iter", 5)).fit(x["train"]).components_
        z = {}
        for s in SPLITS:
            v = np.asarray(x[s] @ comp.T)
            n = np.linalg.norm(v, axis=1, keepdims=True)
            z[s] = v / np.where(n > 0, n, 1.0)
        secs[seed] = time.perf_counter() - t0
        out[seed] = z
    return out, secs, t_tfidf


def restarts(z: dict[str, np.ndarray], sizes: np.ndarray, seed: int, n: int) -> list[tuple[float, np.ndarray, np.ndarray, float]]:
    """`balanced_kmeans(..., n_init=n)`'s n runs one by one: (objective, centres, labels, seconds) each."""
    from elmforest.cbtm.balanced_kmeans import _lloyd, balanced_objective, kmeans_plus_plus

    w = np.maximum(sizes.astype(np.float64), 1e-9)
    cap = cluster_capacity(int(sizes.sum()), K, TOL)
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        centres, labels = _lloyd(z["train"], kmeans_plus_plus(z["train"], K, rng, w), cap, sizes, w, 50)
        runs.append((balanced_objective(z["train"], centres, labels, sizes), centres, labels,
                     time.perf_counter() - t0))
    return runs


def ari_all(z: dict[str, np.ndarray], centres: np.ndarray, train_labels: np.ndarray, truth: dict) -> float:
    """ARI over all splits: train as balanced, valid/test at their nearest centre (as `cluster_corpus`)."""
    from sklearn.metrics import adjusted_rand_score

    labels = [train_labels] + [squared_distances(z[s], centres).argmin(1) for s in SPLITS if s != "train"]
    return float(adjusted_rand_score(np.concatenate([truth[s] for s in SPLITS]), np.concatenate(labels)))


def variants(a: argparse.Namespace) -> None:
    texts, truth = load(a.demo)
    sizes = document_sizes(texts["train"])
    names = a.only or list(VARIANTS)
    seeds = a.seeds
    print(f"k={K}, balanced by UTF-8 bytes; seeds {seeds}; ARI over all splits; s = SVD + k-means, median over seeds\n")
    print(f"| variant | {' | '.join(f'seed {s}' for s in seeds)} | mean | s |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for name in names:
        tfidf, svd = VARIANTS[name]
        z, svd_secs, t_tfidf = embed(texts, tfidf, seeds, svd)
        n = min(RESTARTS.get(name, 1), a.max_restarts)
        rows: dict[str, tuple[list[float], list[float]]] = {}
        for seed in seeds:
            runs = restarts(z[seed], sizes, seed, n)
            for m in [m for m in (1, 2, 3, 5, 10) if m <= n]:
                i = min(range(m), key=lambda r: runs[r][0])  # the lowest objective, earliest on a tie
                label = name if m == 1 else f"{name}, n_init {m}"
                score = ari_all(z[seed], runs[i][1], runs[i][2], truth)
                secs = svd_secs[seed] + sum(r[3] for r in runs[:m])
                rows.setdefault(label, ([], []))
                rows[label][0].append(score)
                rows[label][1].append(secs)
            if n > 1:
                print(f"  seed {seed}: restarts (objective, ARI): "
                      + ", ".join(f"({r[0]:.4g}, {ari_all(z[seed], r[1], r[2], truth):.2f})" for r in runs), flush=True)
        for label, (scores, secs) in rows.items():
            print(f"| {label} | {' | '.join(f'{v:.2f}' for v in scores)} | {statistics.mean(scores):.3f} "
                  f"| {statistics.median(secs):.0f} |", flush=True)
        print(f"  ({name}: tf-idf fit {t_tfidf:.0f} s)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["bound", "variants"])
    p.add_argument("--demo", type=Path, default=Path("data/demo"))
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder: also bound token balancing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--only", nargs="+", default=None, choices=list(VARIANTS))
    p.add_argument("--max-restarts", type=int, default=10, help="cap the restarts of the rows with n_init")
    a = p.parse_args()
    bound(a) if a.what == "bound" else variants(a)


if __name__ == "__main__":
    main()
