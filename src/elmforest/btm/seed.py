"""The dense run the forest grows from: the run's tokenizer, the seed, the dense baseline and the
dense models at k x the compute, as plain functions taking paths.

    tokenizer  RUN/tokenizer: a copy of the recipe's (or its `model.path` folder's) or BPE trained
               on the train domains.
    seed       train the dense LM on all train domains with domain-balanced batches up to the seed
               fraction of the budget, snapshot it as RUN/seed (and the seed-fraction sweep's extra
               seeds), and (optionally) continue the same run to the full budget: that continuation
               is the compute-matched dense baseline, RUN/dense.
    multiples  RUN/dense_x<k>: the dense LM trained from scratch on k x the budget.

The experts branched from the seed, and their training, are `elmforest.btm.experts`.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch

from elmforest import __version__, storage

from elmforest.train import distributed
from elmforest.train.budget import Budget, plan_budget, train_spec
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError
from elmforest.combine.evaluate import spread_windows
from elmforest.combine.forest import read_json
from elmforest.models.factory import (
    arch_hash,
    build_model,
    copy_tokenizer_files,
    fill_token_ids,
    load_model,
    resolve_spec,
    token_ids,
)
from elmforest.data.sampler import BalancedSampler
from elmforest.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer, vocab_size
from elmforest.data.tokens import token_array
from elmforest.train.loop import train
from elmforest.train import trackers

SEED_JSON = "seed.json"
TRAIN_STATE = "train_state.pt"


# ---------------------------------------------------------------------------------------------
# Data


def prepare_tokenizer(recipe: Recipe, run_dir: Path) -> Path:
    """RUN/tokenizer: a copy of `tokenizer.path`, else of the `model.path` folder's own tokenizer,
    else BPE trained on the train domains. With `model.path`, the tokenizer must fit the model's
    embeddings (checked here, before anything is tokenised)."""
    out = Path(run_dir) / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    src = recipe.tokenizer.path or recipe.model.path
    if src:
        src = Path(src)
        if not recipe.tokenizer.path and not (src / "tokenizer.json").is_file():
            raise ElmError(
                "model.path: the model folder has no tokenizer (tokenizer.json); save the model's tokenizer "
                "beside it or set tokenizer.path",
                src,
            )
        tokenizer = load_tokenizer(src)  # validates the folder, naming any missing file
        if recipe.model.path:
            check_tokenizer_fits(tokenizer, Path(recipe.model.path))
        with storage.atomic_dir(out) as tmp:
            copy_tokenizer_files(src, tmp)
        return out
    corpus = Corpus(recipe.corpus)
    train_tokenizer(
        corpus,
        recipe.train_domains,
        recipe.tokenizer.vocab_size,
        out,
        sample_bytes_per_domain=recipe.tokenizer.sample_bytes_per_domain,
    )
    return out


def check_tokenizer_fits(tokenizer, model_dir: Path) -> None:
    """Every token id must index a row of the model's embedding table (config `vocab_size`).

    A table with more rows than the tokenizer has ids is fine (many released models pad it to a
    multiple of 64 or 128; those rows are never an input and learn to get ~0 probability)."""
    config = read_json(Path(model_dir) / "config.json", "model config")
    rows = config.get("vocab_size")
    if not isinstance(rows, int) or rows < 1:
        raise ElmError("model.path: config.json has no vocab_size", Path(model_dir) / "config.json")
    ids = max(tokenizer.get_vocab().values()) + 1
    if ids > rows:
        raise ElmError(
            f"model.path: the tokenizer has {ids} token ids but the model's embeddings have {rows} rows "
            "(vocab_size); this tokenizer does not belong to this model",
            model_dir,
        )


def domain_arrays(corpus: Corpus, tokenizer_dir: Path, domains: list[str], split: str) -> dict[str, Any]:
    return {d: token_array(corpus, tokenizer_dir, d, split) for d in domains}


def valid_batches(
    arrays: dict[str, Any], context: int, windows_per_domain: int, batch_size: int, window_seed: int = 0
) -> list[torch.Tensor]:
    """`windows_per_domain` valid windows of each domain, drawn (seeded by `window_seed`) from its
    whole split as the evaluation's are, in batches: the training loop's valid loss.

    With equal windows per domain, the mean loss over them is the mean of per-domain losses,
    so exp(valid_loss) is the geometric mean of the per-domain perplexities."""
    return list(torch.cat(monitor_windows(arrays, context, windows_per_domain, window_seed)).split(batch_size))


def monitor_windows(arrays: dict[str, Any], context: int, windows_per_domain: int, window_seed: int) -> list[torch.Tensor]:
    """Per domain, the valid windows the training loop's valid loss is measured on."""
    windows = []
    for domain, a in arrays.items():
        try:
            windows.append(spread_windows(a, context, windows_per_domain, window_seed, eos_id=None).tokens)
        except ElmError as e:  # name the split: a valid split shorter than one window
            raise ElmError(f"domain {domain!r} valid split: {e.detail}") from None
    return windows


