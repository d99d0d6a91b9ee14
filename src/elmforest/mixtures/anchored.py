"""Anchored experts (FlexOlmo, Shi et al. 2025): each domain's feed-forward copy trained beside the frozen seed.

FlexOlmo trains every data owner's expert as a 2-expert mixture next to a *frozen* public model,
so that experts trained apart stay compatible and merge into one mixture-of-experts without joint
training (`elmforest.mixtures.anchored_moe`). Here the public model is the study's seed (RUN/seed, llama
family) and the owners are the train domains. An anchored expert, in every layer:

    out(h) = w_0 * FFN_seed(h) + w_1 * FFN_d(h),    [w_0, w_1] = softmax([r_seed . h, r_d . h])

FFN_seed and r_seed frozen (the seed's MLP and its router row), FFN_d (a copy of the seed's MLP) and
r_d trained; attention, embeddings, norms and the (tied) lm_head frozen. Both experts run on every
token (top-2 of 2, as FlexOlmo trains its experts); h is the post-attention RMSNorm output [B, T, H].

Router rows. FlexOlmo initialises each expert's row from a domain embedding and trains it with the
expert (the public row frozen); the merged router is the concatenation of the trained rows. Our
domain embedding is the seed's own router input, each layer's post-attention RMSNorm output,
averaged over `embed_windows` random windows of the domain's train split and scaled to unit length;
the seed's row is the same over every train domain pooled (equal windows each: the seed's own
domain-balanced data, FlexOlmo's "public" embedding). FlexOlmo embeds documents with an external
encoder (GritLM, as wide as its model); the seed's hidden states need no second model and live in
the space the router reads.

Budget: the BTM experts' (`budget.plan_budget`): total_steps - seed_steps steps of B/n tokens, the
very batches of the domain's BTM expert (same sampler seed). Optimiser: a fresh AdamW over the
trainable tensors (FlexOlmo also starts its experts' optimiser fresh). Schedule, FlexOlmo's shape: a
new warm-up (the recipe's warm-up steps) to the learning rate at which the seed's schedule stood,
lr_at(seed_steps), then linear decay (FlexOlmo: cosine) to the BTM experts' final learning rate.
Weight decay: the recipe's, as for BTM experts. (FlexOlmo uses none: it freezes the public half of
a fused expert tensor by zeroing its gradient, which decoupled decay would still move. Our frozen
parts are separate tensors outside the optimiser, bit-identical whatever the decay.) No load-
balancing loss (FlexOlmo's weight is 0); its z-loss and learned non-positive per-expert router bias
are left out (a Mixtral router has no bias).

On disk, EXPERT = RUN/anchored_experts/<domain>/: job.json and router_init.safetensors (the branch),
train/ (the training run of the one loop, `training.train`, resumable bit-identically: the seed's
llama modules with an `AnchoredMLP` per layer), then the 2-expert Mixtral folder (config.json,
model.safetensors: expert 0 the seed's MLP, expert 1 the copy, router rows [r_seed; r_d], top-2)
that `from_pretrained` loads, the tokenizer files, and anchored.json last.

Compute: `anchored_flops` (`elmforest.mixtures.anchored_flops`) counts what one training step really costs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import MixtralForCausalLM, PreTrainedModel

from elmforest.train import distributed
from elmforest.train.budget import plan_budget, resolve_device
from elmforest import __version__, storage
from elmforest.mixtures import btx
from elmforest.mixtures.anchored_flops import step_flops_per_token
from elmforest.btm.experts import expert_job, job_valid_batches
from elmforest.btm.jobs import ANCHORED_RUNNER, JOB_JSON, AnchoredJob, read_job, write_job
from elmforest.btm.seed import SEED_JSON, model_context, seed_dir
from elmforest.launch import remote
from elmforest.models.checkpoint import save_weights, write_safetensors
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError, require
from elmforest.combine.forest import read_json
from elmforest.models.factory import arch_hash, copy_tokenizer_files, load_model
from elmforest.data.sampler import DomainSampler
from elmforest.data.tokenizer import tokenizer_hash
from elmforest.data.tokens import token_array
from elmforest.train.spec import TrainSpec
from elmforest.train.loop import lr_at, train
from elmforest.train import trackers

ANCHORED_DIR = "anchored_experts"
ANCHORED_JSON = "anchored.json"  # written last: the expert is trained and exported
ANCHORED_FORMAT = "elmforest-anchored/1"
ROUTER_INIT = "router_init.safetensors"  # {"seed": [L, H], "domain": [L, H]}: the rows it started from
TRAIN_DIR = "train"
EMBED_WINDOWS = 64
EMBED_SEED = 20250709  # the embedding windows' sampler seed (offset by optim.seed); any fixed number


class AnchoredMLP(nn.Module):
    """One layer's 2-expert mixture: the seed's MLP (frozen) beside a trainable copy.

    forward: h [B, T, H] -> sum_i w_i * FFN_i(h), w = softmax over the two router logits
    [r_seed . h, r_d . h] in float32 (as Mixtral's router computes it). The rows are 1-D [H]
    tensors, so `training.make_optimizer` puts r_d in its no-decay group (a router is not decayed).
    """

    def __init__(self, seed_mlp: nn.Module, seed_row: torch.Tensor, domain_row: torch.Tensor):
        super().__init__()
        self.seed = seed_mlp.requires_grad_(False)
        self.expert = copy.deepcopy(seed_mlp).requires_grad_(True)
        self.seed_row = nn.Parameter(seed_row.detach().clone().float(), requires_grad=False)
        self.expert_row = nn.Parameter(domain_row.detach().clone().float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = torch.stack([self.seed_row, self.expert_row])  # [2, H]
        w = F.softmax(F.linear(h, rows.to(h.dtype)).float(), dim=-1).to(h.dtype)  # [B, T, 2]
        return w[..., :1] * self.seed(h) + w[..., 1:] * self.expert(h)


def check_llama(model: PreTrainedModel, source: str | Path) -> None:
    kind = getattr(model.config, "model_type", type(model).__name__)
    if kind != "llama":
        raise ElmError(
            f"anchored experts need a llama-family seed (its MLP maps onto a Mixtral expert); this one is {kind!r}: "
            "train the study with model.family: llama",
            source,
        )
    for field in ("mlp_bias", "attention_bias"):
        require(not getattr(model.config, field, False), f"anchored experts: Mixtral has no biases, the seed has {field}=true", source)


def anchor(seed: PreTrainedModel, seed_rows: torch.Tensor, domain_rows: torch.Tensor) -> PreTrainedModel:
    """Turn the llama `seed` (in place) into an anchored expert; rows [L, H] start the routers.

    Afterwards only each layer's `mlp.expert.*` and `mlp.expert_row` require gradients.
    """
    layers = seed.model.layers
    require(seed_rows.shape == domain_rows.shape == (len(layers), seed.config.hidden_size), "router rows must be [layers, hidden]")
    seed.requires_grad_(False)
    for i, layer in enumerate(layers):
        layer.mlp = AnchoredMLP(layer.mlp, seed_rows[i], domain_rows[i])
    return seed


def to_mixtral(model: PreTrainedModel) -> MixtralForCausalLM:
    """The anchored expert as a 2-expert, top-2 MixtralForCausalLM (CPU, float32): expert 0 the seed's
    MLP, expert 1 the trained copy, router rows [r_seed; r_d]; every other tensor as it is."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    layers = model.config.num_hidden_layers
    shared = {k: v for k, v in state.items() if ".mlp." not in k}
    mlps = []
    for which in ("seed", "expert"):
        llama_names = {
            f"model.layers.{i}.mlp.{p}.weight": state[f"model.layers.{i}.mlp.{which}.{p}.weight"]
            for i in range(layers) for p in ("gate_proj", "up_proj", "down_proj")
        }
        mlps.append(btx.llama_mlps(llama_names, layers))
    routers = [torch.stack([state[f"model.layers.{i}.mlp.seed_row"], state[f"model.layers.{i}.mlp.expert_row"]]) for i in range(layers)]
    return btx.assemble_mixtral(btx.mixtral_config(model.config, 2, 2), shared, mlps, routers)


# ---------------------------------------------------------------------------------------------
# Router rows from domain embeddings


@torch.no_grad()
def router_input_means(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean of each layer's MLP input (the router's input) over every position of `windows`
    [N, T+1] (inputs [:, :-1]) -> float64 [L, H]."""
    layers = model.model.layers
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float64)
    count = 0

    def keep(i: int):
        def hook(module, args):
            sums[i] += args[0].double().sum(dim=(0, 1)).cpu()

        return hook

    handles = [layer.mlp.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            x = batch[:, :-1].to(device)
            model(input_ids=x, use_cache=False)
            count += x.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums / count


def domain_embeddings(
    seed: PreTrainedModel, windows: dict[str, torch.Tensor], batch_size: int = 8
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the seed's router rows, each domain's) [L, H] float32, every row of unit length.

    windows: the same number of windows per domain; the seed's rows are the mean over all of them.
    """
    sizes = {len(w) for w in windows.values()}
    require(len(sizes) == 1, "domain embeddings need the same number of windows from every domain")
    means = {d: router_input_means(seed, w, batch_size) for d, w in windows.items()}
    pooled = torch.stack(list(means.values())).mean(dim=0)  # equal windows: the mean over all of them

    def unit(v: torch.Tensor) -> torch.Tensor:
        return (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)).float()

    return unit(pooled), {d: unit(m) for d, m in means.items()}


