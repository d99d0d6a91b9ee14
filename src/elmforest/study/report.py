"""The study's report: a results table, the cached priors as a heatmap, perplexity against
training compute, and a short reading of the numbers generated from the numbers themselves.

Plots are PNG files written with matplotlib (Agg backend) and linked from `report.md`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from elmforest import storage
from elmforest.study.formatting import fmt_ci, fmt_multiple, fmt_ppl

# Keys of results.json that are not evaluation rows.
RESERVED_KEYS = (
    "budget", "recipe", "priors", "unigram", "curves", "timing", "notes",
    "comparisons", "compute_to_match", "seeds", "per_seed", "mixing", "opt_out", "cluster_sweep",
)


def method_rows(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in results.items() if k not in RESERVED_KEYS}


def _fmt_sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def _fmt_count(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


def _fmt_bool(x: bool | None) -> str:
    return "-" if x is None else "yes" if x else "no"


def results_table(results: dict[str, Any], markdown: bool = True) -> str:
    """Methods x domains table with means (and their 95% intervals), training FLOPs and inference parameters."""
    rows = method_rows(results)
    if not rows:
        return "(no results)"
    first = next(iter(rows.values()))
    train_d, novel_d = list(first["train"]), list(first["novel"])
    header = ["method", *train_d, "train mean [95% CI]", *novel_d, "novel mean [95% CI]", "train FLOPs", "params at inference"]
    body = []
    for name, r in rows.items():
        body.append(
            [
                name,
                *[fmt_ppl(r["train"].get(d)) for d in train_d],
                fmt_ppl(r.get("train_mean")) + fmt_ci(r.get("train_mean_ci")),
                *[fmt_ppl(r["novel"].get(d)) for d in novel_d],
                fmt_ppl(r.get("novel_mean")) + fmt_ci(r.get("novel_mean_ci")),
                _fmt_sci(r.get("train_flops")),
                f"{(r.get('inference_params') or 0) / 1e6:.2f}M",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in body)])


def seeds_table(results: dict[str, Any]) -> str:
    """Mean and standard deviation over training seeds of each method's train and novel means."""
    per_seed = results.get("per_seed") or {}
    rows = method_rows(results)
    lines = [
        "| method | " + " | ".join(f"seed {s} train / novel" for s in per_seed) + " | mean ± sd train | mean ± sd novel |",
        "|---|" + "---|" * (len(per_seed) + 2),
    ]
    for name, r in rows.items():
        cells = [f"{fmt_ppl(per_seed[s][name]['train_mean'])} / {fmt_ppl(per_seed[s][name]['novel_mean'])}"
                 for s in per_seed if name in per_seed[s]]

        def pm(part: str) -> str:
            sd = r.get(f"{part}_mean_sd")
            return fmt_ppl(r.get(f"{part}_mean")) + ("" if sd is None else f" ± {sd:.1f}")

        lines.append(f"| {name} | " + " | ".join(cells) + f" | {pm('train')} | {pm('novel')} |")
    return "\n".join(lines)


def plot_priors(priors: dict[str, dict[str, float]], title: str, path: Path) -> None:
    """Heatmap: evaluation domains (rows) x experts (columns), cell = cached prior weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains = list(priors)
    experts = list(dict.fromkeys(e for d in domains for e in priors[d]))  # members may differ per domain
    grid = np.array([[priors[d].get(e, 0.0) for e in experts] for d in domains])
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
    # Two lines: on one the label is taller than the 4-inch axes and the figure cuts it off.
    ax.set_ylabel("valid perplexity\n(geometric mean over train domains)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def sweep_table(results: dict[str, Any]) -> str | None:
    """Seed fraction -> validation and test perplexity of its forest's cached-prior ensemble."""
    fractions = (results.get("recipe") or {}).get("arms", {}).get("seed_fractions") or []
    if not fractions:
        return None
    main = (results.get("recipe") or {}).get("budget", {}).get("seed_fraction")
    rows = method_rows(results)
    names = {main: "btm_ensemble_cached", **{f: f"btm_ensemble_cached_seed{f:g}" for f in fractions}}
    lines = ["| seed fraction | valid train | valid novel | test train [95% CI] | test novel [95% CI] |", "|---|---|---|---|---|"]
    for f in sorted(names):
        r = rows.get(names[f])
        if r is None:
            continue
        lines.append(
            f"| {f:g}{' (main)' if f == main else ''} | {fmt_ppl(r.get('valid_train_mean'))} | "
            f"{fmt_ppl(r.get('valid_novel_mean'))} | {fmt_ppl(r.get('train_mean'))}{fmt_ci(r.get('train_mean_ci'))} | "
            f"{fmt_ppl(r.get('novel_mean'))}{fmt_ci(r.get('novel_mean_ci'))} |"
        )
    return "\n".join(lines)


