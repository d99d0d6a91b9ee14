"""Parallel training: one expert on 1 vs 2 processes (data-parallel) next to 2 experts at once.

Two ways to use 2 cores for BTM: train one model data-parallel on 2 processes (torch.distributed,
a gradient all-reduce every step), or train 2 experts at once, one process each (no bytes
exchanged at all: the "embarrassingly parallel" part of BTM). Four contenders train `demo`-size
experts (GPT-2, 4 layers, width 128) for the same number of steps through
`elmforest.launch.launchers.run_jobs`, interleaved, in one run:

    1 expert, 1 process       `sequential` launcher, 2 torch threads (the unit of work)
    1 expert, 2 processes     `sequential` with procs_per_job 2: 2 spawned ranks x 1 thread, DDP
    2 experts, 1 process each `local` launcher, 2 worker processes x 1 thread
    2 experts, in turn        `sequential`, 2 threads, one after another

Wall time includes spawning processes and their imports (what a user waits for); "train() s" is
the longest job's own training time, and "train() tokens/s" the model's tokens over it: the
throughput of the loop itself. Ratios are the figures to read: other helpers' jobs share the 2
cores, so absolute times here are noisy (the load average is in the header).

All-reduce bytes per step are measured, not computed: a 2-rank run wraps the model the way the
training loop does (`distributed.data_parallel`) and counts the bytes of every gradient bucket
handed to the all-reduce through a DDP communication hook, over one step of 2 micro-batches (the
first under no_sync). A ring all-reduce then sends and receives about 2(G-1)/G of those bytes per
rank. The job function (`expert_job`) is written here: a demo model trained with
`elmforest.train.loop.train` on a synthetic token array through `elmforest.data.sampler.DomainSampler`
(`experts.train_expert` needs a corpus, a tokenizer and a branched folder, whose set-up would
dominate a benchmark of a few minutes).
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
    from elmforest.models.factory import build_model, resolve_spec
    from elmforest.data.sampler import DomainSampler
    from elmforest.train.spec import TrainSpec
    from elmforest.train.loop import train

    job = json.loads((Path(path) / JOB).read_text())
    spec = resolve_spec(ModelConfig(size=job["size"]), job["vocab"])
    model = build_model(spec, job["seed"])
    tokens = np.random.default_rng(job["seed"]).integers(0, job["vocab"], size=200_000, dtype=np.int64)
    sampler = DomainSampler(tokens, spec.context, job["batch"], seed=job["seed"])
    train_spec = TrainSpec(
        lr=1e-3, warmup_steps=1, total_steps=job["steps"], threads=threads, log_every=10, checkpoint_every=10**6
    )
    return train(model, sampler, train_spec, Path(path) / "run", progress=False)


def allreduce_bytes(size: str, vocab: int, batch: int) -> dict[str, int]:
    """On each of 2 ranks: one step of 2 micro-batches through the loop's DDP wrapper, counting the
    bytes of the gradient buckets all-reduced (a rank function for distributed.run_procs)."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from elmforest.train import distributed
    from elmforest.config import ModelConfig
    from elmforest.models.factory import build_model, resolve_spec

    spec = resolve_spec(ModelConfig(size=size), vocab)
    model = build_model(spec, 0)
    where = distributed.world()
    ddp = distributed.data_parallel(model, torch.device("cpu"), where)
    counted: list[int] = []

    def count(state, bucket):
        counted.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return default_hooks.allreduce_hook(None, bucket)  # the default all-reduce (mean over ranks)

    ddp.register_comm_hook(None, count)
    rows = distributed.shard_rows(batch, where)
    for micro in range(2):
        x = torch.randint(0, vocab, (batch, spec.context + 1), generator=torch.Generator().manual_seed(micro))[rows]
        with ddp.no_sync() if micro == 0 else torch.enable_grad():
            logits = ddp(input_ids=x[:, :-1], use_cache=False).logits
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"bytes": sum(counted), "buckets": len(counted), "params": params}