# ---------------------------------------------------------------------------------------------
# Branch and train


def anchored_dir(run_dir: Path) -> Path:
    return Path(run_dir) / ANCHORED_DIR


def anchored_schedule(spec: TrainSpec, seed_steps: int) -> TrainSpec:
    """The anchored experts' TrainSpec from the BTM experts' (`experts.expert_job`'s spec over
    the whole budget): total_steps - seed_steps steps, warm-up to the seed's current learning rate
    lr_at(seed_steps) (the peak if the seed stopped inside its warm-up), linear decay to lr * final_lr_fraction."""
    steps = spec.total_steps - seed_steps
    peak = lr_at(max(seed_steps, spec.warmup_steps), spec)
    final = spec.lr * spec.final_lr_fraction
    return dataclasses.replace(
        spec, lr=peak, total_steps=steps, warmup_steps=min(spec.warmup_steps, steps - 1),
        final_lr_fraction=min(1.0, final / peak),
    )


def anchored_job(recipe: Recipe, run_dir: Path, domain: str, embed_windows: int) -> AnchoredJob:
    """job.json of the domain's anchored expert: the BTM expert's job (data, batch, sampler seed,
    validation) with the anchored schedule and a fresh optimiser."""
    btm = expert_job(recipe, run_dir, domain, {"kind": "domain", "domain": domain})
    budget = plan_budget(recipe, btm.context)
    return AnchoredJob(
        **{**dict(btm), "runner": ANCHORED_RUNNER, "spec": anchored_schedule(btm.spec, budget.seed_steps),
           "start_step": 0, "init_state": None},
        embed_windows=embed_windows,
    )


