"""`elmforest generate`: continue a prompt with a forest's ensemble (the posterior follows the
text, with the mixing settings of a prior file, `--mix auto` or the flags) or one model."""

from __future__ import annotations

from pathlib import Path

import typer

from elmforest.cli.combine import (
    CORPUS_OPT,
    DECAY_OPT,
    DEVICE_OPT,
    FLOOR_OPT,
    MIX_OPT,
    POSTERIOR_OPT,
    SEED_MEMBER_DIR_OPT,
    WITH_SEED_OPT,
    pick_device,
    forest_members,
    used_mixing,
    open_target,
    resolve_mixing,
)
from elmforest.combine.ensemble import Mixing
from elmforest.errors import require
from elmforest.combine.prior import load_prior
from elmforest.combine.scoring import ExpertPool, check_forest_consistency, forest_context, resolve_corpus, tuned_prior


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
        None, "--prior-file", help="A prior saved with `ensemble --save-prior` (default: uniform); brings its mixing settings."
    ),
    mix: str = MIX_OPT,
    domain: str | None = typer.Option(None, "--domain", help="With --mix auto: the domain whose valid windows tune the mixing."),
    corpus: str | None = CORPUS_OPT,
    mix_temperature: float = typer.Option(
        1.0, "--mix-temperature", help="Posterior temperature (--temperature is the sampling temperature here)."
    ),
    floor: float = FLOOR_OPT,
    decay: float | None = DECAY_OPT,
    with_seed: bool = WITH_SEED_OPT,
    seed_dir: Path | None = SEED_MEMBER_DIR_OPT,
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute every expert over the whole text at each step (slow; no KV cache)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler."),
    device: str = DEVICE_OPT,
) -> None:
    """Continue a prompt with a forest's ensemble (posterior following the text) or one model."""
    from elmforest.combine.generate import generate
    from elmforest.models.factory import load_model
    from elmforest.data.tokenizer import load_tokenizer

    posterior, mixing = resolve_mixing(posterior, mix_temperature, floor, decay, with_seed)
    forest = open_target(target)
    dev = pick_device(device)
    prior = None
    if forest is not None:
        metas = check_forest_consistency(forest)
        members = forest_members(ExpertPool(forest, dev), metas, seed_dir)
        record = None
        if mix == "auto":
            require(domain is not None, "--mix auto needs --domain (whose valid windows tune the mixing)")
            require(prior_file is None, "--mix auto estimates its own prior; drop --prior-file")
            corp = resolve_corpus(corpus, metas.values(), forest.path / "forest.json")
            record = tuned_prior(members, corp, domain, forest_context(forest))
        elif prior_file is not None:
            record = load_prior(prior_file, forest.names)
        else:
            require(mix == "none", f"--mix {mix!r}: choose none or auto")
        posterior, mixing = used_mixing(record, posterior, mixing)
        names = members.names(mixing.with_seed)
        weights = record.vector(names) if record is not None else None
        used = names if weights is None else [n for n, w in zip(names, weights.tolist()) if w > 0]
        models = members.models(used)  # experts with zero prior never load
        prior = None if weights is None else weights[weights > 0]
        tokenizer = load_tokenizer(forest.tokenizer_dir)
    else:
        require(prior_file is None, "--prior-file is for forests, not a single model", target)
        require(mix == "none" and mixing == Mixing(), "--mix and the mixing flags are for forests, not a single model", target)
        models = [load_model(target).to(dev).eval()]
        tokenizer = load_tokenizer(target)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    new = generate(
        models, tokenizer, ids, max_new_tokens, temperature=temperature, top_p=top_p, greedy=greedy,
        prior=prior, posterior=posterior, use_cache=not no_cache, seed=seed, mixing=mixing,
    )
    # decode prompt and continuation together: a character may straddle their byte boundary
    print(tokenizer.decode(list(ids) + new, skip_special_tokens=True))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("generate")(generate_text)
