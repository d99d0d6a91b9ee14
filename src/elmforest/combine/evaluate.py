"""Perplexity on fixed evaluation windows.

Every method (one expert, the dense model, an ensemble, an averaged model) is scored on the same
tokens. A split's token array (`doc0 EOS doc1 EOS ...`) is cut into a grid of windows of
`context + 1` tokens that overlap by one token, so each window predicts `context` tokens and
every token after the first is predicted exactly once (the tail that does not fill a window is
dropped):

    array:   t0 t1 t2 t3 t4 t5 t6 ...        (context = 3)
    window0: t0 t1 t2 t3                      predicts t1 t2 t3
    window1:          t3 t4 t5 t6             predicts t4 t5 t6

`spread_windows` (the evaluation protocol) draws `count` windows of that grid at random without
replacement, seeded, so the scored tokens are spread over the *whole* split rather than its first
documents, and tells for every predicted token which document it belongs to (document k ends at
the k-th EOS), so intervals can resample documents. `eval_windows` takes the first windows of
the grid (the training loop's quick valid loss).

A "log-prob function" maps windows LongTensor[B, T+1] to log p(x_t | x_<t) for t = 1..T as a
FloatTensor[B, T]; `token_logprobs` is the one for a single causal LM, `Ensemble.logprobs` the
one for a mixture of experts.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from elmforest.errors import ElmError, require

LogprobFn = Callable[[torch.Tensor], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a parameter-less module)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.inference_mode()
def token_logprobs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T of each window: tokens [B, T+1] -> float32 [B, T].

    log_softmax gathered at the targets, computed as logit[target] - logsumexp(logits) so the
    [B, T, vocab] log-softmax is never materialised. Returned on the tokens' device.
    """
    model.eval()
    ids = tokens.to(model_device(model))
    logits = model(ids[:, :-1]).logits.float()  # [B, T, V]
    targets = ids[:, 1:].unsqueeze(-1)  # [B, T, 1]
    logp = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return logp.to(tokens.device)


def eval_windows(array: np.ndarray, context: int, max_tokens: int | None = None) -> torch.Tensor:
    """Cut a 1-D token array into non-overlapping scoring windows -> LongTensor[N, context+1].

    Only the first `max_tokens` tokens are used (all of them when None); window i covers
    array[i*context : i*context + context + 1]. N = (len - 1) // context windows predict
    N * context tokens, each exactly once.
    """
    require(context >= 1, f"context must be >= 1, got {context}")
    flat = np.asarray(array).reshape(-1)
    if max_tokens is not None:
        require(max_tokens >= 2, f"max_tokens must be >= 2, got {max_tokens}")
        flat = flat[:max_tokens]
    n = (len(flat) - 1) // context
    if n < 1:
        raise ElmError(
            f"too few tokens for one evaluation window: {len(flat)} tokens, context {context} "
            f"needs at least {context + 1}"
        )
    # starts[i] + offsets -> [N, context+1] index grid (the last token of a window is the first
    # of the next one).
    starts = np.arange(n, dtype=np.int64)[:, None] * context
    grid = starts + np.arange(context + 1, dtype=np.int64)[None, :]
    return torch.from_numpy(flat[grid].astype(np.int64))


@dataclass(frozen=True)
class EvalWindows:
    """Scoring windows of one split plus the document each predicted token belongs to.

    tokens: LongTensor [N, context+1]; docs: LongTensor [N, context], docs[i, t] = index (within
    the split, 0-based) of the document holding target tokens[i, t+1]; split_documents: how many
    documents the split holds in all.
    """

    tokens: torch.Tensor
    docs: torch.Tensor
    split_documents: int
    starts: torch.Tensor | None = None  # LongTensor [N]: each window's first position in the split's array

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_tokens(self) -> int:
        """Predicted (scored) tokens: N * context."""
        return int(self.docs.numel())

    @property
    def documents(self) -> int:
        """Distinct documents with at least one scored token."""
        return int(torch.unique(self.docs).numel())


