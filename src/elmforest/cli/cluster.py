"""`elmforest corpus cluster`: c-BTM domains discovered by clustering (see `elmforest.cbtm.cluster`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from elmforest.cbtm.cluster import BALANCES, cluster_corpus
from elmforest.console import stdout_console
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError


def corpus_cluster(
    corpus: Path = typer.Argument(..., help="Corpus folder whose documents are clustered."),
    k: int = typer.Option(..., "--k", help="Number of clusters; each becomes a domain cluster0..cluster{k-1}."),
    out: Path = typer.Option(..., "--out", help="New corpus folder to write (must not exist or be empty)."),
    domains: str | None = typer.Option(
        None, "--domains", help="Comma-separated source domains to cluster (default: all of them)."
    ),
    balance: str = typer.Option(
        "tokens", "--balance",
        help="tokens: a cluster holds at most ceil(T/k * (1 + tolerance)) of the T train tokens (c-BTM); "
        "documents: at most ceil(n/k * (1 + tolerance)) of the n train documents.",
    ),
    tokenizer: Path | None = typer.Option(
        None, "--tokenizer",
        help="Tokenizer folder that counts each document's tokens for --balance tokens "
        "(default: UTF-8 bytes, which track a BPE's tokens; cluster.json records which).",
    ),
    tolerance: float = typer.Option(0.1, "--tolerance", help="Balance slack (see --balance)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the SVD and of the k-means++ initialisation."),
    svd_dim: int = typer.Option(100, "--svd-dim", help="Dimensions kept by the truncated SVD of the tf-idf vectors."),
    max_features: int = typer.Option(50000, "--max-features", help="Largest tf-idf vocabulary (most frequent words)."),
    stop_words: bool = typer.Option(
        True, "--stop-words/--no-stop-words", help="Drop English stop words before tf-idf."
    ),
    carry: str | None = typer.Option(
        None, "--carry", help="Comma-separated domains copied unchanged into the new corpus (e.g. novel domains)."
    ),
) -> None:
    """Cluster a corpus into k balanced domains (tf-idf, SVD, balanced k-means) and write it as a new corpus.

    Prints the table of source domain x cluster document counts, each cluster's train size in the balanced unit, and the adjusted Rand index. A document larger than the capacity is placed alone in a cluster of its own.
    """
    if balance not in BALANCES:
        raise ElmError(f"--balance {balance!r} must be one of: {', '.join(BALANCES)}")
    chosen = [d.strip() for d in domains.split(",") if d.strip()] if domains is not None else None
    summary = cluster_corpus(
        Corpus(corpus), chosen, k, out, svd_dim=svd_dim, seed=seed, tolerance=tolerance,
        max_features=max_features, stop_words=stop_words,
        carry=[d.strip() for d in carry.split(",") if d.strip()] if carry else None,
        balance=balance, tokenizer=tokenizer,
    )
    table = Table(title=f"documents per source domain and cluster ({out})")
    table.add_column("domain")
    for name in summary["clusters"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    counts = summary["contingency"]["counts"]
    for name, row in zip(summary["contingency"]["rows"], counts):
        table.add_row(name, *map(str, row), str(sum(row)))
    col_totals = [sum(col) for col in zip(*counts)]
    table.add_row("total", *map(str, col_totals), str(sum(col_totals)), style="bold")
    unit = summary["size_unit"]
    train = summary["train_size"]
    table.add_row(f"train {unit}", *(f"{n:,}" for n in train), f"{sum(train):,}", style="dim")
    console = stdout_console()
    console.print(table)
    console.print(f"balanced by {unit}: at most {summary['capacity']:,} train {unit} per cluster")
    for c in summary["over_capacity"]:
        console.print(f"[yellow]cluster{c} holds {train[c]:,} train {unit}, over the capacity: it holds a "
                      "document larger than the capacity, or documents that fit in no cluster[/yellow]")
    console.print(f"adjusted Rand index vs source domains: {summary['adjusted_rand_index']:.4f}")
    console.print(f"wrote {out} (clusterer in {out / 'clusterer'})")


def register(app: typer.Typer) -> None:
    """Add `cluster` to the `corpus` command group defined in `elmforest.cli.corpus`."""
    from elmforest.cli.corpus import corpus_app  # the `elmforest corpus` group

    corpus_app.command("cluster")(corpus_cluster)
