"""Smoke test of the benchmarks: `bench/run_all.py --quick` runs every script on tiny sizes.

It asserts that each script exits 0, prints its result table, and leaves bench/results.md
untouched (quick runs print only). No timing is asserted: speed claims live in bench/results.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.md"
SCRIPTS = ("train_throughput", "ensemble_cost", "averaging", "generation", "parallel", "adapters", "import_stream")


def test_run_all_quick_prints_every_table_and_appends_nothing():
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for name in SCRIPTS:
        block = out.split(f"## {name} (", 1)
        assert len(block) == 2, f"no result block for {name}:\n{out[-2000:]}"
        table = [line for line in block[1].splitlines() if line.startswith("|")]
        assert len(table) >= 3, f"{name} printed no table"  # header, separator, at least one row
        assert ", quick)" in block[1].splitlines()[0]
    assert "FAILED" not in out
    assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before
