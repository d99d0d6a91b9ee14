"""`elmforest ensemble` and `eval`: use a forest's experts together; and the options and helpers
the forest commands share (`cli.average`, `cli.generate` take them from here).

    ensemble FOREST --domain D   cached prior on D's valid split, then test perplexity of the
                                 domain-posterior ensemble (optionally top-k, tuned mixing)
    eval     TARGET              per-domain perplexity of a forest (ensemble) or a model folder

The shared pieces (consistency checks, windows, priors, ensemble scoring) live in
`elmforest.combine` (`scoring`, `prior`, `logprobs`), so the study runner computes the same
numbers: with a study's eval settings (--recipe RUN/recipe.yaml, or the flags --max-tokens,
--window-seed, --prior-sequences, --prior-batch, --alpha, --posterior, --batch-size) `ensemble`
and `eval` on its forest give its results.json perplexities and priors of btm_ensemble_cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from elmforest import storage
from elmforest.console import stdout_console
from elmforest.errors import ElmError, require
from elmforest.combine.forest import Forest, read_json
from elmforest.combine.ensemble import Mixing, check_posterior, posterior_help
from elmforest.combine.logprobs import EVAL_BATCH
from elmforest.combine.prior import PriorRecord, load_prior, save_prior
from elmforest.combine.scoring import (
    PRIOR_MODES,
    ExpertPool,
    Members,
    check_forest_consistency,
    ensemble_scores,
    forest_context,
    forest_prior,
    model_context,
    model_scores,
    recorded_seed_dir,
    resolve_corpus,
    split_windows,
    tuned_prior,
)

# --- options shared by several commands (one definition, one help text) ------------------

CORPUS_OPT = typer.Option(
    None, "--corpus", help="Corpus folder to score on (default: the corpus recorded in the experts' expert.json)."
)
SPLIT_OPT = typer.Option("test", "--split", help="Split to score: train, valid or test.")
MAX_TOKENS_OPT = typer.Option(
    20000, "--max-tokens",
    help="Score N tokens of each domain's split: N // context windows drawn at random (seeded by --window-seed) "
    "from the whole split, the same windows for every method and model.",
)
WINDOW_SEED_OPT = typer.Option(0, "--window-seed", help="Seed of the window draw (test and valid windows).")
PRIOR_OPT = typer.Option(
    "cached", "--prior",
    help="Prior over experts: cached (estimated on the domain's valid split, then frozen), "
    "updating (moving average carried across the test batches) or uniform (fixed 1/n weights, no per-token "
    "update: the study's btm_ensemble_uniform).",
)
POSTERIOR_OPT = typer.Option(
    "one_step", "--posterior", help="Per-token weights. " + posterior_help() + ".",
)
MIX_OPT = typer.Option(
    "none", "--mix",
    help="auto: choose temperature, floor, evidence decay and whether the seed joins, per domain, by the mixture's "
    "NLL on the prior's validation windows (never test; the study's btm_ensemble_tuned). none: use the flags below.",
)
TEMPERATURE_OPT = typer.Option(1.0, "--temperature", help="Posterior temperature: the evidence is divided by it (>1 flatter).")
FLOOR_OPT = typer.Option(0.0, "--floor", help="Uniform weight mixed into the posterior: w <- (1-floor) w + floor/k.")
DECAY_OPT = typer.Option(
    None, "--decay", help="Evidence decay gamma in [0, 1] (0: one-step, 1: full prefix); sets --posterior decayed."
)
WITH_SEED_OPT = typer.Option(False, "--with-seed", help="The seed joins the mixture as a generalist member.")
SEED_MEMBER_DIR_OPT = typer.Option(
    None, "--seed-dir", help="The seed model folder for --with-seed / --mix auto (default: the experts' seed_checkpoint)."
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
BATCH_SIZE_OPT = typer.Option(
    EVAL_BATCH, "--batch-size", min=1,
    help="Windows per forward pass (a study's eval.batch_size gives its results.json numbers to the last digit).",
)
JSON_OPT = typer.Option(None, "--json", help="Also write the results to this JSON file.")
STUDY_RECIPE_OPT = typer.Option(
    None, "--recipe",
    help="A study's recipe (RUN/recipe.yaml): its eval settings (max_tokens_per_domain, window_seed, prior_sequences, "
    "prior_batch, prior_alpha, posterior, batch_size) stand in for those flags when not given, so the numbers are the "
    "study's results.json ones (btm_ensemble_cached and its priors).",
)
# flag (parameter name) -> the recipe's eval field it stands for
RECIPE_EVAL_FLAGS = {"max_tokens": "max_tokens_per_domain", "window_seed": "window_seed", "prior_sequences": "prior_sequences",
                     "prior_batch": "prior_batch", "alpha": "prior_alpha", "posterior": "posterior", "batch_size": "batch_size"}


def pick_device(name: str) -> str:
    """The device a --device option names (auto: cuda when available, else cpu)."""
    from elmforest.train.budget import resolve_device

    return resolve_device(name)


def study_eval_settings(ctx: typer.Context, recipe: Path | None) -> tuple[Any, ...]:
    """The values of the RECIPE_EVAL_FLAGS, in that order: as given on the command line, else the
    study recipe's eval settings (--recipe), else the flags' defaults."""
    values = {flag: ctx.params[flag] for flag in RECIPE_EVAL_FLAGS}
    if recipe is not None:
        from elmforest.study.recipe import load_recipe

        settings = load_recipe(recipe).eval
        for flag, field in RECIPE_EVAL_FLAGS.items():
            source = ctx.get_parameter_source(flag)
            if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
                values[flag] = getattr(settings, field)
    return tuple(values.values())


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


def _forest_setup(path: Path, corpus: str | None) -> tuple[Forest, Any, int, dict[str, dict[str, Any]]]:
    """Open and check a forest -> (forest, corpus, context, {expert: expert.json})."""
    forest = Forest(path)
    metas = check_forest_consistency(forest)
    return forest, resolve_corpus(corpus, metas.values(), path / "forest.json"), forest_context(forest), metas


def _model_meta(path: Path) -> list[dict[str, Any]]:
    """A model folder's expert.json (if it is an expert), for the corpus it records."""
    return [read_json(path / "expert.json", "expert.json")] if (path / "expert.json").is_file() else []


