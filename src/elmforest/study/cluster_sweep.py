"""The c-BTM cluster sweep in report.md: a table and a plot of perplexity against the number of experts.

Reads results.json["cluster_sweep"] (`study.arms.cbtm.sweep_section`) and the rows it names; dense
(k = 1) and the metadata forest (one expert per train domain, cached prior) are the references.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from elmforest import storage
from elmforest.study.formatting import fmt_ci, fmt_multiple, fmt_ppl

PARTS = ("train", "novel")


def _ctm(entry: dict[str, Any], inference: str, part: str) -> str:
    c = (entry.get("compute_to_match") or {}).get(inference, {}).get(part)
    if not c:
        return "-"
    lo, hi = c["ci"]
    return f"{fmt_multiple(c['multiple'])} [{fmt_multiple(lo)}, {fmt_multiple(hi)}]"


def sweep_table(results: dict[str, Any]) -> str:
    """Markdown: one line per (k, inference) plus the references, train and novel perplexity with 95% intervals."""
    sweep = results["cluster_sweep"]
    lines = ["| experts (k) | inference | experts run per token | routing T | train [95% CI] | novel [95% CI] | "
             "dense compute to match: train | novel |", "|---|---|---|---|---|---|---|---|"]

    def line(k: Any, inference: str, run: Any, t: str, row: dict[str, Any], ctm: tuple[str, str]) -> str:
        return (f"| {k} | {inference} | {run} | {t} | {fmt_ppl(row.get('train_mean'))}{fmt_ci(row.get('train_mean_ci'))} | "
                f"{fmt_ppl(row.get('novel_mean'))}{fmt_ci(row.get('novel_mean_ci'))} | {ctm[0]} | {ctm[1]} |")

    refs = sweep.get("references", {})
    if refs.get("dense") in results:
        lines.append(line(1, "dense", 1, "-", results[refs["dense"]], ("1x", "1x")))
    for k, entry in sweep["k"].items():
        for inference, row in entry["rows"].items():
            t = entry["temperature"].get(inference)
            lines.append(line(k, inference, entry["experts_per_token"][inference], "-" if t is None else f"{t:g}",
                              results[row], (_ctm(entry, inference, "train"), _ctm(entry, inference, "novel"))))
    if refs.get("metadata_forest") in results:
        n = refs.get("metadata_experts", "?")
        lines.append(line(f"{n} (domains)", "metadata forest, cached", n, "-", results[refs["metadata_forest"]], ("", "")))
    return "\n".join(lines)


def plot_sweep(results: dict[str, Any], path: Path) -> None:
    """Train and novel perplexity against k (log axis), one line per inference with 95% intervals,
    dense and the metadata forest as horizontal references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["cluster_sweep"]
    ks = [int(k) for k in sweep["k"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, part in zip(axes, PARTS):
        inferences = list(dict.fromkeys(inf for e in sweep["k"].values() for inf in e["rows"]))
        for inf in inferences:
            pts = [(k, results[e["rows"][inf]]) for k, e in zip(ks, sweep["k"].values()) if inf in e["rows"]]
            pts = [(k, r) for k, r in pts if r.get(f"{part}_mean") is not None]
            if not pts:
                continue
            xs = [k for k, _ in pts]
            ys = [r[f"{part}_mean"] for _, r in pts]
            cis = [r.get(f"{part}_mean_ci") or [y, y] for (_, r), y in zip(pts, ys)]
            err = [[y - c[0] for y, c in zip(ys, cis)], [c[1] - y for y, c in zip(ys, cis)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=f"c-BTM {inf}")
        for ref, style in (("dense", "--"), ("metadata_forest", ":")):
            row = results.get(sweep.get("references", {}).get(ref, ""), {})
            y = row.get(f"{part}_mean")
            if y is not None and math.isfinite(y):
                label = "dense (k = 1)" if ref == "dense" else "metadata forest (cached prior)"
                ax.axhline(y, linestyle=style, color="grey" if ref == "dense" else "black", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("experts (clusters k)")
        ax.set_ylabel(f"test perplexity, {part} domains\n(geometric mean, 95% CI)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def sweep_report(results: dict[str, Any], plots: Path) -> list[str]:
    """report.md's section on the cluster sweep ([] when results.json has none)."""
    sweep = results.get("cluster_sweep")
    if not sweep or not sweep.get("k"):
        return []
    png = Path(plots) / "cluster_sweep.png"
    plot_sweep(results, png)
    return [
        "## Number of experts: c-BTM at several cluster counts",
        "",
        "For each k, the train domains' pooled documents in k clusters (tf-idf, SVD, balanced k-means), k experts "
        "branched from the seed at 1/k of the dense batch each (the same training FLOPs as dense). `cached`: the "
        "forest's cached prior per evaluation domain; `router*`: c-BTM's router (each window's context distance "
        "to the centres, softmax(-d^2/T), top-1, top-2 or all experts), T chosen on the train domains' "
        "validation windows. Compute to match: the multiple of the dense budget at which dense equals the row "
        "(read between the dense multiples trained).",
        "",
        sweep_table(results),
        "",
        f"![cluster sweep](plots/{png.name})",
        "",
    ]