def window_seed(seed: int, domain: str, split: str) -> list[int]:
    """The sampling seed of one domain's split: the same windows for every method and every run."""
    return [int(seed), zlib.crc32(domain.encode("utf-8")), zlib.crc32(split.encode("utf-8"))]


def spread_windows(
    array: np.ndarray, context: int, count: int | None, seed: int | list[int], eos_id: int | None
) -> EvalWindows:
    """`count` windows drawn without replacement from a split's whole window grid -> EvalWindows.

    The draw is seeded (`window_seed`), so it is the same for every method, model and training
    seed; the windows come in the draw's (random) order, which is the order a moving-average prior
    walks them. count None (or more than the grid holds) takes every window. With `eos_id` None
    every token counts as one document (no boundaries known).
    """
    require(context >= 1, f"context must be >= 1, got {context}")
    flat = np.asarray(array).reshape(-1)
    grid = (len(flat) - 1) // context
    if grid < 1:
        raise ElmError(
            f"too few tokens for one evaluation window: {len(flat)} tokens, context {context} "
            f"needs at least {context + 1}"
        )
    rng = np.random.default_rng(seed)
    n = grid if count is None else min(grid, int(count))
    require(n >= 1, f"need at least one evaluation window, got count={count}")
    picks = rng.choice(grid, size=n, replace=False) if n < grid else rng.permutation(grid)
    starts = picks.astype(np.int64)[:, None] * context  # [N, 1]
    tokens = torch.from_numpy(flat[starts + np.arange(context + 1)[None, :]].astype(np.int64))
    targets = starts + np.arange(1, context + 1)[None, :]  # [N, context] positions predicted
    if eos_id is None:
        docs, n_docs = targets, len(flat)
    else:
        ends = np.flatnonzero(flat == eos_id)  # document k ends at ends[k] (its EOS is part of it)
        n_docs = max(1, len(ends))
        docs = np.minimum(np.searchsorted(ends, targets, side="left"), n_docs - 1)
    return EvalWindows(
        tokens, torch.from_numpy(np.ascontiguousarray(docs, dtype=np.int64)), int(n_docs), torch.from_numpy(starts[:, 0].copy())
    )


def document_sums(logprobs: torch.Tensor, docs: torch.Tensor) -> tuple[list[int], list[float], list[int]]:
    """Per-document NLL sums of a [N, T] table of log-probs -> (document ids, NLL sums, token counts).

    Documents in increasing id order; sums in float64 (nats). These are the units a bootstrap
    over documents resamples.
    """
    require(logprobs.shape == docs.shape, f"log-probs {tuple(logprobs.shape)} and documents {tuple(docs.shape)} differ")
    ids, inverse = torch.unique(docs.reshape(-1), return_inverse=True)
    sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, -logprobs.reshape(-1).double())
    counts = torch.bincount(inverse, minlength=len(ids))
    return ids.tolist(), sums.tolist(), counts.tolist()


def perplexity(
    logprob_fn: LogprobFn | nn.Module, windows: torch.Tensor, batch_size: int = 8
) -> dict[str, float]:
    """Score `windows` [N, T+1] batch by batch -> {"ppl", "nll", "tokens"}.

    nll is the mean negative log-likelihood per predicted token (nats) over all N * T tokens and
    ppl = exp(nll). `logprob_fn` is a log-prob function or a causal LM (scored with
    `token_logprobs`).
    """
    require(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
    require(windows.ndim == 2 and windows.shape[1] >= 2, "windows must be a [N, T+1] tensor, T >= 1")
    if isinstance(logprob_fn, nn.Module):
        model = logprob_fn
        logprob_fn = lambda tokens: token_logprobs(model, tokens)  # noqa: E731
    total = 0.0  # summed in float64 so long evaluations do not lose precision
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        logp = logprob_fn(batch)  # [b, T]
        total += float(logp.double().sum())
        count += logp.numel()
    nll = -total / count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": count}


def geo_mean(ppls: list[float]) -> float | None:
    """Geometric mean of perplexities: the exponent of the mean per-domain NLL (None if empty)."""
    return math.exp(sum(math.log(p) for p in ppls) / len(ppls)) if ppls else None
