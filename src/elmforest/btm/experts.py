"""Experts branched from the seed (or from other experts) and trained on their own data, as plain
functions taking paths.

    branch  create an expert folder from the seed (weights plus, by default, its AdamW state and
            schedule position) or from a weighted parameter average of existing experts; an
            adapter expert (the recipe's `experts` section) is a fresh LoRA adapter on the seed
            instead: PEFT's files only, A drawn from the job's sampler seed, B = 0 (so it computes
            the seed exactly), a fresh AdamW; the seed folder is its frozen base (`job.base`). A
            grown one starts as the best rank-r adapter for its parents' weighted delta sum.
    train   train one expert on its own data; everything it needs is in its folder (`job.json`),
            so it runs the same in-process, in a worker process, or as a Ray task.
    merge   add the trained expert to a forest (once).

Compute matching (the paper's, `elmforest.train.budget`): each of n experts gets 1/n of the dense
batch for the same number of steps as the dense continuation.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elmforest import __version__, storage
from elmforest.btm.jobs import JOB_JSON, DomainData, ExpertJob, read_job, write_job
from elmforest.btm.seed import SEED_JSON, TRAIN_STATE, domain_arrays, model_context, seed_dir, valid_batches
from elmforest.combine.forest import EXPERT_JSON, read_expert, read_json
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus, check_domain_name
from elmforest.data.sampler import DomainSampler, RandomSplitSampler
from elmforest.data.tokenizer import tokenizer_hash
from elmforest.data.tokens import token_array
from elmforest.errors import ElmError
from elmforest.models.checkpoint import load_train_state
from elmforest.models.factory import TOKENIZER_FILES, arch_hash, copy_tokenizer_files, load_model
from elmforest.train import distributed
from elmforest.train.budget import plan_budget, train_spec
from elmforest.train import trackers
from elmforest.train.loop import train


# ---------------------------------------------------------------------------------------------
# Branch


def expert_job(
    recipe: Recipe,
    run_dir: Path,
    name: str,
    data: dict[str, Any],
    *,
    parents: list[dict[str, Any]] | str = "seed",
    init_state: str | None = None,
    fresh_steps: int | None = None,
    seed_from: Path | None = None,
) -> ExpertJob:
    """Everything `train_expert` needs: the record `branch_expert` writes as job.json.

    data: {"kind": "domain", "domain": d} or {"kind": "random_split", "domains": [...], "part": i,
    "parts": n, "mix": "balanced"}. fresh_steps: train this many steps on a schedule of their own
    (growing a forest); default: continue the seed's schedule from the seed step to the end of the budget.
    """
    check_domain_name(name, "expert name")
    run_dir = Path(run_dir).resolve()
    tok = run_dir / "tokenizer"
    context = model_context(recipe, tok)
    budget = plan_budget(recipe, context)
    spec = train_spec(recipe, budget, budget.expert_micro_batches)
    start = budget.seed_steps
    if fresh_steps is not None:
        start = 0
        spec = dataclasses.replace(spec, total_steps=fresh_steps, warmup_steps=min(budget.warmup_steps, max(fresh_steps - 1, 0)))
    domain = data["domain"] if data["kind"] == "domain" else name
    seed = Path(seed_from).resolve() if seed_from is not None else seed_dir(run_dir)
    return ExpertJob(
        name=name,
        domain=domain,
        corpus=str(Path(recipe.corpus).resolve()),
        tokenizer=str(tok),
        data=data,
        context=context,
        batch_blocks=budget.expert_blocks,
        sampler_seed=recipe.optim.seed + 1 + _stable_index(name),
        spec=spec,
        start_step=start,
        init_state=init_state,
        parents=parents,
        seed_checkpoint=str(seed),
        valid_windows=recipe.eval.valid_windows_per_domain,
        eval_batch_size=recipe.eval.batch_size,
        train_domains=list(recipe.train_domains),
        recipe=recipe.model_dump(mode="json"),
        adapter=recipe.experts,
        base=None if recipe.experts is None else str(seed),
    )


def _stable_index(name: str) -> int:
    import zlib

    return zlib.crc32(name.encode("utf-8")) % 100_000


def branch_expert(
    expert_dir: Path,
    job: ExpertJob,
    *,
    from_seed: Path | None = None,
    copy_optimizer: bool = True,
    from_experts: list[tuple[Path, float]] | None = None,
) -> Path:
    """Create an expert folder ready to train: initial weights, tokenizer, `job.json` (last).

    From the seed: its weights and (by default) its AdamW state and step, as in the reference
    setup. From experts: the weighted parameter average of their weights, fresh AdamW state.
    An adapter job (`job.adapter`) writes an adapter on its frozen base instead: from the seed a
    fresh one (B = 0), from experts the best rank-r adapter for their weighted delta sum
    (`combine.adapters.branch_adapter_average`), each with a fresh AdamW. A finished branch
    (job.json present) is left as it is.
    """
    expert_dir = Path(expert_dir)
    if (expert_dir / JOB_JSON).is_file():
        return expert_dir
    if (from_seed is None) == (from_experts is None):
        raise ElmError("branch from the seed or from experts, not both or neither")
    if expert_dir.exists():
        shutil.rmtree(expert_dir)  # an interrupted branch: job.json is written last
    tok = Path(job.tokenizer)
    if job.adapter is not None and from_seed is not None:
        _branch_adapter(expert_dir, job, Path(from_seed))
        job = _fresh_schedule(job.model_copy(update={"base": str(Path(from_seed).resolve())}))
    elif job.adapter is not None:
        _branch_adapter_average(expert_dir, job, from_experts)
        job = _fresh_schedule(job)
    elif from_seed is not None:
        from_seed = Path(from_seed)
        read_json(from_seed / SEED_JSON, "seed.json")
        with storage.atomic_dir(expert_dir) as tmp:
            for name in ("model.safetensors", "config.json", *TOKENIZER_FILES):
                if (from_seed / name).is_file():
                    shutil.copy2(from_seed / name, tmp / name)
        if copy_optimizer and job.start_step > 0:
            job = job.model_copy(update={"init_state": str((from_seed / TRAIN_STATE).resolve())})
        else:
            job = _fresh_schedule(job)
    else:
        from elmforest.combine.averaging import average_folders

        dirs = [Path(d) for d, _ in from_experts]
        weights = [float(w) for _, w in from_experts]
        average_folders(dirs, weights, "weighted", expert_dir)
        copy_tokenizer_files(tok, expert_dir, overwrite=False)
        job = _fresh_schedule(job)
    write_job(expert_dir, job)
    return expert_dir


def _branch_adapter(expert_dir: Path, job: ExpertJob, seed: Path) -> None:
    """A fresh LoRA adapter on the seed in PEFT's files: A from the job's sampler seed, B = 0. The
    seed's AdamW state belongs to its own weights, so the adapter starts a fresh one (`_fresh_schedule`)."""
    from elmforest.models.adapters import attach, save_adapter

    read_json(seed / SEED_JSON, "seed.json")
    model = attach(load_model(seed), job.adapter, seed=job.sampler_seed)
    with storage.atomic_dir(expert_dir) as tmp:
        save_adapter(model, tmp)


