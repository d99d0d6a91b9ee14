"""Run every benchmark, one subprocess each, and report how long each took.

    python bench/run_all.py            # full sizes; each script appends its table to bench/results.md
    python bench/run_all.py --quick    # tiny sizes, 1 repeat, print only (the smoke test)
    python bench/run_all.py --only ensemble_cost generation

Each script also runs alone (`python bench/<name>.py [--quick]`). A failing script does not stop
the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("train_throughput", "ensemble_cost", "averaging", "generation", "parallel", "adapters", "import_stream")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat, nothing appended to results.md")
    p.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these benchmarks")
    a = p.parse_args()
    failed, times = [], []
    for name in a.only or SCRIPTS:
        print(f"=== {name} ===", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, str(BENCH / f"{name}.py"), *(["--quick"] if a.quick else [])])
        times.append(f"{name} {time.perf_counter() - t:.0f}s{'' if rc == 0 else f' (FAILED, exit {rc})'}")
        if rc != 0:
            failed.append(name)
    print("=== done: " + ", ".join(times), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
