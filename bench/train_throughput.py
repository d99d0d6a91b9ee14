"""Training throughput: elmforest's loop against a bare PyTorch loop and Hugging Face Trainer.

Three contenders train the same `demo` model (GPT-2, 4 layers, width 128, 4 heads, context 128,
vocab 4096: 1.3M parameters) on the same fixed token blocks, batch B x 128 tokens, with AdamW
(betas 0.9/0.95, weight decay 0.1), gradient clipping at 1.0 and a linear warm-up/decay schedule:

    bare       the loop written below: forward, float32 cross-entropy, backward, clip, step
               (the no-overhead reference; nothing logged, no checkpoints)
    elmforest  elmforest.train.loop.train (metrics.jsonl every 10 steps, final checkpoint,
               progress bar off)
    trainer    transformers.Trainer (no logging, no saving, dataloader_num_workers=0,
               use_cpu=True; its default optimizer; labels = input_ids, so it predicts
               127 of the 128 positions; the model runs the same 128)

each in float32 and in bfloat16 autocast, eager and torch.compile'd. Throughput is measured in
steady state: every contender stamps the clock when it fetches a batch, the first W steps
(warm-up; compilation happens there) are dropped, and tokens/s = B*128*steps / seconds over the
rest. "whole call" is tokens over the wall time of the entire call (set-up, optimizer creation,
the final checkpoint for elmforest, accelerate set-up for Trainer).

Achieved FLOP/s = tokens/s * elmforest.models.factory.flops_per_token (6N + 6*L*T*d; Kaplan et al.,
the logits matmul 6*d*V per token left out) as a fraction of a large GEMM's FLOP/s timed in
the same process, in the same dtype.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

import record
from elmforest.config import ModelConfig
from elmforest.models.factory import build_model, flops_per_token, resolve_spec
from elmforest.train.spec import TrainSpec
from elmforest.train.loop import lr_at, train

CONTENDERS = ("bare", "elmforest", "trainer")


# --- the machine's matmul peak -----------------------------------------------------------------


def gemm_peak(n: int, dtype: torch.dtype, repeats: int) -> float:
    """Best FLOP/s of an n x n x n matmul (2*n^3 FLOPs) over `repeats` timed calls."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: oneDNN/MKL pick their kernels here
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# --- data --------------------------------------------------------------------------------------


class FixedSampler:
    """elmforest's Sampler protocol over fixed rows [N, block+1]; stamps the clock per batch."""

    def __init__(self, rows: torch.Tensor, batch: int, stamps: list[float]):
        self.rows, self.batch, self.stamps, self.batches = rows, batch, stamps, 0

    def next_batch(self) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        start = (self.batches * self.batch) % (len(self.rows) - self.batch + 1)
        self.batches += 1
        return self.rows[start : start + self.batch]

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batches = int(state["batches"])