def resolve_mixing(posterior: str, temperature: float, floor: float, decay: float | None, with_seed: bool) -> tuple[str, Mixing]:
    """(posterior, Mixing) from the explicit flags; --decay means the decayed posterior."""
    if decay is not None:
        require(posterior in ("one_step", "decayed"), f"--decay sets --posterior decayed; it cannot go with --posterior {posterior}")
        posterior = "decayed"
    check_posterior(posterior)
    return posterior, Mixing(temperature=temperature, floor=floor, decay=decay or 0.0, with_seed=with_seed)


def forest_members(pool: ExpertPool, metas: dict[str, dict[str, Any]], seed_dir: Path | None) -> Members:
    """The mixture's members: the pool's experts, and the seed from --seed-dir or the experts' seed_checkpoint."""
    if seed_dir is not None:
        require((seed_dir / "config.json").is_file(), "not a model folder (no config.json)", seed_dir)
    return Members(pool, seed_dir or recorded_seed_dir(metas.values()))


def _estimate_or_load(
    members: Members, corpus: Any, domain: str, context: int, prior_mode: str, load: Path | None,
    sequences: int, batch: int, alpha: float, posterior: str, window_seed: int, mix: str, mixing: Mixing,
) -> PriorRecord | None:
    """The cached prior: loaded from a file, estimated (or tuned, --mix auto) on the domain, or None."""
    require(mix in ("none", "auto"), f"--mix {mix!r}: choose none or auto")
    if load is not None:
        require(prior_mode == "cached", f"--load-prior needs --prior cached, not {prior_mode}")
        require(mix == "none", "--load-prior takes the mixing recorded in the file; drop --mix auto")
        return load_prior(load, members.pool.names)
    if mix == "auto":
        require(prior_mode == "cached", f"--mix auto tunes a cached prior; it cannot go with --prior {prior_mode}")
        return tuned_prior(members, corpus, domain, context, sequences, batch, alpha, window_seed)
    if prior_mode == "cached":
        return forest_prior(members, corpus, domain, context, sequences, batch, alpha, posterior, window_seed, mixing)
    return None


def used_mixing(record: PriorRecord | None, posterior: str, mixing: Mixing) -> tuple[str, Mixing]:
    """A record made with other settings (tuned, or a loaded file) brings its own posterior and mixing."""
    if record is not None and record.mixing is not None and (record.mix != Mixing() or record.posterior == "decayed"):
        return record.posterior, record.mix
    return posterior, mixing


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
    domains = {e.name: e.domain for e in forest.experts} | {"seed": "(the seed: all train domains)"}
    for name, w in sorted(record.experts.items(), key=lambda kv: -kv[1]):
        row = [name, domains.get(name, "?"), f"{w:.4f}"]
        if used is not None:
            row.append("yes" if name in used else "")
        table.add_row(*row)
    return table


# --- ensemble ------------------------------------------------------------------------------


