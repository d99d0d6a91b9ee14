"""Adapter experts against full experts: training tokens/s, training memory and disk per expert.

Two contenders train the same randomly initialised llama base through the one loop
(`elmforest.train.loop.train`) on the same synthetic token batches (fp32). `--size small` (the
default): 4 layers, width 256, 4 heads, context 128, vocabulary 4096 (4.2M parameters, tied
embeddings), 8 x 128 tokens per step, where activations dominate the memory; `--size wide`: 8 layers,
width 512, 8 heads (26M parameters), 2 x 128 tokens per step, where weights, gradients and AdamW
state do (as they do for a pretrained base); `--model DIR`: a real model folder (`elmforest model import`,
e.g. models/smollm2-135m), 2 x 128 tokens per step of its own vocabulary:

    full   every tensor trains (a BTM expert): AdamW state for all parameters, every weight gradient
    lora   `models.adapters.attach` with the default AdapterConfig (r 16, alpha 32, the 7 attention
           and MLP projections of every layer): the base frozen, weight gradients and AdamW state
           for the adapters only (the activation gradients still flow through the frozen base)

Each run is its own subprocess, the two interleaved (full lora, lora full, ...), so its peak
resident memory (ru_maxrss of that child) is its own. Tokens/s is the loop's own figure
(metrics.jsonl's tokens_per_s, one line per step), the median over the steps after the first
`warm-up` ones. "training memory" is the child's peak RSS less its RSS just before `train` was
called (the model built, everything imported): activations, gradients and optimizer state.

Disk per expert: the files an expert needs of its own, the adapter folder (adapter_config.json +
adapter_model.safetensors) against a full model folder (config.json, generation_config.json,
model.safetensors), at this size and, counted without building it, at SmolLM2-135M's shape
(the pretrained base of issue 21: 30 layers, width 576, 9 heads / 3 key-value heads, MLP 1536,
vocabulary 49152, tied; fp32 as `elmforest model import` writes it), where the base has the same
architecture and only the adapter's share of it is what matters.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import record

CONTENDERS = ("full", "lora")
# name -> (layers, width, heads, context, vocab, rows per step): "small" is where activations dominate
# memory, "wide" (25M parameters, 2 rows) where weights, gradients and AdamW state do.
SIZES = {
    "quick": (2, 64, 2, 32, 512, 4),
    "small": (4, 256, 4, 128, 4096, 8),
    "wide": (8, 512, 8, 128, 4096, 2),
}


def child(kind: str, out: Path, size: str, steps: int, warmup: int, model_dir: str | None = None) -> None:
    """One training run in this process; prints a JSON line with its figures."""
    import torch

    from elmforest.models.adapters import AdapterConfig, attach, save_adapter
    from elmforest.models.factory import ModelSpec, build_model, load_model, save_model
    from elmforest.train.loop import train
    from elmforest.train.spec import TrainSpec

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1 if size == "quick" else 2)
    layers, width, heads, context, vocab, rows = SIZES[size]
    if model_dir:
        model = load_model(model_dir).float()
        context, vocab, rows = 128, model.config.vocab_size, 2
    else:
        model = build_model(ModelSpec("llama", layers, width, heads, context, vocab), 0)
    if kind == "lora":
        model = attach(model, AdapterConfig(), seed=0)

    class Batches:  # random tokens; batch i a pure function of i (the sampler protocol)
        def __init__(self) -> None:
            self.i = 0

        def next_batch(self) -> torch.Tensor:
            self.i += 1
            return torch.randint(0, vocab, (rows, context + 1), generator=torch.Generator().manual_seed(self.i))

        def state_dict(self) -> dict:
            return {"i": self.i}

        def load_state_dict(self, state: dict) -> None:
            self.i = state["i"]

    spec = TrainSpec(lr=1e-3, total_steps=steps, log_every=1, checkpoint_every=10**9)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB (peak so far: the set-up)
    train(model, Batches(), spec, out / "run", progress=False)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    tps = sorted(r["tokens_per_s"] for r in lines if r["step"] > warmup)
    expert = out / "expert"
    if kind == "lora":
        save_adapter(model, expert)
    else:
        save_model(model, expert)
    disk = sum(p.stat().st_size for p in expert.iterdir())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"tokens_per_s": tps[len(tps) // 2], "train_mb": rss_peak - rss_before, "peak_mb": rss_peak,
                      "disk": disk, "trainable": trainable}))


def smollm2_shares() -> tuple[int, int]:
    """(adapter parameters, all parameters) of SmolLM2-135M's shape with the default adapter, on the
    meta device (nothing allocated)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from elmforest.models.adapters import AdapterConfig, attach

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)
    with torch.device("meta"):
        model = attach(LlamaForCausalLM(config), AdapterConfig())
    adapter = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) - adapter
    return adapter, total


