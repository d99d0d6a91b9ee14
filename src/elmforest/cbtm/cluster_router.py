"""c-BTM routing: weights over the cluster experts from a context's distance to the cluster centres.

For a context with unit vector z (tf-idf -> SVD -> L2, `ClusterModel.transform`) and centres
c_1..c_k, c-BTM (Gururangan et al. 2023, arXiv 2303.14177) weights expert j by

    w_j = softmax_j(-|z - c_j|^2 / T),  then top-k: keep the k largest, renormalise.

T is the temperature (c-BTM evaluates with T = 0.1): T -> 0 puts all weight on the nearest
centre, a large T spreads it evenly. With unit vectors |z - c|^2 lies in [0, 4]. (c-BTM's
released scorer squares the value its k-means library already returns squared, i.e. uses
|z - c|^4; we follow the paper's formula.) The weights are computed once per context, not per
token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from elmforest.cbtm.balanced_kmeans import squared_distances
from elmforest.errors import require

DEFAULT_TEMPERATURE = 0.1  # c-BTM's evaluation default


def routing_weights(d2: np.ndarray, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None) -> np.ndarray:
    """[n, k] weights from [n, k] squared distances: softmax(-d2 / temperature), then top-k.

    top_k None (or k) keeps every cluster; else each row keeps its top_k largest weights (the
    nearest centres; ties to the lower cluster index) and is renormalised to sum to 1.
    """
    d2 = np.asarray(d2, dtype=np.float64)
    k = d2.shape[1]
    require(temperature > 0, f"temperature={temperature} must be > 0")
    require(top_k is None or 1 <= top_k <= k, f"top_k={top_k} must be between 1 and the number of clusters ({k})")
    logits = -d2 / temperature  # [n, k]
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax: the nearest centre gets exp(0) = 1
    w = np.exp(logits)
    if top_k is not None and top_k < k:
        drop = np.argsort(-w, axis=1, kind="stable")[:, top_k:]  # [n, k - top_k] the smallest weights
        np.put_along_axis(w, drop, 0.0, axis=1)
    return w / w.sum(axis=1, keepdims=True)


def cluster_router_weights(
    model: Any, texts: list[str], temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None
) -> np.ndarray:
    """[n, k] routing weights of texts under a fitted `ClusterModel` (rows sum to 1)."""
    return routing_weights(squared_distances(model.transform(texts), model.centres), temperature, top_k)


def window_texts(tokenizer: Any, array: np.ndarray, starts: Sequence[int], context: int) -> list[str]:
    """The routing text of each scoring window: the decoded `context` tokens before the window's
    start in its split's token array plus the window's first token, i.e. everything seen before
    the window's first prediction (no token routes its own prediction)."""
    return [tokenizer.decode(array[max(0, int(s) - context) : int(s) + 1].tolist()) for s in starts]


def routed_logprobs(expert_lp: torch.Tensor, weights: np.ndarray | torch.Tensor) -> torch.Tensor:
    """log p(x_t) = logsumexp_j(log w_j + log p_j(x_t)) with one weight row per window.

    expert_lp [n, N, T] (the experts' log-probs), weights [N, n] (rows sum to 1; an expert with
    weight 0 drops out) -> float32 [N, T]."""
    w = torch.as_tensor(np.asarray(weights), dtype=torch.float64)
    require(tuple(w.shape) == tuple(expert_lp.shape[:2][::-1]),
            f"weights {tuple(w.shape)} do not match {expert_lp.shape[0]} experts x {expert_lp.shape[1]} windows")
    log_w = w.T.log().unsqueeze(-1)  # [n, N, 1]
    return torch.logsumexp(log_w + expert_lp.double(), dim=0).float()


def choose_temperature(
    expert_lp: torch.Tensor, d2: np.ndarray, temperatures: Sequence[float], top_k: int | None = None
) -> tuple[float, dict[float, float]]:
    """The temperature whose routed mixture has the lowest mean NLL on these windows (meant for
    validation windows, never test), ties to the first listed.

    expert_lp [n, N, T], d2 [N, n] squared distances of the windows' routing texts to the experts'
    centres (same expert order). Returns (temperature, {temperature: mean NLL per token})."""
    require(len(temperatures) > 0, "no temperatures to choose from")
    nll = {float(t): float(-routed_logprobs(expert_lp, routing_weights(d2, t, top_k)).double().mean())
           for t in temperatures}
    best = min(nll, key=lambda t: (nll[t], list(nll).index(t)))
    return best, nll


class ClusterRouter:
    """Routing weights per text with an LRU cache keyed by the text (one computation per document)."""

    def __init__(
        self,
        model: Any,
        temperature: float = DEFAULT_TEMPERATURE,
        cache_size: int = 4096,
        top_k: int | None = None,
    ):
        require(temperature > 0, f"temperature={temperature} must be > 0")
        require(cache_size >= 1, f"cache_size={cache_size} must be >= 1")
        require(top_k is None or 1 <= top_k <= model.k,
                f"top_k={top_k} must be between 1 and the number of clusters ({model.k})")
        self.model = model
        self.temperature = temperature
        self.top_k = top_k
        self.cache_size = cache_size
        self.computed = 0  # how many texts were actually encoded (cache misses)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def weights_for(self, text: str) -> np.ndarray:
        """[k] weights over the clusters for one text (read-only; rows sum to 1)."""
        w = self._cache.get(text)
        if w is not None:
            self._cache.move_to_end(text)
            return w
        w = cluster_router_weights(self.model, [text], self.temperature, self.top_k)[0]
        w.flags.writeable = False
        self.computed += 1
        self._cache[text] = w
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)  # evict the least recently used
        return w