def branch_anchored(expert_dir: Path, job: AnchoredJob, seed_rows: torch.Tensor, domain_rows: torch.Tensor) -> Path:
    """Create EXPERT/ (atomically): tokenizer files, router_init.safetensors, job.json. A branched
    folder (job.json present) is left as it is."""
    expert_dir = Path(expert_dir)
    if (expert_dir / JOB_JSON).is_file():
        return expert_dir
    if expert_dir.exists():
        shutil.rmtree(expert_dir)  # an interrupted branch: job.json is written last
    with storage.atomic_dir(expert_dir) as tmp:
        copy_tokenizer_files(job.tokenizer, tmp)
        write_safetensors({"seed": seed_rows.contiguous(), "domain": domain_rows.contiguous()}, tmp / ROUTER_INIT)
        write_job(tmp, job)
    return expert_dir


def zero_anchored(seed: PreTrainedModel) -> PreTrainedModel:
    """An anchored copy of the llama `seed` with zero router rows (for counting FLOPs; the seed is untouched)."""
    check_llama(seed, "seed")
    zeros = torch.zeros(seed.config.num_hidden_layers, seed.config.hidden_size)
    return anchor(copy.deepcopy(seed), zeros, zeros)


def train_anchored_expert(expert_dir: str, threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Train the anchored expert in `expert_dir` (job.json) and export it; returns anchored.json's
    contents. Idempotent and resumable like `experts.train_expert`: a launcher job function.
    Inside a process group every rank trains (data-parallel); rank 0 alone exports, counts FLOPs
    and writes, and every rank returns its record."""
    expert_dir = Path(expert_dir)
    done = expert_dir / ANCHORED_JSON
    if done.is_file():
        return read_json(done, ANCHORED_JSON)
    job = read_job(expert_dir, AnchoredJob)
    corpus, tok, domain = Corpus(job.corpus), Path(job.tokenizer), job.domain
    sampler = DomainSampler(
        token_array(corpus, tok, domain, "train"), job.context, job.batch_blocks, job.sampler_seed, name=domain
    )
    valid = job_valid_batches(job, corpus, [domain])
    spec = job.train_spec(threads)
    seed = load_model(job.seed_checkpoint)
    check_llama(seed, job.seed_checkpoint)
    rows = load_file(str(expert_dir / ROUTER_INIT))
    model = anchor(seed, rows["seed"], rows["domain"])
    # metrics.jsonl counts the anchored expert's training FLOPs per token, anchored.json's "flops" figure.
    per_token = functools.partial(step_flops_per_token, model.config, anchored=True, convention="kaplan")
    with trackers.following(job.recipe):
        result = train(
            model, sampler, spec, expert_dir / TRAIN_DIR, valid_batches=valid, progress=progress, flops_per_token=per_token
        )
    meta = None
    if distributed.is_main():  # under G data-parallel ranks only rank 0 exports, counts and writes
        meta = export_anchored(expert_dir, job, spec, model, sampler.array, result)
    return distributed.gather_objects(meta)[0]  # rank 0's record on every rank, once it is written


def export_anchored(
    expert_dir: Path, job: AnchoredJob, spec: TrainSpec, model: PreTrainedModel, train_tokens: Any, result: dict[str, Any]
) -> dict[str, Any]:
    """Write the trained anchored `model` as EXPERT/'s 2-expert Mixtral with the tokenizer files,
    count one training step's FLOPs, and write anchored.json last; returns its contents."""
    from elmforest.mixtures.anchored_flops import anchored_training_flops

    tok, domain = Path(job.tokenizer), job.domain
    model.cpu()
    moe = to_mixtral(model)
    save_weights(moe, expert_dir)  # config.json + model.safetensors: the 2-expert Mixtral
    copy_tokenizer_files(tok, expert_dir, overwrite=False)
    # FLOPs of one real training step (a fresh sampler's first batch, one window), counted.
    window = DomainSampler(train_tokens, job.context, 1, job.sampler_seed, name=domain).next_batch()
    seed = load_model(job.seed_checkpoint)
    fl = anchored_training_flops(seed, zero_anchored(seed), window)
    tokens = result["tokens"]
    meta = {
        "format": ANCHORED_FORMAT,
        "name": job.name,
        "domain": domain,
        "kind": "anchored",
        "experts": ["seed", domain],
        "top_k": 2,
        "trained": ["model.layers.*.mlp.experts[1] (the domain's MLP copy)", "model.layers.*.mlp.gate.weight[1] (its router row)"],
        "frozen": ["model.layers.*.mlp.experts[0] (the seed's MLP)", "model.layers.*.mlp.gate.weight[0] (the seed's row)",
                   "attention", "embeddings", "norms", "lm_head"],
        "router_init": {"kind": "domain_embedding", "windows": job.embed_windows, "file": ROUTER_INIT},
        "seed_checkpoint": job.seed_checkpoint,
        "tokens": tokens,
        "steps": result["steps"],
        "schedule": {k: getattr(spec, k) for k in ("lr", "warmup_steps", "total_steps", "final_lr_fraction", "weight_decay")},
        # The study's FLOPs axis (Kaplan's convention, `models.flops_per_token`), and the counter's.
        "flops": tokens * fl["kaplan"]["anchored"],
        "flops_measured": tokens * fl["measured"]["anchored"],
        "flops_btm_expert": tokens * fl["kaplan"]["btm_expert"],  # the same tokens through a BTM expert
        "flops_per_token": fl,
        "final_loss": result["final_loss"],
        "final_valid_loss": result["final_valid_loss"],
        "seconds": result["seconds"],
        "tokenizer_hash": tokenizer_hash(tok),
        "arch_hash": arch_hash(moe.config),
        "elmforest_version": __version__,
        "recipe": job.recipe,
    }
    storage.write_json(expert_dir / ANCHORED_JSON, meta)
    return meta


def embedding_windows(corpus: Corpus, tokenizer_dir: Path, domains: list[str], context: int, windows: int, seed: int) -> dict[str, torch.Tensor]:
    """`windows` random windows [windows, context+1] of each domain's train split (batch 0 of a DomainSampler)."""
    return {
        d: DomainSampler(token_array(corpus, tokenizer_dir, d, "train"), context, windows, seed, name=d).next_batch()
        for d in domains
    }


def train_anchored_experts(
    recipe: Recipe, run_dir: Path, log: Callable[[str], Any] = print, *, embed_windows: int = EMBED_WINDOWS
) -> list[Path]:
    """Branch and train one anchored expert per train domain from RUN/seed into
    RUN/anchored_experts/<domain>/, with the recipe's launcher; returns the folders in train-domain
    order. Resumable: branched folders are kept, trained ones (anchored.json) skipped, the rest
    continue from their checkpoints. With launcher.storage, the folders sync under
    STORAGE/anchored_experts/ (apart from the BTM experts' folders of the same names)."""
    from elmforest.launch.launchers import run_jobs

    require(embed_windows >= 1, f"embed_windows must be >= 1, got {embed_windows}")
    run_dir = Path(run_dir)
    seed_path = seed_dir(run_dir)
    read_json(seed_path / SEED_JSON, "seed.json")  # the seed must be trained
    domains = list(recipe.train_domains)
    dirs = [anchored_dir(run_dir) / d for d in domains]
    todo = [d for d, p in zip(domains, dirs) if not (p / JOB_JSON).is_file()]
    if todo:
        seed = load_model(seed_path)
        check_llama(seed, seed_path)
        tok = run_dir / "tokenizer"
        context = model_context(recipe, tok)
        corpus = Corpus(recipe.corpus)
        device = resolve_device(recipe.optim.device)
        log(f"anchored experts: router rows from {embed_windows} windows of each train domain")
        windows = embedding_windows(corpus, tok, domains, context, embed_windows, EMBED_SEED + recipe.optim.seed)
        seed_rows, rows = domain_embeddings(seed.to(device), windows, recipe.eval.batch_size)
        for d, p in zip(domains, dirs):
            if d in todo:
                branch_anchored(p, anchored_job(recipe, run_dir, d, embed_windows), seed_rows, rows[d])
    pending = [str(p) for p in dirs if not (p / ANCHORED_JSON).is_file()]
    if pending:
        launcher = recipe.launcher
        if launcher.storage:
            launcher = launcher.model_copy(update={"storage": remote.join(launcher.storage, ANCHORED_DIR)})
        names = [f"{ANCHORED_DIR}/{Path(p).name}" for p in pending]
        log(f"training {len(pending)} anchored experts ({launcher.kind} launcher): {', '.join(names)}")
        run_jobs(pending, train_anchored_expert, launcher, names=names, log=log)
    return dirs


def read_anchored(expert_dir: Path) -> dict[str, Any]:
    """anchored.json of a finished anchored expert (ElmError naming the folder otherwise)."""
    path = Path(expert_dir) / ANCHORED_JSON
    require(path.is_file(), "not a trained anchored expert (no anchored.json)", expert_dir)
    meta = read_json(path, ANCHORED_JSON)
    require(meta.get("format") == ANCHORED_FORMAT, f"field 'format' must be {ANCHORED_FORMAT!r}", path)
    return meta