def opt_out_table(domain: str, by_method: dict[str, dict[str, Any]]) -> str:
    """Domain x method: perplexity before -> after (change) when `domain` is opted out."""
    methods = list(by_method)
    domains = list(dict.fromkeys(d for r in by_method.values() for d in r["ppl"]["before"]))
    lines = ["| domain | role | " + " | ".join(f"`{m}` before -> after" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for d in domains:
        role = "removed" if d == domain else "novel" if any(d in r["domains"]["novel"] for r in by_method.values()) else "kept"
        cells = []
        for m in methods:
            ppl = by_method[m]["ppl"]
            b, a = ppl["before"].get(d), ppl["after"].get(d)
            cells.append("-" if b is None or a is None else f"{fmt_ppl(b)} -> {fmt_ppl(a)} ({fmt_change(a, b)})")
        lines.append(f"| {d} | {role} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_change(a: float, b: float) -> str:
    """How much lower (better) perplexity a is than b, as a signed percentage."""
    pct = 100.0 * (a - b) / b
    return f"{pct:+.1f}%"


def reading(results: dict[str, Any]) -> list[str]:
    """One sentence per claim: the two means, the ratio's 95% interval and the verdict read from it."""
    rows = method_rows(results)
    out: list[str] = []
    for c in results.get("comparisons") or []:
        a, b, part = c["a"], c["b"], c["part"]
        x, y = rows[a][f"{part}_mean"], rows[b][f"{part}_mean"]
        lo, hi = c["ci"]
        out.append(
            f"- {c['claim']} on {part} domains: `{a}` {fmt_ppl(x)} vs `{b}` {fmt_ppl(y)} ({fmt_change(x, y)}; ratio "
            f"{c['ratio']:.3f}, 95% CI [{lo:.3f}, {hi:.3f}]): **{c['verdict']}**."
        )
    ctm = results.get("compute_to_match")
    if ctm:
        for part, v in ctm.items():
            if v:
                lo, hi = v["ci"]
                out.append(
                    f"- A dense LM needs {fmt_multiple(v['multiple'])} the compute (95% CI {fmt_multiple(lo)} to "
                    f"{fmt_multiple(hi)}) to match `btm_ensemble_cached` on {part} domains (dense measured at "
                    + ", ".join(f"{k}x: {fmt_ppl(p)}" for k, p in v["points"].items())
                    + "; the paper reports 2.5x at 64 domains)."
                )
    uni = results.get("unigram")
    if uni and "dense" in rows and rows["dense"].get("train_mean"):
        out.append(
            f"- The models learn real structure: dense {fmt_ppl(rows['dense']['train_mean'])} against a "
            f"unigram model's {fmt_ppl(uni.get('train_mean'))} on the same train-domain test tokens."
        )
    return out


def _arm_of(name: str, row: dict[str, Any]) -> str:
    """The arm a results row belongs to (results.json written before rows named it: the method's name)."""
    return row.get("arm") or name


def _is_dense(arm: str) -> bool:
    return arm == "dense" or arm.startswith("dense_x")


def plot_test_compute(results: dict[str, Any], path: Path) -> bool:
    """Test perplexity (train and novel means) against training FLOPs: the dense models at every
    compute multiple as a line, the other methods as points. False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {k: v for k, v in method_rows(results).items() if v.get("train_flops")}
    dense = sorted((v["train_flops"], k) for k, v in rows.items() if _is_dense(_arm_of(k, v)))
    if len(dense) < 2:
        return False
    others = {k: v for k, v in rows.items() if not _is_dense(_arm_of(k, v)) and _arm_of(k, v) != "seed"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4 + 0.12 * len(others)))
    for ax, part in zip(axes, ("train", "novel")):
        xs = [f for f, _ in dense]
        ys = [rows[k][f"{part}_mean"] for _, k in dense]
        if None in ys:
            continue
        ax.plot(xs, ys, marker="o", color="black", label="dense at 1x, 1.5x, ... the compute")
        for i, (name, r) in enumerate(others.items()):  # every other arm's methods, in the registry's order
            if r.get(f"{part}_mean"):
                ax.scatter([r["train_flops"]], [r[f"{part}_mean"]], label=name, zorder=3, marker="osD^v<>ph*"[i // 10 % 10])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(f"test perplexity ({part} domains, geometric mean)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write_report(run_dir: Path, results: dict[str, Any], title: str = "elmforest study",
                 sections: Callable[[dict[str, Any], Path], list[str]] | None = None) -> Path:
    """Write OUT/report.md and its plots from results.json's contents; `sections(results, plots)`
    adds the arms' own parts (`study.arms.report_sections`) before the reading."""
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    parts = [f"# {title}", ""]
    budget = results.get("budget", {})
    if budget:
        parts += [
            "## Budget",
            "",
            "Every trained arm's budget record (RUN/<arm>/arm.json): training tokens and FLOPs, the seed's "
            "included; tokens beyond the shared budget; parameters of every model it runs at inference.",
            "",
            "| arm | tokens | training FLOPs | extra tokens | params at inference | compute-matched |",
            "|---|---|---|---|---|---|",
            *[f"| {arm} | {b.get('tokens', 0):,} | {b.get('flops', 0):.3e} | {_fmt_count(b.get('extra_tokens'))} | "
              f"{_fmt_count(b.get('params_at_inference'))} | {_fmt_bool(b.get('compute_matched'))} |"
              for arm, b in budget.get("arms", {}).items()],
            "",
        ]
        if budget.get("notes"):
            parts += [str(budget["notes"]), ""]
    seeds = results.get("seeds") or []
    resamples = budget.get("bootstrap_resamples")
    parts += [
        "## Test perplexity",
        "",
        "Means are geometric means over domains (the exponent of the mean per-domain NLL); every method "
        "scores the same test tokens, drawn from each domain's whole test split. Intervals are 95% paired "
        f"bootstrap intervals over test documents ({resamples or '?'} resamples"
        + (f", and over the {len(seeds)} training seeds {seeds}; numbers are geometric means over seeds" if len(seeds) > 1 else "")
        + "). FLOPs count training only, seed included.",
        "",
        results_table(results),
        "",
    ]
    if len(seeds) > 1:
        parts += ["## Across training seeds", "", seeds_table(results), ""]
    test_tokens = budget.get("eval_tokens_per_domain") or {}
    prior_windows = budget.get("prior_windows_per_domain") or {}
    documents = budget.get("eval_documents_per_domain") or {}
    split_docs = budget.get("split_documents_per_domain") or {}
    if test_tokens:
        wanted = (results.get("recipe") or {}).get("eval", {}).get("prior_sequences")
        parts += [
            "## Evaluation set",
            "",
            "Test tokens scored per domain (the same for every method), the test documents they come from "
            "(of the split's), and the valid windows the cached prior saw. A domain with few documents has a "
            "wide interval; a domain with few prior windows has seen few moving-average steps, so its prior "
            "stays closer to uniform.",
            "",
            "| domain | test tokens | test documents scored | prior windows |",
            "|---|---|---|---|",
            *[
                f"| {d} | {n:,} | {documents.get(d, '-')} of {split_docs.get(d, '-')} | {prior_windows.get(d, '-')}"
                + (" (fewer than asked)" if wanted and prior_windows.get(d, wanted) < wanted else "")
                + " |"
                for d, n in test_tokens.items()
            ],
            "",
        ]
    sweep = sweep_table(results)
    if sweep:
        parts += [
            "## Seed fraction",
            "",
            "Forests branched from snapshots of the same dense run at several fractions of the budget, each "
            "compute-matched on its own (cached-prior ensembles). Choose by the validation columns (the "
            "ensemble's NLL on the prior's validation windows), not by test.",
            "",
            sweep,
            "",
        ]
    tuned = (results.get("mixing") or {}).get("btm_tuned")
    if tuned:
        parts += [
            "## Mixing chosen on validation data (`btm_ensemble_tuned`)",
            "",
            "Per domain, the grid point with the lowest mixture NLL on the prior's validation windows "
            "(never test); the validation NLL against the plain one-step cached prior's.",
            "",
            "| domain | decay | temperature | floor | seed joins | valid NLL (plain) |",
            "|---|---|---|---|---|---|",
            *[
                f"| {d} | {t['mixing']['decay']:g} | {t['mixing']['temperature']:g} | {t['mixing']['floor']:g} | "
                f"{'yes' if t['mixing']['with_seed'] else 'no'} | {t['valid_nll']:.4f} ({t['baseline_valid_nll']:.4f}) |"
                for d, t in tuned.items()
            ],
            "",
        ]
    for domain, by_method in (results.get("opt_out") or {}).items():
        parts += [
            f"## Opting {domain} out after training",
            "",
            f"The BTM forest without its {domain} expert (`forget`), and the anchored mixture without its {domain} "
            "expert and router row: test perplexity before and after, no retraining.",
            "",
            opt_out_table(domain, by_method),
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
    png = plots / "test_ppl_vs_compute.png"
    if plot_test_compute(results, png):
        parts += ["## Test perplexity against training compute", "", f"![test ppl vs compute](plots/{png.name})", ""]
    if sections is not None:
        parts += sections(results, plots)
    lines = reading(results)
    if lines:
        parts += ["## Reading", "", *lines, ""]
    for note in results.get("notes") or []:
        parts.append(f"- {note}")
    path = run_dir / "report.md"
    storage.write_text(path, "\n".join(parts) + "\n")
    return path
