"""Parallel expert training: the `local` launcher against `sequential` and one expert alone.

Experts train with zero communication, so n experts on n workers should take about as long as
one. Three contenders train `demo`-size experts (GPT-2, 4 layers, width 128) for the same number
of steps through `elmforest.launchers.run_jobs`:

    alone       one expert, `sequential` launcher, 2 torch threads (the unit of work)
    sequential  2 experts one after another in this process, 2 threads each
    local       2 experts in 2 spawned worker processes, 1 thread each (wall time includes
                spawning the workers and their imports)

Speed-up = sequential wall / local wall. The job function (`expert_job` below) is written in
this benchmark: it builds a demo model and trains it with `elmforest.training.train` on a
synthetic token array through `elmforest.sampler.DomainSampler`. `elmforest.phases.train_expert`
does the same work but needs a corpus, a trained tokenizer and a branched expert folder; setting
those up would dominate a benchmark of a few minutes.

Also printed: bytes exchanged between expert trainings (zero: no collective, no shared state
beyond each expert's own folder) against what a data-parallel dense run of the same model on 2
workers would all-reduce: 2 x parameters x 4 bytes of float32 gradients per step (a ring
all-reduce sends and receives about 2(w-1)/w of the gradient bytes per worker; w = 2 here).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import record

JOB = "job.json"


def expert_job(path: str, threads: int | None) -> dict[str, Any]:
    """Train one synthetic expert described by path/job.json (a launcher job: fn(path, threads))."""
    from elmforest.config import ModelConfig
    from elmforest.models import build_model, resolve_spec
    from elmforest.sampler import DomainSampler
    from elmforest.training import TrainSpec, train

    job = json.loads((Path(path) / JOB).read_text())
    spec = resolve_spec(ModelConfig(size=job["size"]), job["vocab"])
    model = build_model(spec, job["seed"])
    tokens = np.random.default_rng(job["seed"]).integers(0, job["vocab"], size=200_000, dtype=np.int64)
    sampler = DomainSampler(tokens, spec.context, job["batch"], seed=job["seed"])
    train_spec = TrainSpec(
        lr=1e-3, warmup_steps=1, total_steps=job["steps"], threads=threads, log_every=10, checkpoint_every=10**6
    )
    return train(model, sampler, train_spec, Path(path) / "run", progress=False)


def main() -> None:
    p = record.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per expert (long enough to amortise spawning workers)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    from elmforest.config import LauncherConfig, ModelConfig
    from elmforest.launchers import run_jobs
    from elmforest.models import build_model, resolve_spec

    size, vocab, batch, steps = ("tiny", 512, 4, 4) if a.quick else ("demo", 4096, 8, a.steps)
    repeats = a.repeats or (1 if a.quick else 2)
    spec = resolve_spec(ModelConfig(size=size), vocab)
    n_params = sum(t.numel() for t in build_model(spec, 0).parameters())

    configs = {
        "alone": (1, LauncherConfig(kind="sequential", threads_per_worker=2, retries=0)),
        "sequential": (2, LauncherConfig(kind="sequential", threads_per_worker=2, retries=0)),
        "local": (2, LauncherConfig(kind="local", workers=2, threads_per_worker=1, retries=0)),
    }
    tmp = Path(tempfile.mkdtemp(prefix="elmforest-bench-par-"))
    runs = iter(range(10**9))
    inner: dict[str, list[float]] = {c: [] for c in configs}

    def run(name: str) -> float:
        n, config = configs[name]
        paths = []
        for i in range(n):
            d = tmp / f"r{next(runs)}-expert{i}"
            d.mkdir()
            (d / JOB).write_text(json.dumps({"size": size, "vocab": vocab, "batch": batch, "steps": steps, "seed": i}))
            paths.append(str(d))
        t = time.perf_counter()
        results = run_jobs(paths, expert_job, config, log=lambda _msg: None)
        wall = time.perf_counter() - t
        inner[name].append(max(r["seconds"] for r in results.values()))
        for d in paths:
            shutil.rmtree(d)
        return wall

    try:
        results = record.interleaved(list(configs), repeats, run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seq, loc, alone = (record.median(results[c]) for c in ("sequential", "local", "alone"))
    rows = []
    for name, (n, config) in configs.items():
        wall = record.median(results[name])
        rows.append([name, n, config.threads_per_worker, f"{wall:.1f}", record.spread(results[name], "{:.1f}"),
                     f"{record.median(inner[name]):.1f}", f"{n * batch * spec.context * steps / wall:,.0f}"])
    table = record.markdown_table(
        ["launcher", "experts", "threads each", "wall s (median)", "range", "longest job's train() s", "tokens/s overall"],
        rows,
    )
    per_step = 2 * n_params * 4
    notes = [
        f"Speed-up of local (2 workers x 1 thread) over sequential (2 threads): {seq / loc:.2f}x; "
        f"local wall / one expert alone: {loc / alone:.2f} (1.0 would be perfect scaling).",
        "Bytes exchanged between the expert trainings: 0 (by construction: each job reads and writes only its own folder).",
        f"A data-parallel dense run of the same model ({n_params:,} parameters) on 2 workers would all-reduce "
        f"2 x {n_params:,} x 4 B = {per_step / 2**20:.1f} MiB of float32 gradients per step, "
        f"{steps * per_step / 2**20:,.0f} MiB over these {steps} steps.",
        "Job function: written in this benchmark (synthetic tokens, elmforest.training.train), run by "
        "elmforest.launchers.run_jobs; see the module docstring.",
    ]
    settings = f"model {size} (vocab {vocab}), batch {batch}x{spec.context} tokens, {steps} steps per expert, {repeats} interleaved repeats"
    record.emit("parallel", settings, table, notes, a.quick)


if __name__ == "__main__":
    main()
