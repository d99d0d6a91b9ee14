"""A training run folder's bookkeeping around the one loop (`train.loop.train`): what a run resumes
from and what it leaves behind.

    metrics.jsonl   one JSON line per logged step (`Meter`: tokens/s and MFU since the last line)
    train.json      the spec and status ("running", "stopped" at a step, "done") and the result
    train_state.pt  weights, AdamW state, sampler position, every rank's RNG state, `Counters`

`resume` decides where a run starts (its checkpoint, a seed's optimizer state, or scratch) and
`save_checkpoint` writes a consistent resume point (rank 0 alone; train_state.pt before
model.safetensors, so a kill between them still leaves one).

An adapter model (a PeftModel, `models.adapters`) trains on a frozen base that the caller rebuilds:
its run folder holds PEFT's files (adapter_config.json, adapter_model.safetensors) instead of
config.json + model.safetensors, and train_state.pt carries only the adapter's tensors
(`weights_file`, `model_tensors`, `load_model_tensors`, `save_model_files` choose).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from elmforest.train import distributed

from elmforest.models import hardware

from elmforest import storage
from elmforest.models.checkpoint import (
    TRAIN_STATE_NAME,
    WEIGHTS_NAME,
    load_train_state,
    load_weights_into,
    rng_state,
    save_train_state,
    save_weights,
    set_rng_state,
    stored_sha256,
    verify_weights,
    weights_sha256,
    weights_state_dict,
)
from elmforest.models.adapters import (
    ADAPTER_WEIGHTS_NAME,
    adapter_state_dict,
    is_adapter_model,
    load_adapter_weights,
    save_adapter,
)
from elmforest.train.distributed import World
from elmforest.errors import ElmError

from elmforest.train.spec import Sampler, TrainSpec

METRICS_NAME = "metrics.jsonl"
TRAIN_JSON_NAME = "train.json"
TRAIN_STATE_FORMAT = "elmforest-train-state/1"


def weights_file(out_dir: Path, model: torch.nn.Module) -> Path:
    """The run folder's weights: model.safetensors, or adapter_model.safetensors for an adapter model."""
    return out_dir / (ADAPTER_WEIGHTS_NAME if is_adapter_model(model) else WEIGHTS_NAME)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of the model: every tensor, or only the adapter's (the base is frozen)."""
    return adapter_state_dict(model) if is_adapter_model(model) else weights_state_dict(model)


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Put `model_tensors`' output back into `model` (an ElmError naming `source` on a mismatch)."""
    if is_adapter_model(model):
        load_adapter_weights(model, tensors, source)
    else:
        load_weights_into(model, tensors, source)


