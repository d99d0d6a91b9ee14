"""tf-idf vectors of documents, the first step of c-BTM's clustering (see `elmforest.cbtm.cluster`).

scikit-learn fits the vocabulary and idf (`fit_tfidf`); `TfidfEncoder` then encodes any text
from nothing but the word list and the idf vector, so a saved clusterer loads without
unpickling anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from elmforest.errors import ElmError

TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's default: words of 2+ word characters


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
