"""The one training loop: AdamW, linear warm-up and decay, gradient accumulation, resumable.

Every run in elmforest (the seed, the dense baseline, each expert, the random-split forest) goes
through `train`. A run folder holds `config.json` + `model.safetensors` (the model, loadable with
`from_pretrained`), `train_state.pt` (everything needed to continue bit-identically),
`metrics.jsonl` (one JSON line per logged step) and `train.json` (spec and status).

Arithmetic of one step (nanoGPT's vocabulary):
    tokens/step = micro_batches * B * block          (each sampler batch is [B, block+1] tokens:
                                                      inputs [:, :-1], next-token targets [:, 1:])
    FLOPs/step  = tokens/step * models.flops_per_token(config, block)    (~6N + 6*L*block*d)
The schedule is defined over `total_steps`; a run may stop early at `stop_at_step` (the seed
checkpoint at a fraction of the budget) and later continue from that checkpoint to `total_steps`,
bit-identically to a run that never stopped.

Routing (DEMix): `train(..., route=fn)` asks the sampler for `next_batch_with_domains()` ->
(tokens [B, block+1], domain ids [B]) and calls `fn(domain_ids)` before each forward, so a model
whose layers depend on the row's domain (`demix.set_domains`) trains in this same loop. The ids
are a pure function of the batch index, like the tokens, so resumption stays bit-identical.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from elmforest import storage
from elmforest.checkpoint import (
    TRAIN_STATE_NAME,
    WEIGHTS_NAME,
    load_train_state,
    load_weights_into,
    save_train_state,
    save_weights,
    verify_weights,
    weights_sha256,
    weights_state_dict,
)
from elmforest.errors import ElmError
from elmforest.models import flops_per_token

METRICS_NAME = "metrics.jsonl"
TRAIN_JSON_NAME = "train.json"
TRAIN_STATE_FORMAT = "elmforest-train-state/1"


@dataclasses.dataclass
class TrainSpec:
    """Hyper-parameters of one training run (flat and typed; the CLI builds it from a recipe)."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of the warm-up."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment coefficients."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices only (every >= 2-D parameter, embeddings included)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from ~0 to `lr`."""
    total_steps: int = 100
    """Steps the schedule is defined over; the learning rate reaches `final_lr_fraction * lr` here."""
    final_lr_fraction: float = 0.1
    """Learning rate at `total_steps`, as a fraction of `lr` (linear decay after the warm-up)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    micro_batches: int = 1
    """Sampler batches (forward/backward passes) accumulated into one optimizer step."""
    bf16: bool = False
    """Run forward passes under torch.autocast(bfloat16); the loss is computed in float32."""
    compile: bool = False
    """torch.compile the model's forward (bit-identical resumption is not guaranteed with it)."""
    threads: int | None = None
    """torch.set_num_threads for this process; None leaves the current setting."""
    log_every: int = 10
    """Steps between lines of metrics.jsonl (the last step is always logged)."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints (the last step is always checkpointed)."""
    eval_every: int = 0
    """Steps between valid-loss evaluations; 0: only at the end. Needs `valid_batches`."""
    seed: int = 0
    """Seeds torch's RNG at the start of a fresh run (dropout-free models draw nothing from it)."""
    device: str = "cpu"
    """torch device to train on, e.g. "cpu" or "cuda"."""

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        checks = [
            (self.lr > 0, "lr", "must be > 0"),
            (all(0 <= b < 1 for b in self.betas), "betas", "must lie in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.total_steps > 0, "total_steps", "must be > 0"),
            (0 <= self.warmup_steps < self.total_steps, "warmup_steps", "must be in [0, total_steps)"),
            (0 <= self.final_lr_fraction <= 1, "final_lr_fraction", "must be in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip", "must be >= 0"),
            (self.micro_batches >= 1, "micro_batches", "must be >= 1"),
            (self.threads is None or self.threads >= 1, "threads", "must be >= 1"),
            (self.log_every >= 1, "log_every", "must be >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1"),
            (self.eval_every >= 0, "eval_every", "must be >= 0"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ElmError(f"train spec {name}={getattr(self, name)!r}: {why}")


class Sampler(Protocol):
    """What `train` needs from a sampler (see `elmforest.sampler`): batch i depends only on (seed, i)."""

    def next_batch(self) -> torch.Tensor: ...  # LongTensor [B, block+1]

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # With `train(route=...)` only: the batch and each row's domain id, (LongTensor [B, block+1], LongTensor [B]).
    # def next_batch_with_domains(self) -> tuple[torch.Tensor, torch.Tensor]: ...


# Called with each batch's per-row domain ids [B] before its forward pass (see the module docstring).
Route = Callable[[torch.Tensor], None]


def lr_at(step: int, spec: TrainSpec) -> float:
    """Learning rate of update number `step` (0-based).

    Warm-up: lr * (step+1)/warmup_steps for step < warmup_steps, so the last warm-up step and
    step == warmup_steps both use the peak. Then linear decay to final_lr_fraction*lr at
    step == total_steps (held there beyond it).
    """
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = min(1.0, (step - spec.warmup_steps) / (spec.total_steps - spec.warmup_steps))
    return spec.lr * (1.0 - (1.0 - spec.final_lr_fraction) * progress)


def make_optimizer(model: torch.nn.Module, spec: TrainSpec) -> torch.optim.AdamW:
    """AdamW with two groups: matrices decay, vectors (biases, norm gains) do not.

    Every >= 2-D parameter decays, the token/position embeddings included (nanoGPT's rule and
    the pilot's); tied tensors appear once in `named_parameters`, so they are one entry.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(0, spec), betas=spec.betas, eps=1e-8)


def _apply_spec_to_optimizer(optimizer: torch.optim.Optimizer, spec: TrainSpec) -> None:
    """A loaded optimizer state carries its own hyper-parameters; this run's spec wins."""
    decays = (spec.weight_decay, 0.0)
    for group, wd in zip(optimizer.param_groups, decays):
        group["betas"] = spec.betas
        group["weight_decay"] = wd


def mean_loss(
    model: torch.nn.Module, batches: Sequence[Any], *, bf16: bool = False, route: Route | None = None
) -> float:
    """Mean next-token cross-entropy (nats) over `batches` ([B, block+1] each), without gradients.

    With `route`, each batch is a pair (tokens [B, block+1], domain ids [B]) and `route(ids)` runs
    before its forward pass."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            if route is not None:
                batch, domains = batch
                route(domains)
            batch = batch.to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=x, use_cache=False).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
    model.train(was_training)
    return total / max(1, len(batches))


def _rng_state() -> dict[str, Any]:
    """All RNG states as weights_only-loadable values (tensors, ints, floats, lists, None)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl that parse (a torn last line from a kill is skipped)."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only the lines up to `step` (a resumed run re-logs the steps after its checkpoint)."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _weights_match(out_dir: Path, state: dict[str, Any]) -> bool:
    """Does out_dir/model.safetensors hold the checkpoint's weights (its stored sha256 agrees)?"""
    try:
        with safe_open(str(out_dir / WEIGHTS_NAME), framework="pt") as f:
            stored = (f.metadata() or {}).get("sha256")
    except (SafetensorError, OSError):
        return False
    return stored == weights_sha256(state["model"])


def _read_train_json(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def train(
    model: torch.nn.Module,
    sampler: Sampler,
    spec: TrainSpec,
    out_dir: str | Path,
    *,
    stop_at_step: int | None = None,
    valid_batches: Sequence[torch.Tensor] | None = None,
    progress: bool = True,
    init_optimizer_state: dict[str, Any] | None = None,
    route: Route | None = None,
) -> dict[str, Any]:
    """Train `model` on `sampler`'s batches up to step `stop_at_step` (default `spec.total_steps`).

    Resumes from `out_dir/train_state.pt` when present (weights, optimizer, step, sampler, RNG);
    a run already finished at that step loads its weights into `model` and returns its stored
    result without training. On return `model` holds the trained weights, also saved in out_dir.
    `init_optimizer_state` (a fresh run only): a dict with "optimizer" and "step", e.g. the seed's
    `load_train_state(...)`; a branched expert then continues the seed's AdamW moments and
    schedule, as in the reference setup. Tokens and FLOPs count what this run folder trained.
    `route` (DEMix): the sampler must have `next_batch_with_domains()`; `route(domain_ids)` runs
    before every forward pass, and `valid_batches` are then (tokens, domain ids) pairs.

    Returns {steps, start_step, tokens, flops, final_loss, final_valid_loss, seconds}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage.clean_stale_temporaries(out_dir)
    target = spec.total_steps if stop_at_step is None else stop_at_step
    if not 0 <= target <= spec.total_steps:
        raise ElmError(f"stop_at_step={stop_at_step} must lie in [0, total_steps={spec.total_steps}]")
    state_path = out_dir / TRAIN_STATE_NAME
    metrics_path = out_dir / METRICS_NAME
    info_path = out_dir / TRAIN_JSON_NAME

    info = _read_train_json(info_path)
    if info and info.get("status") in ("done", "stopped") and info.get("step") == target and state_path.is_file():
        verify_weights(out_dir / WEIGHTS_NAME)
        load_weights_into(model, load_file(out_dir / WEIGHTS_NAME), out_dir / WEIGHTS_NAME)
        return info["result"]

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, spec)

    # ---- where to start: a checkpoint in out_dir, the seed's optimizer state, or scratch
    if state_path.is_file():
        state = load_train_state(state_path)
        if state.get("format") != TRAIN_STATE_FORMAT:
            raise ElmError(f"train state format {state.get('format')!r} is not {TRAIN_STATE_FORMAT!r}", state_path)
        load_weights_into(model, state["model"], state_path)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise ElmError(f"optimizer state does not match the model ({e})", state_path) from None
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"])
        step, start_step = int(state["step"]), int(state["start_step"])
        tokens, flops, seconds = int(state["tokens"]), int(state["flops"]), float(state["seconds"])
        last_loss, valid_loss, valid_step = state["last_loss"], state["valid_loss"], state["valid_step"]
        print(f"continuing {out_dir} from the checkpoint at step {step}", flush=True)
    else:
        state = None
        torch.manual_seed(spec.seed)
        step = 0
        if init_optimizer_state is not None:
            try:
                optimizer.load_state_dict(init_optimizer_state["optimizer"])
            except (ValueError, KeyError) as e:
                raise ElmError(f"initial optimizer state does not match the model ({e})") from None
            step = int(init_optimizer_state["step"])
        start_step, tokens, flops, seconds = step, 0, 0, 0.0
        last_loss, valid_loss, valid_step = None, None, None
    _apply_spec_to_optimizer(optimizer, spec)
    if step > target:
        raise ElmError(f"checkpoint is at step {step}, past the requested stop step {target}", out_dir)
    _truncate_metrics(metrics_path, step)  # the steps after the checkpoint are re-run and re-logged
    # The step whose weights model.safetensors holds; None forces a final save when it is stale.
    checkpoint_step = step if state is not None and _weights_match(out_dir, state) else None
    storage.write_json(
        info_path, {"status": "running", "step": step, "target_step": target, "spec": dataclasses.asdict(spec)}
    )

    def evaluate() -> float:
        return mean_loss(model, valid_batches or [], bf16=spec.bf16, route=route)

    def checkpoint() -> None:
        # train_state.pt carries the weights too, so it alone is a consistent resume point even if
        # a kill lands between it and model.safetensors (the Hugging Face copy, written second).
        save_train_state(
            state_path,
            {
                "format": TRAIN_STATE_FORMAT,
                "step": step,
                "start_step": start_step,
                "tokens": tokens,
                "flops": flops,
                "seconds": seconds + (time.perf_counter() - t_start),
                "last_loss": last_loss,
                "valid_loss": valid_loss,
                "valid_step": valid_step,
                "model": weights_state_dict(model),
                "optimizer": optimizer.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": _rng_state(),
            },
        )
        save_weights(model, out_dir)

    forward = torch.compile(model) if spec.compile else model
    flops_cache: dict[int, int] = {}  # block length -> training FLOPs per token
    t_start = t_log = time.perf_counter()
    tokens_at_log = tokens

    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task("train", total=target, completed=step, info="")
        while step < target:
            lr = lr_at(step, spec)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(spec.micro_batches):
                if route is None:
                    batch = sampler.next_batch().to(device)  # [B, block+1]
                else:  # the model is told each row's domain before the forward (DEMix)
                    batch, domains = sampler.next_batch_with_domains()
                    route(domains)
                    batch = batch.to(device)
                x, y = batch[:, :-1], batch[:, 1:]  # inputs and next-token targets, [B, block] each
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                    logits = forward(input_ids=x, use_cache=False).logits  # [B, block, vocab]
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                (loss / spec.micro_batches).backward()  # the step's gradient = mean over micro-batches
                loss_sum += loss.item()
                block = x.shape[1]
                if block not in flops_cache:
                    flops_cache[block] = flops_per_token(model.config, context=block)
                tokens += x.numel()  # B * block tokens predicted
                flops += flops_cache[block] * x.numel()  # ~(6N + 6*L*block*d) per token
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_loss = loss_sum / spec.micro_batches

            eval_due = step == target or (spec.eval_every > 0 and step % spec.eval_every == 0)
            evaluated = bool(valid_batches) and eval_due
            if evaluated:
                valid_loss, valid_step = evaluate(), step
            if evaluated or step % spec.log_every == 0 or step == target:
                now = time.perf_counter()
                row = {
                    "step": step,
                    "tokens": tokens,
                    "loss": round(last_loss, 6),
                    "lr": lr,
                    "tokens_per_s": round((tokens - tokens_at_log) / max(now - t_log, 1e-9), 1),
                    "flops": flops,
                }
                if evaluated:
                    row["valid_loss"] = round(valid_loss, 6)
                storage.append_line(metrics_path, json.dumps(row))
                t_log, tokens_at_log = now, tokens
            if step % spec.checkpoint_every == 0 or step == target:
                checkpoint()
                checkpoint_step = step
            bar.update(task, completed=step, info=f"loss {last_loss:.3f} lr {lr:.2e}")

    if valid_batches and valid_step != step:  # resumed exactly at the target: still report a valid loss
        valid_loss, valid_step = evaluate(), step
    if checkpoint_step != step:  # nothing trained (e.g. stop_at_step=0 or resumed at the target)
        checkpoint()
    result = {
        "steps": step,
        "start_step": start_step,
        "tokens": tokens,
        "flops": flops,
        "final_loss": last_loss,
        "final_valid_loss": valid_loss,
        "seconds": round(seconds + (time.perf_counter() - t_start), 3),
    }
    status = "done" if step == spec.total_steps else "stopped"
    storage.write_json(
        info_path,
        {"status": status, "step": step, "target_step": target, "spec": dataclasses.asdict(spec), "result": result},
    )
    return result