def ensemble(
    ctx: typer.Context,
    forest_path: Path = typer.Argument(..., metavar="FOREST", help="Forest folder (with forest.json)."),
    domain: str = typer.Option(
        ..., "--domain", help="Domain to evaluate: its valid split gives the prior, its split the score."
    ),
    corpus: str | None = CORPUS_OPT,
    prior: str = PRIOR_OPT,
    posterior: str = POSTERIOR_OPT,
    top_k: int | None = TOP_K_OPT,
    mix: str = MIX_OPT,
    temperature: float = TEMPERATURE_OPT,
    floor: float = FLOOR_OPT,
    decay: float | None = DECAY_OPT,
    with_seed: bool = WITH_SEED_OPT,
    seed_dir: Path | None = SEED_MEMBER_DIR_OPT,
    split: str = SPLIT_OPT,
    max_tokens: int = MAX_TOKENS_OPT,
    window_seed: int = WINDOW_SEED_OPT,
    prior_sequences: int = PRIOR_SEQUENCES_OPT,
    prior_batch: int = PRIOR_BATCH_OPT,
    alpha: float = ALPHA_OPT,
    save: Path | None = typer.Option(None, "--save-prior", help="Write the cached prior (and its mixing) to this JSON file."),
    load: Path | None = LOAD_PRIOR_OPT,
    device: str = DEVICE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    study_recipe: Path | None = STUDY_RECIPE_OPT,
    json_out: Path | None = JSON_OPT,
) -> None:
    """Ensemble a forest's experts on one domain: print the cached prior and the perplexity.

    The prior is the moving average of the batch-mean posterior over --prior-sequences validation windows drawn from the domain's valid split; frozen, it weights the ensemble scored on --max-tokens tokens drawn from --split, with a 95% bootstrap interval over the documents scored.
    """
    _check_prior_mode(prior)
    max_tokens, window_seed, prior_sequences, prior_batch, alpha, posterior, batch_size = study_eval_settings(ctx, study_recipe)
    posterior, mixing = resolve_mixing(posterior, temperature, floor, decay, with_seed)
    forest, corp, context, metas = _forest_setup(forest_path, corpus)
    windows = split_windows(corp, forest.tokenizer_dir, domain, split, context, max_tokens, window_seed)  # fail fast
    members = forest_members(ExpertPool(forest, pick_device(device), batch_size), metas, seed_dir)
    record = _estimate_or_load(members, corp, domain, context, prior, load, prior_sequences, prior_batch, alpha,
                               posterior, window_seed, mix, mixing)
    if save is not None:
        require(record is not None, f"--save-prior needs --prior cached, not {prior}")
        save_prior(save, record)
    posterior, mixing = used_mixing(record, posterior, mixing)
    scores, used = ensemble_scores(members, windows, prior, posterior, record, top_k, prior_batch, alpha, mixing)

    console = stdout_console()
    if record is not None:
        console.print(prior_table(record, forest, used))
    lo, hi = scores["ppl_ci"]
    console.print(
        f"{domain} {split}: perplexity {scores['ppl']:.4f} (95% CI {lo:.4f}-{hi:.4f} over {scores['documents']:,} "
        f"documents; nll {scores['nll']:.4f}, {scores['tokens']:,} tokens, prior {prior}, posterior "
        f"{'none (fixed weights)' if prior == 'uniform' else posterior}, {_mixing_text(mixing)}, "
        f"{len(used)} of {len(members.names(mixing.with_seed))} members run)"
    )
    if save is not None:
        console.print(f"wrote prior to {save}")
    if json_out is not None:
        storage.write_json(json_out, {
            "target": str(forest_path), "kind": "forest", "domain": domain, "corpus": str(corp.path),
            "split": split, "max_tokens": max_tokens, "window_seed": window_seed, "context": context,
            "prior_mode": prior, "posterior": posterior, "mixing": mixing.to_json(), "top_k": top_k,
            "experts_run": used, "prior": record.to_json() if record is not None else None, **scores,
        })


def _mixing_text(mixing: Mixing) -> str:
    if mixing == Mixing():
        return "no mixing settings"
    return (f"temperature {mixing.temperature:g}, floor {mixing.floor:g}, decay {mixing.decay:g}, "
            f"seed {'joins' if mixing.with_seed else 'out'}")


# --- eval ----------------------------------------------------------------------------------