def _branch_adapter_average(expert_dir: Path, job: ExpertJob, parents: list[tuple[Path, float]]) -> None:
    """A grown adapter expert: the best rank-r adapter for the parents' weighted delta sum
    (`combine.adapters.branch_adapter_average`) on the job's base, which must be theirs."""
    from elmforest.combine.adapters import branch_adapter_average
    from elmforest.models.adapters import base_sha256

    base_hash = base_sha256(job.base)
    for d, _ in parents:
        meta = read_expert(d)
        if meta.get("base_sha256") != base_hash:
            raise ElmError(f"parent {meta['name']!r} is not an adapter on this run's base {job.base} ({base_hash})",
                           Path(d) / EXPERT_JSON)
    branch_adapter_average(job.base, [d for d, _ in parents], [w for _, w in parents], job.adapter, expert_dir,
                           seed=job.sampler_seed)


def _fresh_schedule(job: ExpertJob) -> ExpertJob:
    """A fresh AdamW and a schedule of its own with the same number of steps (warm-up included)."""
    steps = job.spec.total_steps - job.start_step
    spec = dataclasses.replace(job.spec, total_steps=steps, warmup_steps=min(job.spec.warmup_steps, steps - 1))
    return job.model_copy(update={"spec": spec, "start_step": 0, "init_state": None})


# ---------------------------------------------------------------------------------------------
# Train


def expert_sampler(job: ExpertJob, corpus: Corpus):
    """The job's training batches: its domain's, or its random part of the train domains'."""
    data, tok = job.data, Path(job.tokenizer)
    if isinstance(data, DomainData):
        return DomainSampler(
            token_array(corpus, tok, data.domain, "train"), job.context, job.batch_blocks, job.sampler_seed, name=data.domain
        )
    arrays = domain_arrays(corpus, tok, data.domains, "train")
    return RandomSplitSampler(
        arrays, data.parts, data.part, job.context, job.batch_blocks, job.sampler_seed,
        partition_seed=data.partition_seed, balanced=data.mix == "balanced",
    )