def main() -> None:
    p = record.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 24; quick 4)")
    p.add_argument("--size", choices=["small", "wide"], default="small", help="the base (module docstring)")
    p.add_argument("--model", help="a model folder to train instead of a random --size base (2 x 128 tokens/step)")
    p.add_argument("--child", choices=CONTENDERS, help=argparse_suppress())
    p.add_argument("--out", help=argparse_suppress())
    a = p.parse_args()
    steps = a.steps or (4 if a.quick else 24)
    warmup = 1 if a.quick else 4
    size = "quick" if a.quick else a.size
    if a.child:
        child(a.child, Path(a.out), size, steps, warmup, a.model)
        return
    repeats = a.repeats or (1 if a.quick else 3)

    def run(kind: str) -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, __file__, "--child", kind, "--out", tmp, "--steps", str(steps), "--size", a.size,
                   *(["--quick"] if a.quick else []), *(["--model", a.model] if a.model else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            return json.loads(out.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    record.interleaved(CONTENDERS, repeats, lambda kind: runs[kind].append(run(kind)) or 0.0)
    med = {c: {k: record.median([r[k] for r in runs[c]]) for k in runs[c][0]} for c in CONTENDERS}
    rows = []
    for c in CONTENDERS:
        rows.append([c, f"{med[c]['trainable']:,.0f}", f"{med[c]['tokens_per_s']:,.0f}",
                     record.spread([r["tokens_per_s"] for r in runs[c]]), f"{med[c]['train_mb']:,.0f}",
                     f"{med[c]['peak_mb']:,.0f}", f"{med[c]['disk'] / 1e6:,.2f}"])
    speed = med["lora"]["tokens_per_s"] / med["full"]["tokens_per_s"]
    memory = med["lora"]["train_mb"] / max(med["full"]["train_mb"], 1e-9)
    peak = med["lora"]["peak_mb"] / med["full"]["peak_mb"]
    disk = med["lora"]["disk"] / med["full"]["disk"]
    adapter, total = smollm2_shares()
    rows.append(["lora / full", "", f"{speed:.2f}x", "", f"{memory:.2f}x", f"{peak:.2f}x", f"{disk:.1%}"])
    table = record.markdown_table(
        ["expert", "trainable params", "train tokens/s (median)", "range", "training memory MB", "peak RSS MB", "disk MB"], rows
    )
    notes = [
        f"targets: tokens/s >= 1.25x ({'met' if speed >= 1.25 else 'not met'}), training memory <= 0.6x "
        f"({'met' if memory <= 0.6 else 'not met'}), disk <= 5% ({'met' if disk <= 0.05 else 'not met'} at this size).",
        "training memory = peak RSS less the RSS before `train` (activations, gradients, AdamW state); peak RSS "
        "includes the interpreter, torch and the model itself, which both contenders share.",
        f"at SmolLM2-135M's shape the default adapter has {adapter:,} parameters against the base's {total:,}: "
        f"{adapter / total:.1%} of a full expert's weights on disk (counted, not saved).",
    ]
    layers, width, heads, context, vocab, rows = SIZES[size]
    base = (f"the model folder {a.model}, 2 x 128 tokens/step" if a.model else
            f"llama {layers} layers x {width}, {heads} heads, context {context}, vocab {vocab}, {rows} x {context} tokens/step"
            f" (size {size})")
    settings = (
        base + f", fp32, AdamW, {steps} steps per run (tokens/s median of the steps after {warmup}), {repeats} interleaved "
        f"repeats, each run its own process with {1 if a.quick else 2} torch threads"
    )
    record.emit("adapters", settings, table, notes, a.quick)


def argparse_suppress() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
