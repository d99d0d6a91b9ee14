"""Paired bootstrap intervals over test documents (and training seeds).

Every method is scored on the same test windows, and each scored token belongs to one document,
so a domain's evaluation is a table of per-document NLL sums: nll[method][seed][doc] and the
documents' token counts tok[doc]. One bootstrap resample draws, for every domain independently,
its documents with replacement (counts c_b[doc], multinomial) and, when there are several
training seeds, the seeds with replacement (counts w_b[seed]); then for each method

    L_b(domain) = sum_s w_b[s]/S * (c_b . nll[method][s]) / (c_b . tok)     (mean NLL per token)
    L_b(part)   = mean over the part's domains of L_b(domain)                (log of the geometric mean ppl)

The same resample serves every method (a *paired* bootstrap), so the ratio of two methods,
exp(L_b(a) - L_b(b)), carries the correlation between them: documents that are hard for one
model are hard for the other. Intervals are the 2.5 and 97.5 percentiles over the resamples
(1,000 by default, seeded). Point estimates use every document once and average seeds in log
space (the geometric mean over seeds of each seed's perplexity).

A claim "a beats b" (lower perplexity) *holds* when the whole 95% interval of the ratio a/b lies
below 1, *does not hold* when it lies above 1, and is *not distinguishable* otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from elmforest.errors import require

RESAMPLES = 1000
LEVEL = 0.95
HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "not distinguishable"


@dataclass
class DomainDocs:
    """One domain's per-document sums: tokens [D] and, per method, NLL sums [S, D] (seeds x documents)."""

    tokens: np.ndarray
    nll: dict[str, np.ndarray]

    def point(self, method: str) -> float:
        """Mean NLL per token, seeds averaged (log space)."""
        return float(self.nll[method].sum(axis=1).mean() / self.tokens.sum())


class Bootstrap:
    """Resampled mean NLLs of every method on every domain, computed once and queried per claim.

    domains: {domain: DomainDocs} (every method present in every domain); parts: {"train": [...],
    "novel": [...]} (a part may be empty). Memory: methods x domains x resamples floats.
    """

    def __init__(
        self,
        domains: dict[str, DomainDocs],
        parts: dict[str, list[str]],
        resamples: int = RESAMPLES,
        seed: int = 0,
    ):
        require(domains, "nothing to bootstrap: no domains")
        require(resamples >= 1, f"resamples must be >= 1, got {resamples}")
        self.domains, self.parts, self.resamples = domains, parts, resamples
        first = next(iter(domains.values()))
        self.methods = list(first.nll)
        self.n_seeds = next(iter(first.nll.values())).shape[0]
        rng = np.random.default_rng([seed, 0xB007])
        S = self.n_seeds
        # seed weights w_b[s] / S: all ones with one seed (nothing to resample)
        seed_w = rng.multinomial(S, [1.0 / S] * S, size=resamples) / S if S > 1 else np.ones((resamples, 1))
        self.samples: dict[str, dict[str, np.ndarray]] = {}  # domain -> method -> L_b [B]
        for name, dom in domains.items():
            D = len(dom.tokens)
            require(D >= 1, f"domain {name!r} has no scored documents")
            counts = rng.multinomial(D, [1.0 / D] * D, size=resamples).astype(np.float64)  # [B, D]
            tokens = counts @ dom.tokens.astype(np.float64)  # [B]
            per = {}
            for m in self.methods:
                table = dom.nll[m]
                require(table.shape == (S, D), f"domain {name!r}, method {m!r}: NLL table {table.shape}, want {(S, D)}")
                per_seed = counts @ table.T  # [B, S]
                per[m] = (seed_w * per_seed).sum(axis=1) / tokens
            self.samples[name] = per

    # --- point estimates and resamples -----------------------------------------------------

    def domain_point(self, method: str, domain: str) -> float:
        return self.domains[domain].point(method)

    def part_point(self, method: str, part: str) -> float | None:
        doms = self.parts.get(part) or []
        return float(np.mean([self.domain_point(method, d) for d in doms])) if doms else None

    def part_samples(self, method: str, part: str) -> np.ndarray | None:
        doms = self.parts.get(part) or []
        return np.mean([self.samples[d][method] for d in doms], axis=0) if doms else None

    # --- intervals -------------------------------------------------------------------------

    def domain_ci(self, method: str, domain: str) -> list[float]:
        """95% interval of one domain's perplexity."""
        return percentile_interval(np.exp(self.samples[domain][method]))

    def part_ci(self, method: str, part: str) -> list[float] | None:
        """95% interval of a part's geometric-mean perplexity."""
        s = self.part_samples(method, part)
        return None if s is None else percentile_interval(np.exp(s))

    def ratio(self, a: str, b: str, part: str) -> tuple[float, list[float]] | None:
        """(a/b perplexity ratio, its 95% interval) on a part; None if the part is empty."""
        pa, pb = self.part_point(a, part), self.part_point(b, part)
        if pa is None or pb is None:
            return None
        sa, sb = self.part_samples(a, part), self.part_samples(b, part)
        return math.exp(pa - pb), percentile_interval(np.exp(sa - sb))


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """[lo, hi]: the (1-level)/2 and (1+level)/2 percentiles."""
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def verdict(ci: list[float]) -> str:
    """A claim "a beats b" read from the interval of the ratio a/b."""
    if ci[1] < 1.0:
        return HOLDS
    if ci[0] > 1.0:
        return FAILS
    return UNCLEAR


