"""GPU benchmark: 125M training tokens/s and MFU, ensemble scoring for k = 1, 4, 8, averaging time.

    python bench/gpu.py                   # on a CUDA machine; appends to bench/results.md
    python bench/gpu.py --quick --device cpu     # tiny sizes, print only (a smoke test of this script)

Parts (each a row group of one table):

    train      elmforest.train.loop.train on the 125M model (GPT-3 small, vocab 50264, context 1024),
               bf16 autocast, steps of 2 micro-batches of 16 windows (an expert's step in
               recipes/paper-125m.yaml), eager and torch.compile'd. Tokens/s in steady state:
               the clock is stamped at each batch fetch (the loop syncs on loss.item() every
               micro-batch) and the first steps (warm-up, compilation) are dropped.
               MFU = achieved FLOP/s / the GPU's bf16 peak (`elmforest.models.hardware`), with FLOPs
               per token counted two ways: `models.flops_per_token` (6N + 6*L*s*d, what compute
               matching uses) and `models.measured_flops_per_token` (every matmul, the logits
               and the full attention square included: the FLOPs the GPU really does).
    ddp        the same on G ranks of one data-parallel run (`elmforest.train.distributed.run_procs`,
               every visible GPU; --ddp-procs G to choose, e.g. 2 CPU ranks for a smoke test),
               each rank given 16 windows per micro-batch (weak scaling); MFU against G peaks.
               Skipped with a note on one GPU, or where elmforest has no `distributed` module.
    ensemble   evaluate.perplexity tokens/s of one 125M model and of k = 4, 8 expert ensembles
               (float32, as the study scores), against single / k.
    average    averaging.average_folders of 8 saved 125M experts (uniform weights), seconds and
               GB/s of weights read.

Needs `elmforest.models.hardware` (peak_flops, mfu); fails with a message naming it when missing.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import record
from elmforest.combine.averaging import average_folders
from elmforest.config import ModelConfig
from elmforest.combine.ensemble import Ensemble
from elmforest.combine.evaluate import perplexity
from elmforest.models.factory import build_model, flops_per_token, hf_config, measured_flops_per_token, resolve_spec, save_model
from elmforest.train.spec import TrainSpec
from elmforest.train.loop import train
from train_throughput import FixedSampler


def hardware_module():
    """elmforest.models.hardware, imported only when the benchmark runs (it lands with the DDP work)."""
    try:
        from elmforest.models import hardware
    except ImportError as e:
        sys.exit(f"bench/gpu.py needs elmforest.models.hardware (peak_flops, mfu) for the MFU column; not importable here ({e})")
    return hardware


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_row(spec, device, compile_, rows_per_micro, micro, warmup, measured, tmp: Path, ranks: int = 1) -> dict:
    """Steady-state tokens/s of `training.train` and the peak memory it used. With ranks > 1
    (inside a data-parallel group) each micro-batch holds rows_per_micro rows per rank."""
    model = build_model(spec, 0)
    stamps: list[float] = []
    block = spec.context
    gen = torch.Generator().manual_seed(0)
    rows_per_micro *= ranks  # every rank draws the same batch and trains on its 1/ranks of the rows
    n_rows = rows_per_micro * micro * (warmup + measured)
    rows = torch.randint(0, spec.vocab_size, (n_rows, block + 1), generator=gen)
    tspec = TrainSpec(lr=5e-4, total_steps=warmup + measured, warmup_steps=1, grad_clip=0.1, micro_batches=micro,
                      bf16=True, compile=compile_, device=str(device), log_every=10_000, checkpoint_every=10_000)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = tmp / (f"train-{compile_}" if ranks == 1 else "train-ddp")  # rank 0 alone writes there
    train(model, FixedSampler(rows, rows_per_micro, stamps), tspec, out, progress=False)
    if ranks == 1:
        shutil.rmtree(out, ignore_errors=True)
    skip = warmup * micro  # stamps are per micro-batch fetch
    tokens = rows_per_micro * block * (len(stamps) - 1 - skip)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": tokens / (stamps[-1] - stamps[skip]), "peak_gib": peak, "model": model}


def ddp_rank(spec, device_type, rows_per_micro, micro, warmup, measured, tmp: str) -> float:
    """One rank of the data-parallel row (a top-level function: `run_procs` pickles it)."""
    from elmforest.train.distributed import world

    r = train_row(spec, torch.device(device_type), False, rows_per_micro, micro, warmup, measured, Path(tmp),
                  ranks=world().size)
    return r["tokens_per_s"]


def ddp_row(spec, device, procs, rows_per_micro, micro, warmup, measured, tmp: Path) -> tuple[float | None, str]:
    """(global tokens/s, note) of `procs` data-parallel ranks, or (None, why it was skipped)."""
    if procs < 2:
        return None, "ddp: skipped (one GPU visible)" if device.type == "cuda" else "ddp: skipped (no GPU; --ddp-procs 2 for CPU ranks)"
    try:
        from elmforest.train.distributed import run_procs
    except ImportError:
        return None, f"ddp: skipped ({procs} ranks asked, but this elmforest has no elmforest.train.distributed)"
    tps = run_procs(ddp_rank, spec, device.type, rows_per_micro, micro, warmup, measured, str(tmp), procs=procs)
    shutil.rmtree(tmp / "train-ddp", ignore_errors=True)
    return tps, f"ddp: {procs} ranks through elmforest.train.distributed.run_procs"


def ensemble_rows(spec, device, ks, windows, batch, repeats) -> dict[int, list[float]]:
    """Tokens/s of perplexity() for a single model (k=1) and k-expert uniform ensembles."""
    base = build_model(spec, 0).to(device).eval()
    models = [base] + [copy.deepcopy(base) for _ in range(max(ks) - 1)]  # speed does not depend on weights
    gen = torch.Generator().manual_seed(1)
    test = torch.randint(0, spec.vocab_size, (windows, spec.context + 1), generator=gen)
    scorers = {k: (models[0] if k == 1 else Ensemble(models[:k])) for k in ks}
    tokens = windows * spec.context

    def run(name: str) -> float:
        k = int(name)
        sync(device)
        t = time.perf_counter()
        perplexity(scorers[k], test, batch_size=batch)  # float(sum) per batch: synchronous
        return tokens / (time.perf_counter() - t)

    run(str(max(ks)))  # warm-up: kernels, allocator
    results = record.interleaved([str(k) for k in ks], repeats, run)
    scorers.clear()
    del models, base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {int(k): v for k, v in results.items()}


def average_row(spec, n, tmp: Path) -> tuple[float, float]:
    """(seconds, GB of weights read) to average n saved experts with uniform weights."""
    base = build_model(spec, 0)
    dirs = []
    for i in range(n):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.001)  # distinct experts, cheaply
        dirs.append(tmp / f"expert{i}")
        save_model(base, dirs[-1])
    size = sum((d / "model.safetensors").stat().st_size for d in dirs) / 1e9
    t = time.perf_counter()
    average_folders(dirs, [1.0 / n] * n, "weighted", tmp / "average")
    seconds = time.perf_counter() - t
    for d in [*dirs, tmp / "average"]:
        shutil.rmtree(d, ignore_errors=True)
    return seconds, size


def main() -> None:
    p = record.parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device (default cuda; --quick --device cpu for a smoke test)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile training row")
    p.add_argument("--steps", type=int, default=8, help="timed training steps per row (after 2 warm-up steps)")
    p.add_argument("--ddp-procs", type=int, default=None, help="ranks of the data-parallel row (default: the visible GPUs)")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA device here (use --quick --device cpu for a smoke test)")
    hardware = hardware_module()
    size, vocab = ("tiny", 512) if a.quick else ("125m", 50264)
    spec = resolve_spec(ModelConfig(size=size), vocab)
    rows_per_micro, micro = (2, 2) if a.quick else (16, 2)
    warmup, measured = (1, 2) if a.quick else (2, a.steps)
    repeats = a.repeats or (1 if a.quick else 3)
    compile_modes = [False] if (a.quick or a.no_compile) else [False, True]
    ks = (1, 2) if a.quick else (1, 4, 8)
    windows, eval_batch = (4, 2) if a.quick else (32, 16)
    n_average = 2 if a.quick else 8

    peak = hardware.peak_flops(device, torch.bfloat16)
    table_rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="elmforest-gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        analytic = flops_per_token(hf_config(spec), spec.context)
        counted = n_params = first_tps = None
        for compile_ in compile_modes:
            r = train_row(spec, device, compile_, rows_per_micro, micro, warmup, measured, tmp)
            if counted is None:
                counted = measured_flops_per_token(r["model"], spec.context)
                n_params = sum(t.numel() for t in r["model"].parameters())
            tps = r["tokens_per_s"]
            first_tps = first_tps or tps
            table_rows.append([
                "train", f"bf16, {'compiled' if compile_ else 'eager'}, {micro}x{rows_per_micro}x{spec.context} tokens/step",
                f"{tps:,.0f} tokens/s", "-",
                f"{hardware.mfu(tps * analytic, device, torch.bfloat16):.1%}",
                f"{hardware.mfu(tps * counted, device, torch.bfloat16):.1%}",
                f"peak {r['peak_gib']:.1f} GiB" if device.type == "cuda" else "-",
            ])
            del r
        procs = a.ddp_procs if a.ddp_procs is not None else (torch.cuda.device_count() if device.type == "cuda" else 1)
        tps, ddp_note = ddp_row(spec, device, procs, rows_per_micro, micro, warmup, measured, tmp)
        notes.append(ddp_note)
        if tps is not None:
            table_rows.append([
                "ddp", f"{procs} ranks, bf16, eager, {micro}x{rows_per_micro}x{spec.context} tokens/step per rank",
                f"{tps:,.0f} tokens/s", "-",
                f"{hardware.mfu(tps * analytic / procs, device, torch.bfloat16):.1%}",
                f"{hardware.mfu(tps * counted / procs, device, torch.bfloat16):.1%}",
                f"{tps / first_tps:.2f} x one {'GPU' if device.type == 'cuda' else 'process'}",
            ])

        results = ensemble_rows(spec, device, ks, windows, eval_batch, repeats)
        single = record.median(results[1])
        for k in ks:
            tps = record.median(results[k])
            table_rows.append([
                "ensemble" if k > 1 else "score", f"k={k}, float32, batch {eval_batch}x{spec.context}",
                f"{tps:,.0f} tokens/s", record.spread(results[k]), "-", "-",
                f"{tps / (single / k):.2f} x single/k",
            ])
        seconds, gb = average_row(spec, n_average, tmp)
        table_rows.append(["average", f"{n_average} experts, uniform weights, average_folders", f"{seconds:.1f} s",
                           "-", "-", "-", f"{gb / seconds:.2f} GB/s read"])

    table = record.markdown_table(["part", "setting", "result", "range", "MFU (6N+6Lsd)", "MFU (counted)", "notes"],
                                  table_rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    notes = [
        f"device: {name}; bf16 peak {peak / 1e12:,.1f} TFLOP/s (elmforest.models.hardware.peak_flops)"
        + (f"; CUDA {torch.version.cuda}" if device.type == "cuda" else ""),
        f"FLOPs per token at context {spec.context}: {analytic / 1e6:,.1f}M by 6N + 6*L*s*d, "
        f"{counted / 1e6:,.1f}M counted (logits matmul and the full attention square included).",
        *notes,
        "score/ensemble: evaluate.perplexity over the same windows; x single/k = 1.00 means k experts cost k forward passes.",
        "average: the experts are written first (not timed); the time includes writing the averaged folder.",
    ]
    settings = (
        f"model {size} ({n_params:,} params, vocab {vocab}, context {spec.context}), "
        f"{measured} timed steps after {warmup}, {repeats} interleaved repeats for scoring, device {device}"
    )
    record.emit("gpu", settings, table, notes, a.quick)


if __name__ == "__main__":
    main()
