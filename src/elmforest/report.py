"""The study's report: a results table, the cached priors as a heatmap, perplexity against
training compute, and a short reading of the numbers generated from the numbers themselves.

Plots are PNG files written with matplotlib (Agg backend) and linked from `report.md`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from elmforest import storage

# Keys of results.json that are not evaluation rows.
RESERVED_KEYS = ("budget", "recipe", "priors", "unigram", "curves", "timing", "notes")


def geo_mean(ppls: list[float]) -> float | None:
    """Geometric mean of perplexities: the exponent of the mean per-domain NLL (None if empty)."""
    return math.exp(sum(math.log(p) for p in ppls) / len(ppls)) if ppls else None


def method_rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in results.items() if k not in RESERVED_KEYS}


def _fmt_ppl(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def results_table(results: dict[str, Any], markdown: bool = True) -> str:
    """Methods x domains table with means, training FLOPs and inference parameters."""
    rows = method_rows(results)
    if not rows:
        return "(no results)"
    first = next(iter(rows.values()))
    train_d, novel_d = list(first["train"]), list(first["novel"])
    header = ["method", *train_d, "train mean", *novel_d, "novel mean", "train FLOPs", "params at inference"]
    body = []
    for name, r in rows.items():
        body.append(
            [
                name,
                *[_fmt_ppl(r["train"].get(d)) for d in train_d],
                _fmt_ppl(r.get("train_mean")),
                *[_fmt_ppl(r["novel"].get(d)) for d in novel_d],
                _fmt_ppl(r.get("novel_mean")),
                _fmt_sci(r.get("train_flops")),
                f"{r.get('inference_params', 0) / 1e6:.2f}M",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in body)])


def plot_priors(priors: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Heatmap: evaluation domains (rows) x experts (columns), cell = cached prior weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains = list(priors)
    experts = list(next(iter(priors.values())))
    grid = np.array([[priors[d][e] for e in experts] for d in domains])
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(experts), 0.8 + 0.45 * len(domains)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    ax.set_yticks(range(len(domains)), domains)
    for i in range(len(domains)):
        for j in range(len(experts)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if grid[i, j] < 0.6 else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("evaluation domain")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_compute_curves(curves: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Valid perplexity (geometric mean over train domains) against cumulative training FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker=".", label=name)
    ax.set_xlabel("training FLOPs (cumulative, all arms count the seed)")
    ax.set_ylabel("valid perplexity (geometric mean over train domains)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _change(a: float, b: float) -> str:
    """How much lower (better) perplexity a is than b, as a signed percentage."""
    pct = 100.0 * (a - b) / b
    return f"{pct:+.1f}%"


def reading(results: dict[str, Any]) -> list[str]:
    """Sentences comparing the paper's claims with what this run measured."""
    rows = method_rows(results)
    out: list[str] = []

    def cmp(a: str, b: str, claim: str) -> None:
        if a not in rows or b not in rows:
            return
        for split in ("train", "novel"):
            x, y = rows[a].get(f"{split}_mean"), rows[b].get(f"{split}_mean")
            if x is None or y is None or not rows[a][split]:
                continue
            verdict = "holds" if x < y else "does not hold"
            out.append(
                f"- {claim} on {split} domains: `{a}` {_fmt_ppl(x)} vs `{b}` {_fmt_ppl(y)} "
                f"({_change(x, y)}); the paper's claim {verdict} here."
            )

    cmp("btm_ensemble_cached", "dense", "BTM cached-prior ensemble beats the compute-matched dense LM")
    cmp("btm_average_posterior", "btm_average_uniform", "Posterior-weighted averaging beats uniform averaging")
    cmp("btm_average_posterior", "dense", "Posterior-weighted averaging (one model's inference cost) beats dense")
    cmp("btm_ensemble_cached", "random_ensemble_cached", "Domain splits beat random splits")
    if "demix_cached" in rows:
        cmp("btm_ensemble_cached", "demix_cached", "BTM beats DEMix at equal compute")
    uni = results.get("unigram")
    if uni and "dense" in rows and rows["dense"].get("train_mean"):
        out.append(
            f"- The models learn real structure: dense {_fmt_ppl(rows['dense']['train_mean'])} against a "
            f"unigram model's {_fmt_ppl(uni.get('train_mean'))} on the same train-domain test tokens."
        )
    return out


def write_report(run_dir: Path, results: dict[str, Any], title: str = "elmforest study") -> Path:
    """Write OUT/report.md and its plots from results.json's contents."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    parts = [f"# {title}", ""]
    budget = results.get("budget", {})
    if budget:
        parts += [
            "## Budget",
            "",
            "| arm | tokens | training FLOPs |",
            "|---|---|---|",
            *[f"| {arm} | {b.get('tokens', 0):,} | {b.get('flops', 0):.3e} |" for arm, b in budget.get("arms", {}).items()],
            "",
        ]
        if budget.get("notes"):
            parts += [str(budget["notes"]), ""]
    parts += [
        "## Test perplexity",
        "",
        "Means are geometric means over domains (the exponent of the mean per-domain NLL); every method "
        "scores the same test tokens. FLOPs count training only, seed included.",
        "",
        results_table(results),
        "",
    ]
    test_tokens = budget.get("eval_tokens_per_domain") or {}
    prior_windows = budget.get("prior_windows_per_domain") or {}
    if test_tokens:
        wanted = (results.get("recipe") or {}).get("eval", {}).get("prior_sequences")
        parts += [
            "## Evaluation set",
            "",
            "Test tokens scored per domain (the same for every method) and the valid windows the cached "
            "prior saw. A domain with few windows has seen few moving-average steps, so its prior stays "
            "closer to uniform; a domain with few test tokens has a noisier perplexity.",
            "",
            "| domain | test tokens | prior windows |",
            "|---|---|---|",
            *[
                f"| {d} | {n:,} | {prior_windows.get(d, '-')}"
                + (" (fewer than asked)" if wanted and prior_windows.get(d, wanted) < wanted else "")
                + " |"
                for d, n in test_tokens.items()
            ],
            "",
        ]
    for name, prior in (results.get("priors") or {}).items():
        if prior:
            png = plots / f"prior_{name}.png"
            plot_priors(prior, f"cached prior ({name})", png)
            parts += [f"## Cached prior: {name}", "", f"![cached prior {name}](plots/{png.name})", ""]
    curves = results.get("curves")
    if curves:
        png = plots / "ppl_vs_compute.png"
        plot_compute_curves({k: [tuple(p) for p in v] for k, v in curves.items()}, png)
        parts += ["## Perplexity against training compute", "", f"![ppl vs compute](plots/{png.name})", ""]
    lines = reading(results)
    if lines:
        parts += ["## Reading", "", *lines, ""]
    for note in results.get("notes") or []:
        parts.append(f"- {note}")
    path = run_dir / "report.md"
    storage.write_text(path, "\n".join(parts) + "\n")
    return path