def compare(boot: Bootstrap, a: str, b: str, claim: str) -> list[dict[str, Any]]:
    """The comparison rows of `a` against `b` on every non-empty part (results.json "comparisons")."""
    rows = []
    for part in ("train", "novel"):
        got = boot.ratio(a, b, part)
        if got is None:
            continue
        ratio, ci = got
        rows.append({"a": a, "b": b, "part": part, "claim": claim, "ratio": ratio, "ci": ci, "verdict": verdict(ci)})
    return rows


# --- compute to match ------------------------------------------------------------------------


def crossing(multiples: list[float], log_ppl: list[float], target: float) -> float | str:
    """The compute multiple at which dense reaches `target` (a log perplexity).

    multiples ascending with log_ppl the dense model's at each (multiple 1 first); interpolated
    linearly in log(multiple) and log(ppl) between the bracketing points. "<k_min" when dense is
    already at or below the target at the smallest multiple, ">k_max" when it never gets there.
    """
    require(len(multiples) == len(log_ppl) >= 1, "need one perplexity per compute multiple")
    if log_ppl[0] <= target:
        return f"<{_fmt_multiple(multiples[0])}"
    for (k0, p0), (k1, p1) in zip(zip(multiples, log_ppl), zip(multiples[1:], log_ppl[1:])):
        if p1 <= target < p0:
            frac = (p0 - target) / (p0 - p1)
            return math.exp(math.log(k0) + frac * (math.log(k1) - math.log(k0)))
    return f">{_fmt_multiple(multiples[-1])}"


def _fmt_multiple(k: float) -> str:
    return f"{k:g}"


def compute_to_match(
    boot: Bootstrap, method: str, dense: dict[float, str], part: str
) -> dict[str, Any] | None:
    """How much compute a dense model needs to equal `method` on a part, with a 95% interval.

    dense: {compute multiple: method name}, multiple 1.0 the compute-matched dense baseline.
    Returns {"multiple": x or "<1"/">k", "ci": [lo, hi] (each a number or such a string),
    "points": {multiple: ppl}}; None when the part is empty.
    """
    ks = sorted(dense)
    target = boot.part_point(method, part)
    if target is None:
        return None
    points = [boot.part_point(dense[k], part) for k in ks]
    point = crossing(ks, points, target)
    t_s = boot.part_samples(method, part)
    d_s = np.stack([boot.part_samples(dense[k], part) for k in ks])  # [K, B]
    draws = [crossing(ks, list(d_s[:, b]), float(t_s[b])) for b in range(d_s.shape[1])]
    lo_k, hi_k = f"<{_fmt_multiple(ks[0])}", f">{_fmt_multiple(ks[-1])}"
    # order the draws: below the range < numbers < above the range, then take percentiles
    key = [(-math.inf if d == lo_k else math.inf if d == hi_k else math.log(d)) for d in draws]
    order = np.sort(np.array(key))
    lo, hi = np.percentile(order, [50 * (1 - LEVEL), 50 * (1 + LEVEL)], method="nearest")

    def back(v: float) -> float | str:
        return lo_k if v == -math.inf else hi_k if v == math.inf else math.exp(v)

    return {"multiple": point, "ci": [back(lo), back(hi)], "points": {_fmt_multiple(k): math.exp(p) for k, p in zip(ks, points)}}