def save_model_files(model: torch.nn.Module, out_dir: Path) -> str:
    """The loadable copy in the run folder: a Hugging Face model folder, or PEFT's adapter files."""
    return save_adapter(model, out_dir) if is_adapter_model(model) else save_weights(model, out_dir)


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


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the lines up to `step` (a resumed run re-logs the steps after its checkpoint)."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if r["step"] <= step]
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_train_json(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


@dataclasses.dataclass
class Counters:
    """The counters a checkpoint carries and a resumed run continues from."""

    step: int
    start_step: int
    tokens: int = 0
    flops: int = 0
    seconds: float = 0.0  # training time before this call (earlier calls on the same folder)
    last_loss: float | None = None
    valid_loss: float | None = None
    valid_step: int | None = None


def finished_result(out_dir: Path, target: int, model: torch.nn.Module) -> dict[str, Any] | None:
    """A run already finished at `target`: load its weights into `model` and return its stored
    result; else None. The weights must be the ones train.json recorded (a copy assembled from
    an interrupted upload can pair a final train.json with older weights)."""
    info = read_train_json(out_dir / TRAIN_JSON_NAME)
    if not (info and info.get("status") in ("done", "stopped") and info.get("step") == target):
        return None
    weights = weights_file(out_dir, model)
    recorded = info.get("weights_sha256")
    if not (out_dir / TRAIN_STATE_NAME).is_file() or (recorded and stored_sha256(weights) != recorded):
        return None
    verify_weights(weights)
    load_model_tensors(model, load_file(weights), weights)
    return info["result"]


def resume(
    out_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Sampler,
    spec: TrainSpec,
    init_optimizer_state: dict[str, Any] | None,
    where: World,
) -> tuple[Counters, bool]:
    """Where to start: the checkpoint in out_dir, the seed's optimizer state, or scratch.

    Returns (progress, whether model.safetensors already holds the checkpoint's weights)."""
    state_path = out_dir / TRAIN_STATE_NAME
    if not state_path.is_file():
        torch.manual_seed(spec.seed)
        step = 0
        if init_optimizer_state is not None:
            try:
                optimizer.load_state_dict(init_optimizer_state["optimizer"])
            except (ValueError, KeyError) as e:
                raise ElmError(f"initial optimizer state does not match the model ({e})") from None
            step = int(init_optimizer_state["step"])
        return Counters(step=step, start_step=step), False
    state = load_train_state(state_path)
    if state.get("format") != TRAIN_STATE_FORMAT:
        raise ElmError(f"train state format {state.get('format')!r} is not {TRAIN_STATE_FORMAT!r}", state_path)
    ranks = int(state.get("world_size", 1))
    if ranks != where.size:
        raise ElmError(
            f"this checkpoint was written by {ranks} processes and resumes only under {ranks} "
            f"(--procs {ranks} or launcher.procs_per_job: {ranks}), not {where.size}",
            state_path,
        )
    load_model_tensors(model, state["model"], state_path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise ElmError(f"optimizer state does not match the model ({e})", state_path) from None
    sampler.load_state_dict(state["sampler"])
    set_rng_state(state.get("rng_ranks", [state["rng"]])[where.rank])
    progress = Counters(**{f.name: state[f.name] for f in dataclasses.fields(Counters)})
    if where.is_main:
        print(f"continuing {out_dir} from the checkpoint at step {progress.step}", flush=True)
    return progress, stored_sha256(weights_file(out_dir, model)) == weights_sha256(state["model"])


def save_checkpoint(
    out_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: Sampler,
    progress: Counters,
    seconds: float,
    where: World,
) -> None:
    """Every rank sends its RNG state to rank 0, which writes train_state.pt, then model.safetensors.

    train_state.pt carries the weights too, so it alone is a consistent resume point even if a
    kill lands between it and model.safetensors (the Hugging Face copy, written second). The
    model, optimizer and sampler are identical on every rank; the RNG states need not be."""
    rngs = distributed.gather_objects(rng_state())  # a collective: every rank calls it
    if not where.is_main:
        return
    fields = dataclasses.asdict(progress)
    save_train_state(
        out_dir / TRAIN_STATE_NAME,
        {
            "format": TRAIN_STATE_FORMAT,
            **fields,
            "seconds": seconds,
            "world_size": where.size,
            "model": model_tensors(model),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs,
        },
    )
    save_model_files(model, out_dir)


# Called with (run folder, row) after each line of metrics.jsonl this process writes: the one hook
# through which others follow a run live (experiment trackers, `elmforest.train.trackers`) without
# code in the loop. An observer must not raise.
METRICS_OBSERVERS: list[Callable[[Path, dict[str, Any]], None]] = []


class Meter:
    """Rank 0's lines of metrics.jsonl: throughput and MFU over the steps since the previous line;
    each line also goes to every `METRICS_OBSERVERS` callable."""

    def __init__(self, path: Path, progress: Counters, device: torch.device, bf16: bool, where: World):
        self.path, self.where = path, where
        # The device's peak, timed once per process on a CPU; all G ranks' devices count.
        peak = hardware.peak_flops(device, torch.bfloat16 if bf16 else torch.float32) if where.is_main else 0.0
        self.peak = peak * where.size
        self.mark(progress)

    def mark(self, progress: Counters) -> None:
        self.t, self.tokens, self.flops = time.perf_counter(), progress.tokens, progress.flops

    def log(self, progress: Counters, lr: float, evaluated: bool) -> None:
        if not self.where.is_main:
            return
        seconds = max(time.perf_counter() - self.t, 1e-9)
        row = {
            "step": progress.step,
            "tokens": progress.tokens,
            "loss": round(progress.last_loss, 6),
            "lr": lr,
            "tokens_per_s": round((progress.tokens - self.tokens) / seconds, 1),
            "flops": progress.flops,
            "mfu": round((progress.flops - self.flops) / seconds / self.peak, 6),
        }
        if evaluated:
            row["valid_loss"] = round(progress.valid_loss, 6)
        storage.append_line(self.path, json.dumps(row))
        for observe in list(METRICS_OBSERVERS):
            observe(self.path.parent, row)
        self.mark(progress)
