"""`elmforest ensemble`, `average`, `eval` and `generate`: use a forest's experts together.

    ensemble FOREST --domain D   cached prior on D's valid split, then test perplexity of the
                                 domain-posterior ensemble (optionally top-k)
    average  FOREST --method M   parameter-average the experts into one model folder
    eval     TARGET              per-domain perplexity of a forest (ensemble) or a model folder
    generate TARGET --prompt P   sample a continuation from a forest or a model folder

The shared pieces (consistency checks, windows, priors, ensemble scoring) live in
`elmforest.scoring`, so the study runner computes the same numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from elmforest import storage
from elmforest.console import stdout_console
from elmforest.errors import ElmError, require
from elmforest.forest import Forest, read_json
from elmforest.scoring import (
    PRIOR_MODES,
    ExpertPool,
    PriorRecord,
    check_forest_consistency,
    domain_windows,
    ensemble_scores,
    forest_context,
    forest_prior,
    load_experts,
    load_prior,
    model_context,
    model_scores,
    resolve_corpus,
    save_prior,
)

# --- options shared by several commands (one definition, one help text) ------------------

CORPUS_OPT = typer.Option(
    None, "--corpus", help="Corpus folder to score on (default: the corpus recorded in the experts' expert.json)."
)
SPLIT_OPT = typer.Option("test", "--split", help="Split to score: train, valid or test.")
MAX_TOKENS_OPT = typer.Option(
    20000, "--max-tokens", help="Score the first N tokens of each domain's split (the same windows for every method)."
)
PRIOR_OPT = typer.Option(
    "cached", "--prior",
    help="Prior over experts: cached (estimated on the domain's valid split, then frozen), "
    "updating (moving average carried across the test batches) or uniform.",
)
POSTERIOR_OPT = typer.Option(
    "one_step", "--posterior",
    help="Per-token weights: one_step (previous token's likelihood, the reference code), full_prefix "
    "(the whole prefix, the paper's formula), prior (no update) or uniform.",
)
TOP_K_OPT = typer.Option(
    None, "--top-k", min=1, help="Run only the k experts with the largest cached prior (cost scales with k)."
)
PRIOR_SEQUENCES_OPT = typer.Option(
    100, "--prior-sequences", min=1, help="Validation windows the cached prior is estimated on."
)
PRIOR_BATCH_OPT = typer.Option(4, "--prior-batch", min=1, help="Windows per moving-average batch.")
ALPHA_OPT = typer.Option(0.3, "--alpha", help="Moving-average rate: prior <- (1-alpha) prior + alpha batch_mean.")
LOAD_PRIOR_OPT = typer.Option(
    None, "--load-prior", help="Use a prior saved with --save-prior instead of estimating one."
)
DEVICE_OPT = typer.Option("auto", "--device", help="Where models run: auto (cuda if available), cpu, cuda, cuda:1, ...")
JSON_OPT = typer.Option(None, "--json", help="Also write the results to this JSON file.")


def _device(name: str) -> str:
    from elmforest.phases import resolve_device

    return resolve_device(name)


def _csv(text: str, option: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    require(items, f"{option} is empty")
    return items


def parse_weights(text: str) -> dict[str, float]:
    """`a=0.7,b=0.3` -> {"a": 0.7, "b": 0.3}; names and values are checked, not the sum."""
    out: dict[str, float] = {}
    for part in _csv(text, "--weights"):
        name, sep, value = (s.strip() for s in part.partition("="))
        require(sep and name, f"--weights: {part!r} is not NAME=WEIGHT")
        try:
            out[name] = float(value)
        except ValueError:
            raise ElmError(f"--weights: weight {value!r} for expert {name!r} is not a number") from None
    return out


def open_target(path: Path) -> Forest | None:
    """A forest (has forest.json) -> Forest; a model folder (has config.json) -> None."""
    if (path / "forest.json").exists():
        return Forest(path)
    require(
        path.is_dir() and (path / "config.json").is_file(),
        "neither a forest (no forest.json) nor a model folder (no config.json)",
        path,
    )
    return None


def _forest_setup(path: Path, corpus: str | None) -> tuple[Forest, Any, int]:
    """Open and check a forest -> (forest, corpus, context)."""
    forest = Forest(path)
    metas = check_forest_consistency(forest)
    return forest, resolve_corpus(corpus, metas.values(), path / "forest.json"), forest_context(forest)


def _model_meta(path: Path) -> list[dict[str, Any]]:
    """A model folder's expert.json (if it is an expert), for the corpus it records."""
    return [read_json(path / "expert.json", "expert.json")] if (path / "expert.json").is_file() else []


