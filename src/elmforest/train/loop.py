"""The one training loop: AdamW, linear warm-up and decay, gradient accumulation, resumable,
data-parallel over G processes.

Every run in elmforest (the seed, the dense baseline, each expert, the random-split forest, DEMix)
goes through `train`. A run folder holds `config.json` + `model.safetensors` (the model, loadable
with `from_pretrained`; for an adapter model, a PeftModel on a frozen base, PEFT's
`adapter_config.json` + `adapter_model.safetensors` instead), `train_state.pt` (everything needed to continue bit-identically),
`metrics.jsonl` (one JSON line per logged step) and `train.json` (spec and status).

Arithmetic of one step (nanoGPT's vocabulary):
    tokens/step = micro_batches * B * block          (each sampler batch is [B, block+1] tokens:
                                                      inputs [:, :-1], next-token targets [:, 1:])
    FLOPs/step  = tokens/step * flops_per_token(block)     (default the dense formula
                                                      models.flops_per_token(config, block),
                                                      ~6N + 6*L*block*d)
    MFU         = FLOPs/step * steps/s / (G * hardware.peak_flops(device))
A model that costs something else per token passes its own `flops_per_token` (a Mixtral runs top-k of
its n expert MLPs, `mixtures.btx`; an anchored expert computes no weight gradients for its frozen
half, `mixtures.anchored_flops`), so metrics.jsonl and train.json count what the arm's run JSON reports.
The schedule is defined over `total_steps`; a run may stop early at `stop_at_step` (the seed
checkpoint at a fraction of the budget) and later continue from that checkpoint to `total_steps`,
bit-identically to a run that never stopped.

Data parallelism (`elmforest.train.distributed`): inside a process group of G ranks, every rank draws
the same sampler batch and keeps rows [r*B/G, (r+1)*B/G) of it; DistributedDataParallel averages
the gradients over the ranks in the backward pass of the step's last micro-batch (`no_sync` on
the others), so every rank holds the gradient of the whole batch's mean loss, as one process
would, and clips and steps identically. That is one all-reduce of the float32 gradient per step:
4 bytes x trainable parameters, whatever the micro-batch count. Tokens and FLOPs count the whole
batch; the logged loss is the mean over all ranks. Rank 0 alone prints and writes metrics.jsonl,
checkpoints (holding every rank's RNG state) and train.json. A checkpoint written by G ranks
resumes under G ranks only.

Devices: with `spec.device` "cuda" each rank trains on cuda:LOCAL_RANK, batches are copied from
pinned memory without blocking, AdamW runs fused, attention is PyTorch's SDPA, and `spec.bf16`
autocasts the forward to bfloat16. Nothing here assumes a CPU.

Routing (DEMix): `train(..., route=fn)` asks the sampler for `next_batch_with_domains()` ->
(tokens [B, block+1], domain ids [B]) and calls `fn(ids of this rank's rows)` before each
forward, so a model whose layers depend on the row's domain (`demix.set_domains`) trains in this
same loop. The ids are a pure function of the batch index, like the tokens, so resumption stays
bit-identical.

Extra loss (BTX): `train(..., extra_loss=ExtraLoss(term, forward_kwargs))` calls the training forward
with `forward_kwargs` added (e.g. output_router_logits=True) and back-propagates
(cross-entropy + term(output)) / micro_batches; the logged loss stays the cross-entropy.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from elmforest.train import distributed

from elmforest.models import hardware

from elmforest import storage
from elmforest.models.adapters import adapter_flops_per_token, is_adapter_model
from elmforest.models.checkpoint import stored_sha256
from elmforest.train.distributed import World
from elmforest.errors import ElmError
from elmforest.models.factory import flops_per_token as dense_flops_per_token
from elmforest.train.spec import ExtraLoss, FlopsPerToken, Route, Sampler, TrainSpec
from elmforest.train.state import (
    METRICS_NAME,
    TRAIN_JSON_NAME,
    Meter,
    finished_result,
    resume,
    save_checkpoint,
    truncate_metrics,
    weights_file,
)



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


def make_optimizer(model: torch.nn.Module, spec: TrainSpec, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with two groups: matrices decay, vectors (biases, norm gains) do not.

    Every >= 2-D parameter decays, the token/position embeddings included (nanoGPT's rule and
    the pilot's); tied tensors appear once in `named_parameters`, so they are one entry.
    `fused`: one kernel for the whole update (what the loop asks for on CUDA).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": spec.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr_at(0, spec), betas=spec.betas, eps=1e-8, fused=fused or None)


def _apply_spec_to_optimizer(optimizer: torch.optim.Optimizer, spec: TrainSpec, fused: bool = False) -> None:
    """A loaded optimizer state carries its own hyper-parameters; this run's spec and device win.

    A state saved by an unfused AdamW keeps its step counters on the CPU; the fused kernel wants
    them as float32 on the parameter's device (and an unfused one takes them anywhere)."""
    decays = (spec.weight_decay, 0.0)
    for group, wd in zip(optimizer.param_groups, decays):
        group["betas"] = spec.betas
        group["weight_decay"] = wd
        group["fused"] = True if fused else None
        if fused:
            group["foreach"] = None
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _loss_sum(
    model: torch.nn.Module, batches: Sequence[Any], bf16: bool, route: Route | None
) -> tuple[float, int]:
    """(sum over `batches` of each batch's mean next-token cross-entropy, number of batches)."""
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
    return total, len(batches)