class Blocks(torch.utils.data.Dataset):
    """The same rows for Trainer: input_ids = the first `block` tokens of each row."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i, :-1]}


def stamping_collator(stamps: list[float]):
    def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        stamps.append(time.perf_counter())
        ids = torch.stack([it["input_ids"] for it in items])  # [B, block]
        return {"input_ids": ids, "labels": ids}  # the model shifts labels by one itself

    return collate


# --- the contenders ----------------------------------------------------------------------------


def bare_loop(model: torch.nn.Module, forward: Any, sampler: FixedSampler, spec: TrainSpec) -> None:
    """The reference: exactly the work of a training step and nothing else."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=1e-8)
    model.train()
    for step in range(spec.total_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        batch = sampler.next_batch()
        x, y = batch[:, :-1], batch[:, 1:]  # [B, T] each
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            logits = forward(input_ids=x, use_cache=False).logits  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def trainer_run(model: torch.nn.Module, rows: torch.Tensor, spec: TrainSpec, batch: int, stamps: list[float], out: str) -> str:
    """One transformers.Trainer run of spec.total_steps steps; returns its optimizer's name."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=out,
        max_steps=spec.total_steps,
        per_device_train_batch_size=batch,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        adam_beta1=spec.betas[0],
        adam_beta2=spec.betas[1],
        adam_epsilon=1e-8,
        max_grad_norm=spec.grad_clip,
        lr_scheduler_type="linear",
        warmup_steps=spec.warmup_steps,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_cpu=True,
        bf16=spec.bf16,
        torch_compile=spec.compile,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(rows), data_collator=stamping_collator(stamps))
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
    trainer.train()
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)
    fused = inner.defaults.get("fused") or False
    foreach = inner.defaults.get("foreach")
    return f"{type(inner).__name__}(fused={fused}, foreach={foreach})"


def trainer_available() -> str | None:
    """None if Trainer can run here, else why not (it needs the `accelerate` package)."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return "transformers.Trainer needs `accelerate` (pip install -c constraints.txt 'accelerate>=1.1'); trainer rows skipped"
    return None


# --- measuring ---------------------------------------------------------------------------------


def steady_tokens_per_s(stamps: list[float], warmup: int, tokens_per_step: int) -> float:
    """Tokens/s between the batch fetches of step `warmup` and of the last step (all full steps)."""
    steps = len(stamps) - 1 - warmup
    return tokens_per_step * steps / (stamps[-1] - stamps[warmup])


def main() -> None:
    p = record.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="rows per batch (each row is `context` tokens)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    a = p.parse_args()
    torch.set_num_threads(1 if a.quick else 2)  # quick: a smoke test on a shared machine
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    size, vocab, batch = ("tiny", 512, 4) if a.quick else ("demo", 4096, a.batch)
    warmup, measured = (1, 2) if a.quick else (2, 3)
    repeats = a.repeats or (1 if a.quick else 3)
    compile_modes = [False] if (a.quick or a.no_compile) else [False, True]
    gemm_n = 256 if a.quick else 2048

    mspec = resolve_spec(ModelConfig(size=size), vocab)
    block = mspec.context
    tokens_per_step = batch * block
    steps = warmup + measured + 1  # +1: the last step's end is not stamped
    rows = torch.randint(0, vocab, (batch * steps, block + 1), generator=torch.Generator().manual_seed(0))
    fpt = flops_per_token(build_model(mspec, 0).config, context=block)
    logits_fpt = 6 * mspec.width * vocab
    peaks = {False: gemm_peak(gemm_n, torch.float32, 3), True: gemm_peak(gemm_n, torch.bfloat16, 3)}

    skip_trainer = trainer_available()
    contenders = [c for c in CONTENDERS if not (c == "trainer" and skip_trainer)]
    optimizer_names: set[str] = set()
    table_rows = []
    tmp = tempfile.TemporaryDirectory(prefix="elmforest-bench-")
    runs = iter(range(10**9))
    for compiled in compile_modes:
        for bf16 in (False, True):
            spec = TrainSpec(
                lr=1e-3, warmup_steps=1, total_steps=steps, grad_clip=1.0, bf16=bf16, compile=compiled,
                log_every=10, checkpoint_every=10**6,
            )
            # One model per contender, kept across repeats so a compiled graph is reused.
            models = {c: build_model(mspec, 0) for c in contenders}
            if "trainer" in models:
                models["trainer"].config.use_cache = False  # as elmforest and bare pass use_cache=False
            bare_forward = torch.compile(models["bare"]) if compiled else models["bare"]
            wall: dict[str, list[float]] = {c: [] for c in contenders}

            def run(name: str) -> float:
                stamps: list[float] = []
                t0 = time.perf_counter()
                if name == "bare":
                    bare_loop(models["bare"], bare_forward, FixedSampler(rows, batch, stamps), spec)
                elif name == "elmforest":
                    out = Path(tmp.name) / f"run{next(runs)}"
                    train(models["elmforest"], FixedSampler(rows, batch, stamps), spec, out, progress=False)
                else:
                    optimizer_names.add(trainer_run(models["trainer"], rows, spec, batch, stamps, f"{tmp.name}/hf{next(runs)}"))
                wall[name].append(tokens_per_step * steps / (time.perf_counter() - t0))
                return steady_tokens_per_s(stamps, warmup, tokens_per_step)

            if compiled:  # compile outside the timed repeats (one untimed run each)
                for c in contenders:
                    run(c)
                wall = {c: [] for c in contenders}
            results = record.interleaved(contenders, repeats, run)
            ref, ref_best = record.median(results["bare"]), max(results["bare"])
            for c in contenders:
                tps = record.median(results[c])
                table_rows.append(
                    [
                        c,
                        "bf16" if bf16 else "fp32",
                        "yes" if compiled else "no",
                        f"{tps:,.0f}",
                        record.spread(results[c]),
                        f"{tps / ref:.3f}",
                        f"{max(results[c]) / ref_best:.3f}",
                        f"{100 * tps * fpt / peaks[bf16]:.1f}%",
                        f"{record.median(wall[c]):,.0f}",
                    ]
                )
            print(f"done: {'compiled' if compiled else 'eager'} {'bf16' if bf16 else 'fp32'}", flush=True)
    tmp.cleanup()

    table = record.markdown_table(
        ["loop", "dtype", "compile", "tokens/s (median)", "range", "x bare", "x bare (best runs)", "of GEMM peak", "whole call tokens/s"],
        table_rows,
    )
    notes = [
        f"GEMM peak ({gemm_n}^3, best of 3): fp32 {peaks[False] / 1e9:,.1f} GFLOP/s, bf16 {peaks[True] / 1e9:,.1f} GFLOP/s.",
        f"FLOPs per token {fpt:,} (6N + 6*L*T*d, elmforest.models.factory.flops_per_token); the logits matmul adds "
        f"{logits_fpt:,} more ({100 * logits_fpt / fpt:.0f}%), not counted in 'of GEMM peak'.",
        "x bare: ratio of medians; x bare (best runs): ratio of the fastest repeats (least disturbed by other load).",
        "Steady state: the first %d steps of each run dropped, %d steps timed; whole call: all %d steps plus set-up and teardown." % (warmup, measured, steps),
    ]
    if optimizer_names:
        notes.append(f"Trainer's optimizer: {', '.join(sorted(optimizer_names))}; bare and elmforest: torch AdamW defaults (foreach).")
    if skip_trainer:
        notes.append(skip_trainer)
    if not compile_modes[-1]:
        notes.append("torch.compile rows skipped (--quick or --no-compile).")
    settings = (
        f"model {size} ({sum(p.numel() for p in build_model(mspec, 0).parameters()):,} params), batch {batch}x{block} tokens, "
        f"{steps} steps per run, {repeats} interleaved repeats, torch threads {torch.get_num_threads()}"
    )
    record.emit("train_throughput", settings, table, notes, a.quick)


if __name__ == "__main__":
    main()