def _estimate_or_load(
    pool: ExpertPool, corpus: Any, domain: str, context: int, prior_mode: str, load: Path | None,
    sequences: int, batch: int, alpha: float, posterior: str,
) -> PriorRecord | None:
    """The cached prior: loaded from a file, estimated on the domain, or None for other modes."""
    if load is not None:
        require(prior_mode == "cached", f"--load-prior needs --prior cached, not {prior_mode}")
        return load_prior(load, pool.names)
    if prior_mode == "cached":
        return forest_prior(pool, corpus, domain, context, sequences, batch, alpha, posterior)
    return None


def _check_prior_mode(prior_mode: str) -> None:
    require(prior_mode in PRIOR_MODES, f"--prior {prior_mode!r}: choose one of {', '.join(PRIOR_MODES)}")


def prior_table(record: PriorRecord, forest: Forest, used: list[str] | None = None) -> Table:
    """Experts sorted by prior weight, with their training domain (and whether they ran)."""
    table = Table(
        title=f"cached prior on {record.domain or '?'} ({record.windows} windows, {record.batches} EMA batches, "
        f"posterior {record.posterior})"
    )
    table.add_column("expert")
    table.add_column("domain")
    table.add_column("weight", justify="right")
    if used is not None:
        table.add_column("runs")
    domains = {e.name: e.domain for e in forest.experts}
    for name, w in sorted(record.experts.items(), key=lambda kv: -kv[1]):
        row = [name, domains.get(name, "?"), f"{w:.4f}"]
        if used is not None:
            row.append("yes" if name in used else "")
        table.add_row(*row)
    return table


# --- ensemble ------------------------------------------------------------------------------


def ensemble(
    forest_path: Path = typer.Argument(..., metavar="FOREST", help="Forest folder (with forest.json)."),
    domain: str = typer.Option(
        ..., "--domain", help="Domain to evaluate: its valid split gives the prior, its split the score."
    ),
    corpus: str | None = CORPUS_OPT,
    prior: str = PRIOR_OPT,
    posterior: str = POSTERIOR_OPT,
    top_k: int | None = TOP_K_OPT,
    split: str = SPLIT_OPT,
    max_tokens: int = MAX_TOKENS_OPT,
    prior_sequences: int = PRIOR_SEQUENCES_OPT,
    prior_batch: int = PRIOR_BATCH_OPT,
    alpha: float = ALPHA_OPT,
    save: Path | None = typer.Option(None, "--save-prior", help="Write the cached prior to this JSON file."),
    load: Path | None = LOAD_PRIOR_OPT,
    device: str = DEVICE_OPT,
    json_out: Path | None = JSON_OPT,
) -> None:
    """Ensemble a forest's experts on one domain: print the cached prior and the perplexity.

    The prior is the moving average of the batch-mean posterior over the domain's first --prior-sequences validation windows; frozen, it weights the ensemble scored on the first --max-tokens tokens of --split.
    """
    _check_prior_mode(prior)
    forest, corp, context = _forest_setup(forest_path, corpus)
    windows = domain_windows(corp, forest.tokenizer_dir, domain, split, context, max_tokens)  # fail fast
    pool = ExpertPool(forest, _device(device))
    record = _estimate_or_load(pool, corp, domain, context, prior, load, prior_sequences, prior_batch, alpha, posterior)
    if save is not None:
        require(record is not None, f"--save-prior needs --prior cached, not {prior}")
        save_prior(save, record)
    scores, used = ensemble_scores(pool, windows, prior, posterior, record, top_k, prior_batch, alpha)

    console = stdout_console()
    if record is not None:
        console.print(prior_table(record, forest, used))
    console.print(
        f"{domain} {split}: perplexity {scores['ppl']:.4f} (nll {scores['nll']:.4f}, {scores['tokens']:,} tokens, "
        f"prior {prior}, posterior {posterior}, {len(used)} of {len(forest.names)} experts run)"
    )
    if save is not None:
        console.print(f"wrote prior to {save}")
    if json_out is not None:
        storage.write_json(json_out, {
            "target": str(forest_path), "kind": "forest", "domain": domain, "corpus": str(corp.path),
            "split": split, "max_tokens": max_tokens, "context": context, "prior_mode": prior,
            "posterior": posterior, "top_k": top_k, "experts_run": used,
            "prior": record.to_json() if record is not None else None, **scores,
        })