def main() -> None:
    p = record.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per expert (long enough to amortise spawning)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    from elmforest.train import distributed
    from elmforest.config import LauncherConfig, ModelConfig
    from elmforest.launch.launchers import run_jobs
    from elmforest.models.factory import resolve_spec

    size, vocab, batch, steps = ("tiny", 512, 4, 4) if a.quick else ("demo", 4096, 8, a.steps)
    repeats = a.repeats or (1 if a.quick else 3)
    comm = distributed.run_procs(allreduce_bytes, size, vocab, batch, procs=2, rank_threads=1)

    configs = {  # name -> (experts, processes per expert, threads per process, launcher)
        "1 expert, 1 process": (1, 1, 2, LauncherConfig(kind="sequential", threads_per_worker=2, retries=0)),
        "1 expert, 2 processes (DDP)": (
            1, 2, 1, LauncherConfig(kind="sequential", procs_per_job=2, threads_per_worker=1, retries=0)),
        "2 experts, 1 process each": (2, 1, 1, LauncherConfig(kind="local", workers=2, threads_per_worker=1, retries=0)),
        "2 experts, in turn": (2, 1, 2, LauncherConfig(kind="sequential", threads_per_worker=2, retries=0)),
    }
    tmp = Path(tempfile.mkdtemp(prefix="elmforest-bench-par-"))
    runs = iter(range(10**9))
    inner: dict[str, list[float]] = {c: [] for c in configs}

    def run(name: str) -> float:
        n, _, _, config = configs[name]
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
    tokens_per_expert = batch * resolve_spec(ModelConfig(size=size), vocab).context * steps  # B x context x steps
    wall = {c: record.median(results[c]) for c in configs}
    loop = {c: record.median(inner[c]) for c in configs}
    rows = []
    for name, (n, procs, threads, _) in configs.items():
        per_step = f"{comm['bytes'] / 2**20:.2f} MiB" if procs > 1 else "0"
        rows.append([
            name, n, f"{procs} x {threads}", f"{wall[name]:.1f}", record.spread(results[name], "{:.1f}"),
            f"{loop[name]:.1f}", f"{n * tokens_per_expert / wall[name]:,.0f}", f"{tokens_per_expert / loop[name]:,.0f}",
            per_step,
        ])
    table = record.markdown_table(
        ["contender", "experts", "processes x threads", "wall s (median)", "range", "train() s (longest job)",
         "tokens/s overall (wall)", "train() tokens/s per expert", "all-reduce per step"],
        rows,
    )
    one, ddp, two, turn = configs
    notes = [
        f"One expert on 2 processes vs 1 (train() tokens/s): {loop[one] / loop[ddp]:.2f}x; wall time "
        f"{wall[one] / wall[ddp]:.2f}x (spawning 2 ranks included).",
        f"Two experts at once, one process each, vs one after another (wall): {wall[turn] / wall[two]:.2f}x; "
        f"overall tokens/s of 2 experts at once vs 1 expert on 2 processes: "
        f"{(2 * tokens_per_expert / wall[two]) / (tokens_per_expert / wall[ddp]):.2f}x.",
        f"All-reduce per step, measured by a DDP communication hook: {comm['bytes']:,} B in {comm['buckets']} "
        f"bucket(s), {comm['bytes'] / comm['params']:.2f} B per trainable parameter ({comm['params']:,}: float32 "
        f"gradients, once per step whatever the micro-batch count); a ring all-reduce moves ~2(G-1)/G of it per rank, "
        f"{comm['bytes'] * steps / 2**20:,.0f} MiB over these {steps} steps. Experts exchange 0 bytes.",
        "Absolute times are noisy: other helpers' jobs share this machine's 2 cores (see the load "
        "average); the ratios of interleaved repeats are the figures to read.",
    ]
    settings = (
        f"model {size} (vocab {vocab}), batch {batch} windows x context, {steps} steps per expert, "
        f"{repeats} interleaved repeats"
    )
    record.emit("parallel", settings, table, notes, a.quick)


if __name__ == "__main__":
    main()
