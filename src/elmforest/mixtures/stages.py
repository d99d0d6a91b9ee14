"""Mixtures inside one model, as phases of a study: DEMix training and the BTX build.

Plain functions taking paths, like `elmforest.btm.seed` and `elmforest.btm.experts`:

    train_demix   RUN/seed -> RUN/demix: the seed's model with every MLP split into one copy per
                  train domain (`demix.to_demix`), trained like the dense continuation.
    build_moe     a forest's llama experts -> one Mixtral MoE (`btx.mix_experts`), its routers
                  fine-tuned on domain-balanced data (`btx.finetune_router`, the one training loop,
                  checkpointed in a work folder).
    mix_forest    build_moe with the output folder as the work folder, then its `mix.json`; a
                  killed fine-tune continues bit-identically when the same command runs again.
    build_btx     the study's BTX arm: mix_forest on RUN/forest into RUN/btx.

Compute matching of DEMix against the dense baseline: it continues from the seed step with the
same balanced batches (B tokens per step, the same sampler state, so the very same windows) and
the same schedule to `total_steps`. Each row goes through its own domain's MLP only, so every
token costs exactly one MLP, as in the dense model:

    DEMix FLOPs = seed FLOPs + (total_steps - seed_steps) * B * flops_per_token(dense config)
                = dense FLOPs

`train_demix` hands the loop that per-token figure, so RUN/demix/metrics.jsonl and demix_run.json
count the same FLOPs (not 6 x the DEMix model's parameters, which hold all n MLP copies).

The seed's AdamW state carries over: shared parameters keep their moments, and every domain copy
of an MLP starts with a copy of the seed MLP's moments (and step count), the DEMix analogue of a
BTM expert branched with the seed's optimizer state. (The loss is the mean over all B rows, so
a domain copy's gradient comes from its B/n rows only, about 1/n of the dense MLP's; Adam divides
by the carried-over second moment, which decays to the new scale within ~1/(1 - beta2) steps.)
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elmforest.train.budget import plan_budget, resolve_device, train_spec
from elmforest import __version__, storage
from elmforest.mixtures import btx, demix
from elmforest.train import distributed
from elmforest.btm.seed import SEED_JSON, TRAIN_STATE, domain_arrays, model_context, monitor_windows, seed_dir
from elmforest.models.checkpoint import load_train_state
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError, require
from elmforest.combine.forest import Forest, read_json
from elmforest.models.checkpoint import save_weights
from elmforest.models.factory import SIZES, copy_tokenizer_files, flops_per_token, load_model, param_count
from elmforest.data.sampler import BalancedSampler
from elmforest.combine.scoring import (
    ExpertPool,
    check_forest_consistency,
    forest_context,
    forest_prior,
    load_experts,
    resolve_corpus,
)
from elmforest.data.tokens import token_array
from elmforest.train.spec import TrainSpec
from elmforest.train.loop import make_optimizer, train
from elmforest.train import trackers

DEMIX_DIR = "demix"
DEMIX_RUN_JSON = "demix_run.json"  # written last: RUN/demix is complete
BTX_DIR = "btx"
MIX_JSON = "mix.json"  # written last: a BTX folder is complete
MIX_REQUEST = "mix_request.json"  # the options of a fine-tune in progress (checked when it continues)
MIX_FORMAT = "elmforest-btx/1"
WEIGHT_MODES = ("uniform", "posterior")


def model_family(recipe: Recipe) -> str:
    """The recipe's model family: `model.path`'s config model_type, else `model.family` or the size's."""
    if recipe.model.path:
        return str(read_json(Path(recipe.model.path) / "config.json", "model config").get("model_type"))
    if recipe.model.family:
        return recipe.model.family
    return SIZES.get(recipe.model.size or "", {}).get("family", "gpt2")


# ---------------------------------------------------------------------------------------------
# DEMix


def demix_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DEMIX_DIR


def _dense_name(name: str) -> str:
    """`transformer.h.0.mlp.experts.2.c_fc.weight` -> `transformer.h.0.mlp.c_fc.weight`."""
    return re.sub(r"\.mlp\.experts\.\d+\.", ".mlp.", name)