def evaluate(
    ctx: typer.Context,
    target: Path = typer.Argument(
        ..., metavar="TARGET", help="A forest folder (ensemble) or a model folder (config.json + model.safetensors)."
    ),
    corpus: str | None = CORPUS_OPT,
    domains: str | None = typer.Option(
        None, "--domains", help="Comma-separated domains to score (default: every domain of the corpus)."
    ),
    split: str = SPLIT_OPT,
    max_tokens: int = MAX_TOKENS_OPT,
    window_seed: int = WINDOW_SEED_OPT,
    prior: str = PRIOR_OPT,
    posterior: str = POSTERIOR_OPT,
    top_k: int | None = TOP_K_OPT,
    mix: str = MIX_OPT,
    temperature: float = TEMPERATURE_OPT,
    floor: float = FLOOR_OPT,
    decay: float | None = DECAY_OPT,
    with_seed: bool = WITH_SEED_OPT,
    seed_dir: Path | None = SEED_MEMBER_DIR_OPT,
    prior_sequences: int = PRIOR_SEQUENCES_OPT,
    prior_batch: int = PRIOR_BATCH_OPT,
    alpha: float = ALPHA_OPT,
    device: str = DEVICE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    study_recipe: Path | None = STUDY_RECIPE_OPT,
    json_out: Path | None = JSON_OPT,
) -> None:
    """Per-domain perplexity of a forest (ensemble, prior estimated per domain) or one model.

    Every target is scored on the same windows: --max-tokens tokens drawn from each domain's whole split (seeded), cut at the model's context length; each perplexity comes with a 95% bootstrap interval over the documents scored.
    """
    _check_prior_mode(prior)
    max_tokens, window_seed, prior_sequences, prior_batch, alpha, posterior, batch_size = study_eval_settings(ctx, study_recipe)
    posterior, mixing = resolve_mixing(posterior, temperature, floor, decay, with_seed)
    forest = open_target(target)
    dev = pick_device(device)
    kind = "forest" if forest is not None else "model"
    result: dict[str, Any] = {"target": str(target), "kind": kind, "split": split, "max_tokens": max_tokens,
                              "window_seed": window_seed}
    if forest is not None:
        forest, corp, context, metas = _forest_setup(target, corpus)
        tokenizer_dir = forest.tokenizer_dir
        members = forest_members(ExpertPool(forest, dev, batch_size), metas, seed_dir)
    else:
        from elmforest.models.factory import load_model
        from elmforest.data.tokenizer import tokenizer_hash

        require(mix == "none" and mixing == Mixing(), "--mix and the mixing flags are for forests, not a single model", target)
        tokenizer_hash(target)  # the folder must carry its tokenizer (names the missing file)
        corp = resolve_corpus(corpus, _model_meta(target), target)
        model = load_model(target).to(dev).eval()
        tokenizer_dir, context = target, model_context(model.config)
    chosen = _csv(domains, "--domains") if domains is not None else corp.domains
    corp.require(chosen, "--domains")
    result.update(corpus=str(corp.path), context=context, domains={})
    if forest is not None:
        result.update(ensemble={"prior": prior, "posterior": posterior, "mix": mix, "mixing": {}, "top_k": top_k,
                                "experts_run": {}}, prior={})

    console = stdout_console()
    for d in chosen:
        windows = split_windows(corp, tokenizer_dir, d, split, context, max_tokens, window_seed)
        if forest is None:
            scores = model_scores(model, windows, batch_size)
        else:
            record = _estimate_or_load(members, corp, d, context, prior, None, prior_sequences, prior_batch, alpha,
                                       posterior, window_seed, mix, mixing)
            post, mixed = used_mixing(record, posterior, mixing)
            scores, used = ensemble_scores(members, windows, prior, post, record, top_k, prior_batch, alpha, mixed)
            result["ensemble"]["experts_run"][d] = used
            result["ensemble"]["mixing"][d] = {"posterior": post, **mixed.to_json()}
            if record is not None:
                result["prior"][d] = record.to_json()
        result["domains"][d] = scores

    table = Table(title=f"{target} ({result['kind']}) on {split}, {max_tokens:,} tokens per domain from the whole split")
    for col in ("domain", "ppl", "95% CI", "nll", "tokens", "documents"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    if forest is not None:
        table.add_column("top prior member")
    for d, s in result["domains"].items():
        lo, hi = s["ppl_ci"]
        row = [d, f"{s['ppl']:.4f}", f"{lo:.2f}-{hi:.2f}", f"{s['nll']:.4f}", f"{s['tokens']:,}", f"{s['documents']:,}"]
        if forest is not None:
            rec = result["prior"].get(d)
            row.append(f"{max(rec['experts'], key=rec['experts'].get)} ({max(rec['experts'].values()):.3f})" if rec else "-")
        table.add_row(*row)
    console.print(table)
    if json_out is not None:
        storage.write_json(json_out, result)
        console.print(f"wrote {json_out}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("ensemble")(ensemble)
    app.command("eval")(evaluate)