def job_valid_batches(job: ExpertJob, corpus: Corpus, domains: list[str]) -> list | None:
    """The valid batches the job's training loop measures its valid loss on, over `domains`
    (those whose valid split holds documents: a c-BTM cluster may get none; None when no domain has)."""
    domains = [d for d in domains if corpus.documents(d, "valid") != 0]
    if not domains:
        return None
    arrays = domain_arrays(corpus, Path(job.tokenizer), domains, "valid")
    return valid_batches(arrays, job.context, job.valid_windows, job.eval_batch_size, job.window_seed)


def train_expert(expert_dir: str, threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Train the expert in `expert_dir` to its budget and write `expert.json`; idempotent and
    resumable (a killed run continues from the folder's last checkpoint). Inside a process group
    every rank calls it (data-parallel training of this one expert); rank 0 writes. An adapter
    expert trains its LoRA on the frozen `job.base` (FLOPs: `models.adapters.adapter_flops_per_token`)
    and its expert.json adds `adapter`, `base` and `base_sha256`."""
    expert_dir = Path(expert_dir)
    done = expert_dir / EXPERT_JSON
    if done.is_file():
        return read_json(done, "expert.json")
    job = read_job(expert_dir, ExpertJob)
    corpus = Corpus(job.corpus)
    tok = Path(job.tokenizer)
    sampler = expert_sampler(job, corpus)
    valid = job_valid_batches(job, corpus, [job.data.domain] if isinstance(job.data, DomainData) else job.train_domains)
    spec = job.train_spec(threads)
    if job.adapter is not None:  # the frozen base with this folder's adapter, its A and B trainable
        from elmforest.models.adapters import base_sha256, load_adapter_model

        model = load_adapter_model(job.base, expert_dir, trainable=True)
        config = model.get_base_model().config
    else:
        model = load_model(expert_dir)
        config = model.config
    init = None
    if job.init_state and not (expert_dir / TRAIN_STATE).is_file():
        state = load_train_state(job.init_state)  # the seed's AdamW moments and step
        init = {"optimizer": state["optimizer"], "step": state["step"]}
    with trackers.following(job.recipe):  # the job's own recipe: trackers start inside the worker
        result = train(model, sampler, spec, expert_dir, valid_batches=valid, progress=progress, init_optimizer_state=init)
    meta = {
        "name": job.name,
        "domain": job.domain,
        "kind": job.data.kind,
        "parents": job.record()["parents"],
        "seed_checkpoint": job.seed_checkpoint,
        "tokens": result["tokens"],
        "flops": result["flops"],
        "steps": result["steps"] - result["start_step"],
        "schedule": {"start_step": result["start_step"], "total_steps": spec.total_steps},
        "final_loss": result["final_loss"],
        "final_valid_loss": result["final_valid_loss"],
        "seconds": result["seconds"],
        "tokenizer_hash": tokenizer_hash(tok),
        "arch_hash": arch_hash(config),
        "elmforest_version": __version__,
        "recipe": job.recipe,
    }
    if job.adapter is not None:  # what `combine.forest` loads it on, by content (merge refuses another base)
        meta.update(adapter=job.adapter.model_dump(mode="json"), base=job.base, base_sha256=base_sha256(job.base))
    if distributed.is_main():  # under G data-parallel ranks only rank 0 writes files
        storage.write_json(done, meta)
    return meta


def train_pending(recipe: Recipe, expert_dirs: list[Path], log: Callable[[str], None]) -> None:
    """Train the expert folders that have no expert.json yet with the recipe's launcher (resumable)."""
    from elmforest.launch.launchers import run_jobs

    pending = [str(p) for p in expert_dirs if not (Path(p) / EXPERT_JSON).is_file()]
    if pending:
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in pending]
        log(f"training {len(pending)} experts ({recipe.launcher.kind} launcher): {', '.join(names)}")
        run_jobs(pending, train_expert, recipe.launcher, names=names, log=log)


def merge_once(forest, expert_dir: Path) -> None:
    """Merge unless the forest already holds an expert of that name (a resumed run)."""
    if read_expert(expert_dir)["name"] not in forest.names:
        forest.merge(expert_dir)