def model_spec(recipe: Recipe, tokenizer_dir: Path):
    tokenizer = load_tokenizer(tokenizer_dir)
    return resolve_spec(recipe.model, vocab_size(tokenizer), **token_ids(tokenizer))


def initial_model(recipe: Recipe, tokenizer_dir: Path):
    """A fresh model of the recipe's architecture, or the recipe's `model.path` checkpoint (in
    float32, the dtype every run trains its master weights in, with the tokenizer's bos/eos ids
    where its config has none)."""
    if recipe.model.path:
        model = load_model(recipe.model.path).float()
        return fill_token_ids(model, token_ids(load_tokenizer(tokenizer_dir)))
    return build_model(model_spec(recipe, tokenizer_dir), seed=recipe.optim.seed)


def model_context(recipe: Recipe, tokenizer_dir: Path | None = None) -> int:
    """The training window: `model.context`, else the `model.path` folder's positions (a set
    `model.context` may be shorter than those, never longer), else the named size's."""
    if recipe.model.path:
        path = Path(recipe.model.path) / "config.json"
        cfg = read_json(path, "model config")
        limit = cfg.get("n_positions") or cfg.get("max_position_embeddings")
        if not isinstance(limit, int) or limit < 2:
            raise ElmError("model.path: config.json has no context length (n_positions or max_position_embeddings)", path)
        context = recipe.model.context or limit
        if context > limit:
            raise ElmError(f"model.context={context} exceeds the model folder's {limit} positions", path)
        return context
    if tokenizer_dir is None:
        raise ValueError("model_context: a recipe without model.path needs the tokenizer folder")
    return model_spec(recipe, tokenizer_dir).context


# ---------------------------------------------------------------------------------------------
# Seed and dense


def seed_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "seed"


def dense_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "dense"


def dense_data(recipe: Recipe, run_dir: Path) -> tuple[Path, int, Budget, BalancedSampler, list[torch.Tensor]]:
    """What every dense run of a study trains on -> (tokenizer dir, context, budget, a fresh
    domain-balanced sampler, the valid batches): batch i is the same for the seed run, the dense
    baseline, DEMix and the dense models at k x the compute."""
    tok = distributed.main_first(prepare_tokenizer, recipe, run_dir)  # data-parallel: rank 0 writes it
    corpus = Corpus(recipe.corpus)
    corpus.require(recipe.train_domains, "recipe train_domains")
    context = model_context(recipe, tok)
    budget = plan_budget(recipe, context)
    sampler = BalancedSampler(
        domain_arrays(corpus, tok, recipe.train_domains, "train"), context, budget.dense_blocks_per_domain,
        seed=recipe.optim.seed,
    )
    valid = valid_batches(
        domain_arrays(corpus, tok, recipe.train_domains, "valid"),
        context,
        recipe.eval.valid_windows_per_domain,
        recipe.eval.batch_size,
        recipe.eval.window_seed,
    )
    return tok, context, budget, sampler, valid


@trackers.tracked
def train_seed(
    recipe: Recipe, run_dir: Path, *, full: bool = False, progress: bool = True, seed_fractions: list[float] = ()
) -> dict[str, Any]:
    """Train the domain-balanced dense run to the seed step and snapshot RUN/seed; with `full`,
    continue the same run (same batches, same schedule) to the whole budget: the dense baseline.
    `seed_fractions`: further snapshots on the way, RUN/sweep/seed<f>/seed (a seed-fraction sweep).

    Resumable: a killed run continues from RUN/dense's last checkpoint; finished parts are skipped.
    """
    run_dir = Path(run_dir)
    tok, context, budget, sampler, valid = dense_data(recipe, run_dir)
    spec = train_spec(recipe, budget, budget.dense_micro_batches)
    dense = dense_dir(run_dir)
    model = initial_model(recipe, tok)
    main = distributed.is_main()  # under G data-parallel ranks only rank 0 writes files
    if main:
        copy_tokenizer_files(tok, dense, overwrite=False)
    result = {}
    # the seed, and the extra seeds of a seed-fraction sweep, are snapshots of this one run, in step order
    snapshots = [(budget.seed_steps, seed_dir(run_dir), recipe.budget.seed_fraction)] + [
        (plan_budget(sweep_recipe(recipe, f), context).seed_steps, sweep_dir(run_dir, f) / "seed", f)
        for f in seed_fractions
    ]
    for steps, target, fraction in sorted(snapshots, key=lambda t: t[0]):
        if not (target / SEED_JSON).is_file():
            result = train(model, sampler, spec, dense, stop_at_step=steps, valid_batches=valid, progress=progress)
            if main:
                snapshot_seed(run_dir, tok, result, fraction, target)
    if full:
        model = initial_model(recipe, tok)  # weights come from the checkpoint
        sampler = dense_data(recipe, run_dir)[3]
        result = train(model, sampler, spec, dense, valid_batches=valid, progress=progress)
        if main:
            storage.write_json(dense / "dense.json", {"arm": "dense", **result, "tokenizer_hash": tokenizer_hash(tok)})
    distributed.barrier()  # the snapshot and dense.json exist before any rank returns
    return result


