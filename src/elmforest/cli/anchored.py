"""`elmforest anchored` and `elmforest opt-out`: FlexOlmo-style anchored experts merged into one
mixture-of-experts that a domain can be opted out of."""

from __future__ import annotations

from pathlib import Path

import typer

from elmforest.errors import ElmError


def _run_recipe(run: Path):
    from elmforest.study.recipe import load_recipe

    path = run / "recipe.yaml"
    if not path.is_file():
        raise ElmError("not a run folder: no recipe.yaml (run `elmforest run` first)", run)
    return load_recipe(path)


def anchored(
    run: Path = typer.Argument(..., help="Run folder of `elmforest run` whose seed is llama-family (RUN/seed)."),
    router_rows: str = typer.Option(
        "trained", "--router-rows",
        help="Router rows of the merged mixture: trained (FlexOlmo's: as each expert's training left them) or "
        "embeddings (the domain embeddings they started from).",
    ),
    top_k: int = typer.Option(None, "--top-k", help="Experts per token in the merged mixture (default: min(4, experts), FlexOlmo's 4)."),
    router_tokens: int = typer.Option(
        0, "--router-tokens",
        help="Tokens of optional router tuning (only the router rows train, domain-balanced) into RUN/anchored_moe_router_tuned; 0: none.",
    ),
    embed_windows: int = typer.Option(64, "--embed-windows", help="Train windows per domain averaged into its router row's embedding."),
) -> None:
    """Train one anchored expert per train domain beside the frozen seed (FlexOlmo: only the domain's copy of every feed-forward layer and its router row learn, on the BTM experts' budget) into RUN/anchored_experts/, merge them with no joint training into RUN/anchored_moe (a Mixtral folder: the seed's expert plus one per domain, top-k routing), and optionally tune the router rows. Resumable: run it again to continue."""
    from elmforest.mixtures.anchored import read_anchored, train_anchored_experts
    from elmforest.mixtures.anchored_moe import TUNED_DIR, build_anchored_moe, read_moe, tune_router

    recipe = _run_recipe(run)
    dirs = train_anchored_experts(recipe, run)
    moe = build_anchored_moe(recipe, run, router_rows=router_rows, top_k=top_k)
    meta = read_moe(moe)
    train = meta["train"]
    ratio = read_anchored(dirs[0])["flops_per_token"]["anchored_over_btm"]  # the same for every expert
    print(f"anchored experts: {len(dirs)} in {run / 'anchored_experts'}; a training step costs "
          f"{ratio:.3f}x a BTM expert's per token (counted)")
    print(f"merged mixture: {moe} ({len(meta['experts'])} experts, top-{meta['top_k']}, {meta['router_rows']} router rows, "
          f"{meta['params'] / 1e6:.2f}M parameters); training {train['tokens']:,} tokens, {train['flops']:.3e} FLOPs (seed included)")
    if router_tokens > 0:
        tuned = tune_router(recipe, run, router_tokens)["router_tuning"]
        print(f"router tuning: {run / TUNED_DIR}, {tuned['tokens']:,} extra tokens, {tuned['flops']:.3e} extra FLOPs")


def opt_out(
    run: Path = typer.Argument(..., help="Run folder holding the merged anchored mixture."),
    domain: str = typer.Option(..., "--domain", help="Domain whose expert and router row are dropped."),
    moe: Path = typer.Option(None, "--moe", help="Merged mixture to use (default RUN/anchored_moe)."),
) -> None:
    """Opt a domain out of the merged anchored mixture: write it without that domain's expert and router row (RUN/<mixture>_optout_<domain>/, a Mixtral folder with one expert fewer) and compare test perplexity before and after on that domain, the mixture's other domains and the novel ones. Writes RUN/<mixture>_optout_<domain>.json; the mixture itself is untouched."""
    from elmforest.mixtures.anchored_moe import opt_out_study
    from elmforest.study.removal import removal_table

    result = opt_out_study(_run_recipe(run), run, domain, moe_dir=moe)
    print(removal_table(result))
    print(f"wrote {result['moe_after']} and {Path(result['moe_after']).with_suffix('.json')}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("anchored")(anchored)
    app.command("opt-out")(opt_out)