# --- average -------------------------------------------------------------------------------


def average(
    forest_path: Path = typer.Argument(..., metavar="FOREST", help="Forest folder (with forest.json)."),
    method: str = typer.Option(
        ..., "--method",
        help="uniform | argmax (expert with the largest cached prior) | posterior (cached-prior-weighted) | "
        "weighted (--weights) | task_arithmetic | ties (both relative to the seed).",
    ),
    out: Path = typer.Option(..., "--out", help="New model folder to write (must not exist)."),
    domain: str | None = typer.Option(
        None, "--domain", help="Domain whose cached prior gives the weights (argmax, posterior)."
    ),
    corpus: str | None = CORPUS_OPT,
    weights: str | None = typer.Option(
        None, "--weights", help="Explicit weights for --method weighted, e.g. a=0.7,b=0.3 (unnamed experts get 0)."
    ),
    normalise: bool = typer.Option(
        False, "--normalise", help="Divide weights by their sum instead of refusing a sum other than 1."
    ),
    seed_dir: Path | None = typer.Option(
        None, "--seed-dir", help="Seed model folder for task_arithmetic / ties (default: the experts' seed_checkpoint)."
    ),
    scale: float | None = typer.Option(
        None, "--scale", help="task_arithmetic / ties: task-vector scale (default 1/n and 1)."
    ),
    density: float = typer.Option(0.2, "--density", help="ties: fraction of each task vector kept, by magnitude."),
    posterior: str = POSTERIOR_OPT,
    prior_sequences: int = PRIOR_SEQUENCES_OPT,
    prior_batch: int = PRIOR_BATCH_OPT,
    alpha: float = ALPHA_OPT,
    load: Path | None = LOAD_PRIOR_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Average a forest's experts' parameters into one Hugging Face model folder.

    merged = sum_i w_i expert_i tensor by tensor (or a seed-relative merge); the folder holds weights, config, tokenizer files and average.json, and loads with from_pretrained.
    """
    from elmforest.averaging import AVERAGING_METHODS, AverageOptions, average_folders, resolve_weights
    from elmforest.models import copy_tokenizer_files

    require(method in AVERAGING_METHODS, f"--method {method!r}: choose one of {', '.join(AVERAGING_METHODS)}")
    require(not out.exists(), "output folder already exists; choose a new --out", out)
    forest = Forest(forest_path)
    metas = check_forest_consistency(forest)
    names = forest.names
    record = None
    vector = None
    if method in ("argmax", "posterior"):
        require(weights is None, f"--weights is for --method weighted; {method} uses the cached prior")
        if load is None:
            require(
                domain is not None,
                f"--method {method} needs --domain (whose cached prior gives the weights) or --load-prior",
            )
            corp = resolve_corpus(corpus, metas.values(), forest_path / "forest.json")
            pool = ExpertPool(forest, _device(device))
            record = forest_prior(pool, corp, domain, forest_context(forest), prior_sequences, prior_batch, alpha, posterior)
        else:
            record = load_prior(load, names)
        vector = record.vector(names).tolist()
    elif weights is not None:
        vector = resolve_weights(parse_weights(weights), names).tolist()  # refuses unknown names

    if method in ("task_arithmetic", "ties") and seed_dir is None:
        recorded = next((m.get("seed_checkpoint") for m in metas.values() if m.get("seed_checkpoint")), None)
        require(
            recorded is not None and Path(recorded).is_dir(),
            f"--method {method} needs --seed-dir (the experts' seed_checkpoint {recorded!r} is not a folder)",
        )
        seed_dir = Path(recorded)

    options = AverageOptions(normalise=normalise, scale=scale, density=density)
    with storage.atomic_dir(out) as staging:
        built = average_folders([forest.expert_dir(n) for n in names], vector, method, staging / "merged", seed_dir, options)
        copy_tokenizer_files(forest.tokenizer_dir, built, overwrite=False)  # experts usually carry them; the forest always does
        info = json.loads((built / "average.json").read_text(encoding="utf-8"))
        info.update(forest=str(forest_path), expert_names=names, prior=record.to_json() if record else None)
        storage.write_json(built / "average.json", info)
        for f in built.iterdir():
            os.replace(f, staging / f.name)
        built.rmdir()

    console = stdout_console()
    if record is not None:
        console.print(prior_table(record, forest))
    table = Table(title=f"{method} average -> {out}")
    table.add_column("expert")
    table.add_column("weight", justify="right")
    for name, w in zip(names, info["weights"] or [None] * len(names)):
        table.add_row(name, "-" if w is None else f"{w:.4f}")
    console.print(table)
    if info["weights"] is None:
        console.print(f"seed {info['seed']}, scale {info['scale']}, density {info['density']}")
    console.print(f"wrote {out}")


# --- eval ----------------------------------------------------------------------------------


def evaluate(
    target: Path = typer.Argument(
        ..., metavar="TARGET", help="A forest folder (ensemble) or a model folder (config.json + model.safetensors)."
    ),
    corpus: str | None = CORPUS_OPT,
    domains: str | None = typer.Option(
        None, "--domains", help="Comma-separated domains to score (default: every domain of the corpus)."
    ),
    split: str = SPLIT_OPT,
    max_tokens: int = MAX_TOKENS_OPT,
    prior: str = PRIOR_OPT,
    posterior: str = POSTERIOR_OPT,
    top_k: int | None = TOP_K_OPT,
    prior_sequences: int = PRIOR_SEQUENCES_OPT,
    prior_batch: int = PRIOR_BATCH_OPT,
    alpha: float = ALPHA_OPT,
    device: str = DEVICE_OPT,
    json_out: Path | None = JSON_OPT,
) -> None:
    """Per-domain perplexity of a forest (ensemble, prior estimated per domain) or one model.

    Every target is scored on the same windows: the first --max-tokens tokens of each domain's split, cut at the model's context length.
    """
    _check_prior_mode(prior)
    forest = open_target(target)
    dev = _device(device)
    kind = "forest" if forest is not None else "model"
    result: dict[str, Any] = {"target": str(target), "kind": kind, "split": split, "max_tokens": max_tokens}
    if forest is not None:
        forest, corp, context = _forest_setup(target, corpus)
        tokenizer_dir = forest.tokenizer_dir
        pool = ExpertPool(forest, dev)
    else:
        from elmforest.models import load_model
        from elmforest.tokenizer import tokenizer_hash

        tokenizer_hash(target)  # the folder must carry its tokenizer (names the missing file)
        corp = resolve_corpus(corpus, _model_meta(target), target)
        model = load_model(target).to(dev).eval()
        tokenizer_dir, context = target, model_context(model.config)
    chosen = _csv(domains, "--domains") if domains is not None else corp.domains
    corp.require(chosen, "--domains")
    result.update(corpus=str(corp.path), context=context, domains={})
    if forest is not None:
        result.update(ensemble={"prior": prior, "posterior": posterior, "top_k": top_k, "experts_run": {}}, prior={})

    console = stdout_console()
    for d in chosen:
        windows = domain_windows(corp, tokenizer_dir, d, split, context, max_tokens)
        if forest is None:
            scores = model_scores(model, windows)
        else:
            record = _estimate_or_load(pool, corp, d, context, prior, None, prior_sequences, prior_batch, alpha, posterior)
            scores, used = ensemble_scores(pool, windows, prior, posterior, record, top_k, prior_batch, alpha)
            result["ensemble"]["experts_run"][d] = used
            if record is not None:
                result["prior"][d] = record.to_json()
        result["domains"][d] = scores

    table = Table(title=f"{target} ({result['kind']}) on {split}, first {max_tokens:,} tokens per domain")
    for col in ("domain", "ppl", "nll", "tokens"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    if forest is not None:
        table.add_column("top prior expert")
    for d, s in result["domains"].items():
        row = [d, f"{s['ppl']:.4f}", f"{s['nll']:.4f}", f"{s['tokens']:,}"]
        if forest is not None:
            rec = result["prior"].get(d)
            row.append(f"{max(rec['experts'], key=rec['experts'].get)} ({max(rec['experts'].values()):.3f})" if rec else "-")
        table.add_row(*row)
    console.print(table)
    if json_out is not None:
        storage.write_json(json_out, result)
        console.print(f"wrote {json_out}")


# --- generate ------------------------------------------------------------------------------


def generate_text(
    target: Path = typer.Argument(
        ..., metavar="TARGET", help="A forest folder (ensemble generation) or a model folder."
    ),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue."),
    max_new_tokens: int = typer.Option(
        50, "--max-new-tokens", min=0, help="Most tokens to add (stops early at end-of-text)."
    ),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (> 0)."),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Nucleus sampling: keep the most likely tokens holding this much mass."
    ),
    greedy: bool = typer.Option(
        False, "--greedy", help="Always take the most likely token (ignores temperature / top-p)."
    ),
    posterior: str = POSTERIOR_OPT,
    prior_file: Path | None = typer.Option(
        None, "--prior-file", help="A prior saved with `ensemble --save-prior` (default: uniform)."
    ),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute every expert over the whole text at each step (slow; no KV cache)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler."),
    device: str = DEVICE_OPT,
) -> None:
    """Continue a prompt with a forest's ensemble (posterior following the text) or one model."""
    from elmforest.generate import generate
    from elmforest.models import load_model
    from elmforest.tokenizer import load_tokenizer

    forest = open_target(target)
    dev = _device(device)
    prior = None
    if forest is not None:
        check_forest_consistency(forest)
        weights = load_prior(prior_file, forest.names).vector(forest.names) if prior_file else None
        used = forest.names if weights is None else [n for n, w in zip(forest.names, weights.tolist()) if w > 0]
        models = load_experts(forest, used, dev)  # experts with zero prior never load
        prior = None if weights is None else weights[weights > 0]
        tokenizer = load_tokenizer(forest.tokenizer_dir)
    else:
        require(prior_file is None, "--prior-file is for forests, not a single model", target)
        models = [load_model(target).to(dev).eval()]
        tokenizer = load_tokenizer(target)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    new = generate(
        models, tokenizer, ids, max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
        prior=prior, posterior=posterior, use_cache=not no_cache, seed=seed,
    )
    # decode prompt and continuation together: a character may straddle their byte boundary
    print(tokenizer.decode(list(ids) + new, skip_special_tokens=True))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("ensemble")(ensemble)
    app.command("average")(average)
    app.command("eval")(evaluate)
    app.command("generate")(generate_text)