def mean_loss(
    model: torch.nn.Module, batches: Sequence[Any], *, bf16: bool = False, route: Route | None = None
) -> float:
    """Mean next-token cross-entropy (nats) over `batches` ([B, block+1] each), without gradients.

    With `route`, each batch is a pair (tokens [B, block+1], domain ids [B]) and `route(ids)` runs
    before its forward pass."""
    total, n = _loss_sum(model, batches, bf16, route)
    return total / max(1, n)


def _valid_loss(model: torch.nn.Module, batches: Sequence[Any], bf16: bool, route: Route | None, where: World) -> float:
    """`mean_loss` over all `batches`, each rank scoring every G-th batch: the same number under any G
    (per-batch means summed over the ranks in float64; only the summation order differs)."""
    total, n = _loss_sum(model, list(batches)[where.rank :: where.size], bf16, route)
    device = next(model.parameters()).device
    sums = distributed.all_reduce_sum(torch.tensor([total, float(n)], dtype=torch.float64, device=device))
    return float(sums[0]) / max(1.0, float(sums[1]))


def _prefer_sdpa(model: torch.nn.Module) -> None:
    """PyTorch's scaled-dot-product attention (flash / memory-efficient kernels on GPU).
    transformers 5 already picks it for GPT-2 and Llama; a model set to "eager" is switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "eager" and getattr(model, "_supports_sdpa", False):
        model.set_attn_implementation("sdpa")


def _next_batch(sampler: Sampler, route: Route | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampler's next batch [B, block+1] (and its rows' domain ids [B] when routing)."""
    if route is None:
        return sampler.next_batch(), None
    return sampler.next_batch_with_domains()


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
    extra_loss: ExtraLoss | None = None,
    flops_per_token: FlopsPerToken | None = None,
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
    `extra_loss` (BTX): a term added to every training micro-batch's cross-entropy (not logged,
    not in validation). `flops_per_token(block)`: the model's training FLOPs per token, counted in
    metrics.jsonl and the result (default `models.flops_per_token(model.config, block)`, a dense model,
    or `models.adapters.adapter_flops_per_token` for a PeftModel: the base frozen, adapters trained).
    Inside a torch.distributed process group every rank calls this with the same arguments
    (see the module docstring); each gets the result.

    Returns {steps, start_step, tokens, flops, final_loss, final_valid_loss, seconds}.
    """
    out_dir = Path(out_dir)
    target = spec.total_steps if stop_at_step is None else stop_at_step
    if not 0 <= target <= spec.total_steps:
        raise ElmError(f"stop_at_step={stop_at_step} must lie in [0, total_steps={spec.total_steps}]")
    where = distributed.world()  # rank r of G (0 of 1 outside a process group)
    done = finished_result(out_dir, target, model)
    if done is not None:
        return done

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device = distributed.device_of(spec.device, where)
    _prefer_sdpa(model)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, spec, fused=device.type == "cuda")
    p, weights_saved = resume(out_dir, model, optimizer, sampler, spec, init_optimizer_state, where)
    _apply_spec_to_optimizer(optimizer, spec, fused=device.type == "cuda")
    if p.step > target:
        raise ElmError(f"checkpoint is at step {p.step}, past the requested stop step {target}", out_dir)
    checkpoint_step = p.step if weights_saved else None  # None forces a final save of stale weights
    distributed.barrier()  # every rank has read out_dir before rank 0 writes to it
    if where.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        storage.clean_stale_temporaries(out_dir)
        truncate_metrics(out_dir / METRICS_NAME, p.step)  # the steps after the checkpoint are re-run and re-logged
        storage.write_json(
            out_dir / TRAIN_JSON_NAME,
            {"status": "running", "step": p.step, "target_step": target, "spec": dataclasses.asdict(spec)},
        )

    def evaluate() -> float:
        return _valid_loss(model, valid_batches or [], spec.bf16, route, where)

    def checkpoint() -> None:
        save_checkpoint(out_dir, model, optimizer, sampler, p, p.seconds + time.perf_counter() - t_start, where)

    meter = Meter(out_dir / METRICS_NAME, p, device, spec.bf16, where)
    ddp = distributed.data_parallel(model, device, where, find_unused=route is not None)  # None in a single process
    forward = ddp or model
    if spec.compile:
        forward = torch.compile(forward)
    if flops_per_token is None and is_adapter_model(model):  # frozen base: ~4N_b + 6N_a + 6*L*block*d
        flops_per_token = functools.partial(adapter_flops_per_token, model)
    elif flops_per_token is None:  # a dense model: ~6N + 6*L*block*d per token
        flops_per_token = functools.partial(dense_flops_per_token, model.config)
    flops_cache: dict[int, int] = {}  # block length -> training FLOPs per token
    extra_kwargs = {} if extra_loss is None else dict(extra_loss.forward_kwargs)
    t_start = time.perf_counter()
    meter.mark(p)

    columns = [TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, TimeRemainingColumn(), disable=not (progress and where.is_main)) as bar:
        task = bar.add_task("train", total=target, completed=p.step, info="")
        while p.step < target:
            lr = lr_at(p.step, spec)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(spec.micro_batches):
                batch, domains = _next_batch(sampler, route)  # [B, block+1], the same on every rank
                rows = distributed.shard_rows(batch.shape[0], where)  # this rank's B/G rows
                if route is not None:  # the model is told each row's domain before the forward (DEMix)
                    route(domains[rows])
                x_y = hardware.to_device(batch[rows], device)
                x, y = x_y[:, :-1], x_y[:, 1:]  # inputs and next-token targets, [B/G, block] each
                # The gradient all-reduce runs in the backward of the step's last micro-batch only.
                last = micro == spec.micro_batches - 1
                with ddp.no_sync() if ddp is not None and not last else nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.bf16):
                        out = forward(input_ids=x, use_cache=False, **extra_kwargs)
                    loss = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten())  # logits [B/G, block, vocab]
                    total = loss if extra_loss is None else loss + extra_loss.term(out)
                    (total / spec.micro_batches).backward()  # the step's gradient = mean over micro-batches
                loss_sum += loss.detach()
                block = x.shape[1]
                if block not in flops_cache:
                    flops_cache[block] = flops_per_token(block)
                p.tokens += batch.shape[0] * block  # B * block tokens predicted, over all ranks
                p.flops += flops_cache[block] * batch.shape[0] * block
            if spec.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            p.step += 1
            p.last_loss = distributed.all_reduce_sum(loss_sum).item() / (spec.micro_batches * where.size)

            eval_due = p.step == target or (spec.eval_every > 0 and p.step % spec.eval_every == 0)
            evaluated = bool(valid_batches) and eval_due
            if evaluated:
                p.valid_loss, p.valid_step = evaluate(), p.step
            if evaluated or p.step % spec.log_every == 0 or p.step == target:
                meter.log(p, lr, evaluated)
            if p.step % spec.checkpoint_every == 0 or p.step == target:
                checkpoint()
                checkpoint_step = p.step
            bar.update(task, completed=p.step, info=f"loss {p.last_loss:.3f} lr {lr:.2e}")

    if valid_batches and p.valid_step != p.step:  # resumed exactly at the target: still report a valid loss
        p.valid_loss, p.valid_step = evaluate(), p.step
    if checkpoint_step != p.step:  # nothing trained (e.g. stop_at_step=0 or resumed at the target)
        checkpoint()
    result = {
        "steps": p.step,
        "start_step": p.start_step,
        "tokens": p.tokens,
        "flops": p.flops,
        "final_loss": p.last_loss,
        "final_valid_loss": p.valid_loss,
        "seconds": round(p.seconds + (time.perf_counter() - t_start), 3),
    }
    if where.is_main:
        storage.write_json(
            out_dir / TRAIN_JSON_NAME,
            {
                "status": "done" if p.step == spec.total_steps else "stopped",
                "step": p.step,
                "target_step": target,
                "spec": dataclasses.asdict(spec),
                "weights_sha256": stored_sha256(weights_file(out_dir, model)),
                "result": result,
            },
        )
    distributed.barrier()  # no rank returns before rank 0's files are final
    return result
