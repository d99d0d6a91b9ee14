"""A study's final numbers for its experiment trackers (recipe `logging.report_to`).

At the end of `elmforest run`, one tracker run named `results` joins the study's group
(`elmforest.train.trackers.report`) holding results.json's per-method means as summary metrics
(`<method>/train_mean`, `<method>/novel_mean`, and per claim `<a>_vs_<b>/<part>_ratio` with its
95% interval), the methods table (means and intervals, training FLOPs, parameters at inference)
and the claims as report.md reads them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from elmforest.config import Recipe
from elmforest.study.report import method_rows, reading
from elmforest.train import trackers

COLUMNS = ["method", "train_mean", "train_lo", "train_hi", "novel_mean", "novel_lo", "novel_hi", "train_flops",
           "inference_params"]


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def results_summary(results: dict[str, Any]) -> tuple[dict[str, float], list[str], list[list[Any]], list[str]]:
    """results.json -> (summary metrics, table columns, table rows, claims)."""
    metrics: dict[str, float] = {}
    rows = []
    for name, r in method_rows(results).items():
        if not isinstance(r, dict):
            continue
        row: list[Any] = [name]
        for part in ("train", "novel"):
            mean = _number(r.get(f"{part}_mean"))
            ci = r.get(f"{part}_mean_ci") or [None, None]
            row += [mean, _number(ci[0]), _number(ci[1])]
            if mean is not None:
                metrics[f"{name}/{part}_mean"] = mean
        rows.append(row + [_number(r.get("train_flops")), _number(r.get("inference_params"))])
    for c in results.get("comparisons") or []:
        key = f"{c['a']}_vs_{c['b']}/{c['part']}_ratio"
        metrics[key] = float(c["ratio"])
        metrics[f"{key}_lo"], metrics[f"{key}_hi"] = (float(x) for x in c["ci"])
    claims = [re.sub(r"[`*]", "", line.removeprefix("- ")) for line in reading(results)]
    return metrics, COLUMNS, rows, claims


def report_results(recipe: Recipe, out: Path, results: dict[str, Any]) -> None:
    """The study's results as one tracker run `results` in its group (nothing without `logging.report_to`)."""
    if not recipe.logging.report_to:
        return
    try:
        summary = results_summary(results)
    except (KeyError, TypeError, ValueError) as e:  # a results.json of another shape: the study still stands
        trackers.warn("every", "results", "could not read the results", e)
        return
    trackers.report(recipe, out, "results", *summary)
