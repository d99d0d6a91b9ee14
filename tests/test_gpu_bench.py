"""Smoke test of bench/gpu.py on the CPU: `--quick --device cpu` prints its table, appends nothing.

bench/gpu.py takes the GPU's peak FLOP/s from `elmforest.models.hardware`. Where that module is missing
the script must stop with a message naming it; the rest of the script is then exercised with a
stand-in reporting a 1 TFLOP/s peak (replaced by the real module as soon as it is importable).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.md"
STAND_IN = (
    "import sys, types\n"
    "m = types.ModuleType('elmforest.models.hardware')\n"
    "m.peak_flops = lambda device, dtype=None: 1e12\n"
    "m.mfu = lambda flops_per_second, device, dtype=None: flops_per_second / 1e12\n"
    "sys.modules['elmforest.models.hardware'] = m\n"
)
RUN = (
    "import runpy, sys\n"
    "sys.path.insert(0, 'bench')\n"
    "sys.argv = ['bench/gpu.py', '--quick', '--device', 'cpu']\n"
    "runpy.run_path('bench/gpu.py', run_name='__main__')\n"
)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_bench_quick_on_cpu():
    before = RESULTS.read_bytes()
    have_hardware = importlib.util.find_spec("elmforest.models.hardware") is not None
    if not have_hardware:
        missing = _run(RUN)
        assert missing.returncode == 1 and "needs elmforest.models.hardware" in missing.stderr, missing.stderr[-2000:]
    proc = _run(RUN if have_hardware else STAND_IN + RUN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    block = proc.stdout.split("## gpu (", 1)
    assert len(block) == 2 and ", quick)" in block[1].splitlines()[0]
    rows = [line for line in block[1].splitlines() if line.startswith("| ")][1:]  # past the header
    parts = [r.split("|")[1].strip() for r in rows]
    assert parts == ["train", "score", "ensemble", "average"], parts
    assert all("tokens/s" in r for r in rows[:3]) and " s " in rows[3]
    assert "ddp: skipped" in block[1]
    assert RESULTS.read_bytes() == before