def demix_optimizer_state(
    dense: torch.nn.Module, dense_optimizer_state: dict[str, Any], n_domains: int, spec: TrainSpec
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Turn `dense` into a DEMix model (in place) and map its AdamW state onto the new parameters.

    Returns (the DEMix model, an optimizer state_dict for `training.make_optimizer(demix, spec)`):
    every shared parameter keeps its moments; each of the n copies of an MLP parameter gets a copy
    of that dense parameter's moments and step. The parameter order (and so the state's indices)
    changes with the split, hence the mapping by name.
    """
    dense_opt = make_optimizer(dense, spec)
    try:
        dense_opt.load_state_dict(dense_optimizer_state)
    except (ValueError, KeyError) as e:
        raise ElmError(f"the seed's optimizer state does not match its model ({e})") from None
    by_name = {name: dense_opt.state[p] for name, p in dense.named_parameters() if p in dense_opt.state}
    model = demix.to_demix(dense, n_domains)
    opt = make_optimizer(model, spec)
    for name, p in model.named_parameters():
        moments = by_name.get(_dense_name(name))
        require(moments is not None, f"the seed's optimizer state has no entry for {_dense_name(name)!r}")
        opt.state[p] = {k: v.clone() for k, v in moments.items()}
    return model, opt.state_dict()


def _routed_valid_batches(
    arrays: dict[str, Any], context: int, windows_per_domain: int, batch_size: int, window_seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The valid windows `seed.valid_batches` scores, each with its domain's index: (tokens, ids)."""
    per_domain = monitor_windows(arrays, context, windows_per_domain, window_seed)
    rows = torch.cat(per_domain)
    ids = torch.cat([torch.full((len(w),), j, dtype=torch.long) for j, w in enumerate(per_domain)])
    return list(zip(rows.split(batch_size), ids.split(batch_size)))