DENSE_MULTIPLE_JSON = "dense_multiple.json"  # written last: the run is complete


def dense_multiple_name(k: float) -> str:
    """`dense_x1.5`, `dense_x2`: the dense model trained from scratch on k x T tokens."""
    return f"dense_x{k:g}"


def dense_multiple_dir(run_dir: Path, multiple: float) -> Path:
    """RUN/dense_x<k>: the dense LM trained from scratch on k x the budget."""
    return Path(run_dir) / dense_multiple_name(multiple)


@trackers.tracked
def train_dense_multiple(recipe: Recipe, run_dir: Path, multiple: float, *, progress: bool = True) -> dict[str, Any]:
    """A dense LM trained from scratch on `multiple` x the budget's tokens, into RUN/dense_x<k>.

    Same architecture, initialisation, domain-balanced batches (batch i is the dense run's batch
    i) and hyper-parameters as the dense baseline, with a full schedule of its own over
    round(multiple x total_steps) steps (warm-up the same fraction). Resumable; skipped when done.
    """
    run_dir = Path(run_dir)
    out = dense_multiple_dir(run_dir, multiple)
    if (out / DENSE_MULTIPLE_JSON).is_file():
        return read_json(out / DENSE_MULTIPLE_JSON, DENSE_MULTIPLE_JSON)
    tok, _context, budget, sampler, valid = dense_data(recipe, run_dir)
    steps = round(multiple * budget.total_steps)
    scaled = dataclasses.replace(
        budget, total_steps=steps, warmup_steps=min(round(recipe.optim.warmup_fraction * steps), steps - 1)
    )
    main = distributed.is_main()  # under G data-parallel ranks only rank 0 writes files
    if main:
        copy_tokenizer_files(tok, out, overwrite=False)
    result = train(initial_model(recipe, tok), sampler, train_spec(recipe, scaled, budget.dense_micro_batches), out,
                   valid_batches=valid, progress=progress)
    meta = {"arm": out.name, "multiple": multiple, **result, "tokenizer_hash": tokenizer_hash(tok)}
    if main:
        storage.write_json(out / DENSE_MULTIPLE_JSON, meta)
    distributed.barrier()
    return meta


def sweep_recipe(recipe: Recipe, fraction: float) -> Recipe:
    """The recipe of a seed-fraction sweep's forest: the same, with budget.seed_fraction = fraction."""
    return recipe.model_copy(update={"budget": recipe.budget.model_copy(update={"seed_fraction": fraction})})


def sweep_dir(run_dir: Path, fraction: float) -> Path:
    """RUN/sweep/seed<f>: the seed snapshot at fraction f of the dense run, its experts and forest."""
    return Path(run_dir) / "sweep" / f"seed{fraction:g}"


def snapshot_seed(
    run_dir: Path, tokenizer_dir: Path, result: dict[str, Any], fraction: float, target: Path | None = None
) -> Path:
    """Copy the dense run at a seed step into RUN/seed, or `target` (weights, config, AdamW state, tokenizer)."""
    dense, target = dense_dir(run_dir), Path(target) if target is not None else seed_dir(run_dir)
    if target.exists():
        shutil.rmtree(target)  # a partial snapshot from a killed run: seed.json is written last
    with storage.atomic_dir(target) as tmp:
        for f in dense.iterdir():
            if f.is_file() and not f.name.startswith(".") and f.name not in ("train.json", "dense.json"):
                shutil.copy2(f, tmp / f.name)
        config = read_json(dense / "config.json", "model config")
        storage.write_json(
            tmp / SEED_JSON,
            {
                "step": result["steps"],
                "tokens": result["tokens"],
                "flops": result["flops"],
                "seed_fraction": fraction,
                "tokenizer_hash": tokenizer_hash(tokenizer_dir),
                "arch_hash": arch_hash(_config_obj(config)),
                "elmforest_version": __version__,
            },
        )
    return target


def _config_obj(config: dict[str, Any]):
    from transformers import AutoConfig

    return AutoConfig.for_model(**config)
