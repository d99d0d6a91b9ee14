"""Recording benchmark results: the machine, the versions, a markdown table, appended to results.md.

Every benchmark script ends with `emit(...)`: it prints the table and, unless `--quick`, appends
it to bench/results.md under a header naming the date, the CPU, the core count, torch,
transformers and python versions and the load average at the start (this is a shared 2-core
machine; the load average says how much other work ran beside the measurement).

Timing rules shared by the scripts: contenders run side by side in one process, interleaved
(A B C, B C A, C A B, ...), several repeats, and the table reports the median with the range.
Ratios between contenders measured this way are far steadier than absolute times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results.md"
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: --quick (tiny sizes, 1 repeat, nothing appended)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, print only (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (median reported)")
    return p


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """CPU, cores, versions, load: one line for the results header."""
    import torch
    import transformers

    return (
        f"{cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}; "
        f"load average at start {LOAD_AT_START:.2f}"
    )


def interleaved(contenders: Sequence[str], repeats: int, run: Callable[[str], float]) -> dict[str, list[float]]:
    """Call run(name) `repeats` times per contender, rotating the order each round -> {name: values}."""
    out: dict[str, list[float]] = {c: [] for c in contenders}
    names = list(contenders)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(run(name))
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    """'min-max' of the repeats (or '-' for a single value)."""
    if len(values) < 2:
        return "-"
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def emit(name: str, settings: str, table: str, notes: Sequence[str], quick: bool) -> None:
    """Print the result block; append it to results.md unless quick."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = "\n".join(
        [
            f"## {name} ({stamp}{', quick' if quick else ''})",
            "",
            f"Machine: {machine_line()}.",
            f"Settings: {settings}.",
            "",
            table,
            "",
            *[f"- {n}" for n in notes],
            "",
        ]
    )
    print(block, flush=True)
    if not quick:
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(block + "\n")
        print(f"(appended to {RESULTS})", file=sys.stderr)