@trackers.tracked
def train_demix(
    recipe: Recipe, run_dir: Path, progress: bool = True, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Train the DEMix arm from RUN/seed into RUN/demix; returns RUN/demix/demix_run.json's contents.

    Same balanced batches, micro-batches, schedule and step count as the dense continuation
    (see the module docstring); `demix.set_domains` routes each row through its own domain's
    MLPs before every forward. Resumable through the training loop's checkpoint (train_state.pt
    holds the DEMix weights); a finished folder is returned as it is. `stop_at_step` stops early
    (tests); a later call continues to the end.
    """
    run_dir = Path(run_dir)
    out = demix_dir(run_dir)
    if (out / DEMIX_RUN_JSON).is_file():
        return read_json(out / DEMIX_RUN_JSON, DEMIX_RUN_JSON)
    tok = run_dir / "tokenizer"
    seed = seed_dir(run_dir)
    seed_meta = read_json(seed / SEED_JSON, "seed.json")
    corpus = Corpus(recipe.corpus)
    domains = list(recipe.train_domains)
    context = model_context(recipe, tok)
    budget = plan_budget(recipe, context)
    spec = train_spec(recipe, budget, budget.dense_micro_batches)
    train_arrays = domain_arrays(corpus, tok, domains, "train")
    sampler = BalancedSampler(train_arrays, context, budget.dense_blocks_per_domain, seed=recipe.optim.seed)
    valid = _routed_valid_batches(
        domain_arrays(corpus, tok, domains, "valid"),
        context,
        recipe.eval.valid_windows_per_domain,
        recipe.eval.batch_size,
        recipe.eval.window_seed,
    )
    dense = load_model(seed)
    init = None
    if (out / TRAIN_STATE).is_file():  # resuming: the checkpoint holds weights and state
        model = demix.to_demix(dense, len(domains))
    else:
        state = load_train_state(seed / TRAIN_STATE)
        sampler.load_state_dict(state["sampler"])  # continue with the dense run's next batches
        if int(state["step"]) > 0:
            model, opt_state = demix_optimizer_state(dense, state["optimizer"], len(domains), spec)
            init = {"optimizer": opt_state, "step": int(state["step"])}
        else:  # seed_fraction 0: DEMix from the initial weights, fresh AdamW
            model = demix.to_demix(dense, len(domains))
    main = distributed.is_main()  # under G data-parallel ranks only rank 0 writes files
    if main:
        copy_tokenizer_files(tok, out, overwrite=False)

    def route(ids: torch.Tensor) -> None:
        demix.set_domains(model, ids)

    result = train(
        model, sampler, spec, out, stop_at_step=stop_at_step, valid_batches=valid, progress=progress,
        init_optimizer_state=init, route=route,
        flops_per_token=functools.partial(flops_per_token, dense.config),  # one domain MLP per token: the dense cost
    )
    if result["steps"] < spec.total_steps:
        return result
    demix.clear_routing(model)
    if main:
        demix.save_demix(model, out, domains)
    meta = {
        "arm": "demix",
        "domains": domains,
        **result,
        "seed_tokens": seed_meta["tokens"],
        "seed_flops": seed_meta["flops"],
        "params": param_count(model),
        "elmforest_version": __version__,
    }
    if main:
        storage.write_json(out / DEMIX_RUN_JSON, meta)
    distributed.barrier()
    return meta


# ---------------------------------------------------------------------------------------------
# BTX


def _recorded(metas: dict[str, dict[str, Any]], section: str, key: str, default: Any) -> Any:
    """A value of the recipe recorded in expert.json (`recipe.<section>.<key>`), else `default`."""
    for meta in metas.values():
        recipe = meta.get("recipe")
        part = recipe.get(section) if isinstance(recipe, dict) else None
        if isinstance(part, dict) and part.get(key) is not None:
            return part[key]
    return default


def forest_family(forest: Forest) -> str:
    """The experts' model_type, read from the first expert's config.json."""
    require(forest.experts, "the forest has no experts", forest.path / "forest.json")
    config = read_json(forest.expert_dir(forest.names[0]) / "config.json", "model config")
    return str(config.get("model_type"))


def build_moe(
    forest_dir: str | Path,
    *,
    weights: str = "uniform",
    domain: str | None = None,
    top_k: int = 2,
    finetune_tokens: int = 0,
    train_all: bool = False,
    corpus: str | Path | None = None,
    lr: float | None = None,
    batch_tokens: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    work_dir: str | Path | None = None,
    record: dict[str, Any] | None = None,
    stop_at_step: int | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Mix a forest's llama experts into one Mixtral MoE and fine-tune it -> (moe, mix.json contents).

    weights: "uniform", or "posterior" (the forest's cached prior on `domain`'s valid windows,
    estimated with the recorded recipe's eval settings) for the averaged non-MLP parameters.
    finetune_tokens: router fine-tuning tokens (0: none; rounded up to whole batches), on
    balanced batches of the experts' domains' train splits, `batch_tokens` per step (default:
    the recorded budget.batch_tokens), constant `lr` (default: the recorded optim.lr).
    `corpus` defaults to the one recorded in expert.json.
    work_dir: where the fine-tune checkpoints (`btx.finetune_router`); a folder holding an
    unfinished fine-tune continues it. None: a temporary folder (nothing to resume).
    record: written to work_dir/mix_request.json when the fine-tune starts. stop_at_step: stop
    the fine-tune there (tests); the result's finetune["stopped"] is then True.
    """
    forest = Forest(forest_dir)
    family = forest_family(forest)
    if family != "llama":
        raise ElmError(
            f"BTX needs llama-family experts but these are {family!r}; train the forest with model.family: llama",
            forest.path,
        )
    metas = check_forest_consistency(forest)
    require(weights in WEIGHT_MODES, f"--weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    require(weights != "posterior" or domain, "--weights posterior needs --domain (the domain whose prior weighs the experts)")
    require(weights == "posterior" or not domain, "--domain only applies with --weights posterior")
    require(finetune_tokens >= 0, f"--finetune-tokens must be >= 0, got {finetune_tokens}")
    context = forest_context(forest)
    need_corpus = finetune_tokens > 0 or weights == "posterior"
    data: Corpus | None = None
    if need_corpus:
        data = resolve_corpus(corpus, metas.values(), forest.path)

    mix_weights = None
    if weights == "posterior":
        data.require([domain], "--domain")
        pool = ExpertPool(forest, device)
        record_prior = forest_prior(
            pool, data, domain, context,
            sequences=_recorded(metas, "eval", "prior_sequences", 100),
            batch=_recorded(metas, "eval", "prior_batch", 4),
            alpha=_recorded(metas, "eval", "prior_alpha", 0.3),
            posterior=_recorded(metas, "eval", "posterior", "one_step"),
        )
        mix_weights = [record_prior.experts[n] for n in forest.names]
        log("posterior weights on " + domain + ": " + ", ".join(f"{n} {w:.3f}" for n, w in zip(forest.names, mix_weights)))
    experts = load_experts(forest, device=device)
    moe = btx.mix_experts(experts, mix_weights, top_k=top_k, seed=seed)
    del experts
    n = len(forest.names)
    used = [1.0 / n] * n if mix_weights is None else [w / sum(mix_weights) for w in mix_weights]
    domains = list(dict.fromkeys(e.domain for e in forest.experts))  # unique, in forest order
    finetune: dict[str, Any] = {"tokens": 0, "flops": 0, "steps": 0}
    if finetune_tokens > 0:
        data.require(domains, "the forest experts' domains (BTX fine-tunes on their train splits)")
        batch_tokens = batch_tokens or _recorded(metas, "budget", "batch_tokens", 16 * context * len(domains))
        lr = lr or _recorded(metas, "optim", "lr", 1e-3)
        # B = blocks_per_domain * n_domains windows of `context` tokens per step, at least one per domain
        blocks_per_domain = max(1, batch_tokens // (context * len(domains)))
        per_step = blocks_per_domain * len(domains) * context
        steps = math.ceil(finetune_tokens / per_step)
        arrays = {d: token_array(data, forest.tokenizer_dir, d, "train") for d in domains}
        sampler = BalancedSampler(arrays, context, blocks_per_domain, seed=seed)
        log(f"BTX: fine-tuning {'all parameters' if train_all else 'the routers'} for {steps} steps of {per_step} tokens")
        spec = btx.router_spec(steps, lr, device=device)
        with tempfile.TemporaryDirectory(prefix="btx-finetune-") as scratch:
            work = Path(work_dir) if work_dir is not None else Path(scratch)
            if record is not None and not (work / MIX_REQUEST).is_file():
                work.mkdir(parents=True, exist_ok=True)
                storage.write_json(work / MIX_REQUEST, record)
            info = btx.finetune_router(
                moe, sampler, spec, work, context=context, train_all=train_all, stop_at_step=stop_at_step
            )
        finetune = {
            "tokens": info["tokens"],
            "flops": info["flops"],
            "steps": info["steps"],
            "lr": lr,
            "batch_tokens": per_step,
            "train_all": train_all,
            "domains": domains,
            "loss_first": info["loss_first"],
            "loss_last": info["loss_last"],
        }
        if info["steps"] < steps:
            finetune["stopped"] = True
    moe.eval()
    meta = {
        "format": MIX_FORMAT,
        "forest": str(forest.path.resolve()),
        "experts": forest.names,
        "domains": [e.domain for e in forest.experts],
        "weights": used,
        "weights_mode": weights,
        "weights_domain": domain,
        "top_k": top_k,
        "finetune": finetune,
        "params": sum(p.numel() for p in moe.parameters()),
        "flops_per_token_moe_forward": btx.moe_flops_per_token(moe, context)["moe"],
        "tokenizer_hash": forest.data["tokenizer_hash"],
        "elmforest_version": __version__,
    }
    return moe, meta


_NOT_RECORDED = ("log", "device", "work_dir", "record", "stop_at_step")  # may change when a fine-tune continues


def _mix_request(forest_dir: str | Path, options: dict[str, Any]) -> dict[str, Any]:
    """What defines a BTX build: the forest and every build_moe option (defaults filled in)."""
    params = inspect.signature(build_moe).parameters.items()
    full = {k: p.default for k, p in params if p.default is not inspect.Parameter.empty and k not in _NOT_RECORDED}
    full.update({k: v for k, v in options.items() if k not in _NOT_RECORDED})
    return {"forest": str(Path(forest_dir).resolve()), **{k: str(v) if isinstance(v, Path) else v for k, v in sorted(full.items())}}


def mix_forest(forest_dir: str | Path, out: str | Path, stop_at_step: int | None = None, **options: Any) -> dict[str, Any]:
    """`build_moe(forest_dir, **options)` with `out` as its work folder, then the Hugging Face Mixtral
    folder (config.json, model.safetensors with its checksum), the forest's tokenizer files and
    `mix.json` last.

    `out` must not exist, or hold an unfinished fine-tune of the same forest and options (its
    mix_request.json), which then continues from its last checkpoint. A folder with mix.json is
    finished and never overwritten. `stop_at_step` (tests) stops the fine-tune early, without mix.json.
    """
    out = Path(out)
    require(not (out / MIX_JSON).is_file(), "already exists; choose a new folder for the BTX model", out)
    request = _mix_request(forest_dir, options)
    if out.exists():
        recorded = read_json(out / MIX_REQUEST, MIX_REQUEST) if (out / MIX_REQUEST).is_file() else None
        require(recorded is not None, "already exists and holds no unfinished BTX fine-tune; choose a new folder", out)
        differ = sorted(k for k in set(recorded) | set(request) if recorded.get(k) != request.get(k))
        if differ:
            k = differ[0]
            raise ElmError(
                f"holds an unfinished BTX fine-tune with {k}={recorded.get(k)!r} (now {request.get(k)!r}); "
                "rerun with the same options to continue it, or choose a new folder",
                out,
            )
    moe, meta = build_moe(forest_dir, work_dir=out, record=request, stop_at_step=stop_at_step, **options)
    if meta["finetune"].get("stopped"):
        return meta
    meta["request"] = request  # what this folder was built from (the study rebuilds it when that changes)
    tok = Forest(forest_dir).tokenizer_dir
    if out.exists():  # fine-tuned here: the loop's last checkpoint saved these very weights
        copy_tokenizer_files(tok, out, overwrite=False)
        storage.write_json(out / MIX_JSON, meta)
    else:
        with storage.atomic_dir(out) as tmp:
            save_weights(moe, tmp)
            copy_tokenizer_files(tok, tmp)
            storage.write_json(tmp / MIX_JSON, meta)
    return meta


def btx_dir(run_dir: Path) -> Path:
    return Path(run_dir) / BTX_DIR


@trackers.tracked
def build_btx(
    recipe: Recipe, run_dir: Path, finetune_tokens: int, train_all: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The study's BTX arm: RUN/forest mixed (uniform weights, top-2) into RUN/btx, routers (every
    parameter with `train_all`) fine-tuned for `finetune_tokens` tokens at the recipe's batch and
    peak lr. Skipped when done from the same request (`mix.json` records it; rebuilt when e.g. the
    tokens or `train_all` changed); an interrupted fine-tune continues from its last checkpoint."""
    run_dir = Path(run_dir)
    out = btx_dir(run_dir)
    forest = Forest(run_dir / "forest")
    options = dict(
        top_k=min(2, len(forest.names)),
        finetune_tokens=finetune_tokens,
        train_all=train_all,
        corpus=recipe.corpus,
        lr=recipe.optim.lr,
        batch_tokens=recipe.budget.batch_tokens,
        seed=recipe.optim.seed,
        device=resolve_device(recipe.optim.device),
        log=log,
    )
    if (out / MIX_JSON).is_file():
        done = read_json(out / MIX_JSON, MIX_JSON)
        if _same_build(done.get("request"), _mix_request(forest.path, options)):
            return done
        log(f"BTX: {out} was built with other settings; rebuilding it")
        shutil.rmtree(out)
    if out.exists() and not (out / MIX_REQUEST).is_file():
        shutil.rmtree(out)  # interrupted before its fine-tune began: nothing to continue
    return mix_forest(forest.path, out, **options)


def _same_build(recorded: dict[str, Any] | None, request: dict[str, Any]) -> bool:
    """Two BTX requests build the same model from a run's own forest (wherever the run folder is)."""
    if recorded is None:
        return False
    return {k: v for k, v in recorded.items() if k != "forest"} == {k: v for k, v in request.items() if k != "forest"}
