"""`elmforest grow`, `forget` and `compare`: new domains into a forest, a domain out of it, and
two runs side by side (e.g. a c-BTM clustered forest beside the domain-labelled one)."""

from __future__ import annotations

from pathlib import Path

import typer

from elmforest.errors import ElmError


def _recipe(recipe: Path | None, run_dir: Path, corpus: Path | None = None):
    """The given recipe, else the run's RUN/recipe.yaml; `corpus` overrides its corpus."""
    from elmforest.study.recipe import load_recipe

    path = recipe or run_dir / "recipe.yaml"
    if recipe is None and not path.is_file():
        raise ElmError("no --recipe given and the run folder has no recipe.yaml", run_dir)
    r = load_recipe(path)
    if corpus is not None:
        r = r.model_copy(update={"corpus": str(corpus)})
    return r


def _run_of(forest: Path) -> Path:
    """The run folder holding a forest: the nearest folder above it with tokenizer/tokenizer.json."""
    for folder in forest.resolve().parents:
        if (folder / "tokenizer" / "tokenizer.json").is_file():
            return folder
    raise ElmError("no run folder (with tokenizer/) above this forest; pass --run", forest)


def grow(
    forest: Path = typer.Argument(..., help="Forest folder to grow (e.g. RUN/forest)."),
    domain: str = typer.Option(..., "--domain", help="The new domain (a domain of the corpus); also the expert's name."),
    recipe: Path = typer.Option(
        None, "--recipe", help="Recipe that sizes the expert (default: RUN/recipe.yaml of the run holding the forest)."
    ),
    corpus: Path = typer.Option(None, "--corpus", help="Corpus holding the new domain (default: the recipe's)."),
    top_k: int = typer.Option(2, "--top-k", help="Average the k experts with the largest prior on the new domain."),
    init: str = typer.Option(
        "mixture", "--init",
        help="mixture: prior-weighted average of the top-k experts; seed: the run's seed; nearest: the top-1 expert.",
    ),
    run: Path = typer.Option(
        None, "--run", help="Run folder with tokenizer/ (and seed/ for --init seed); default: the nearest folder above the forest holding tokenizer/."
    ),
    out_expert: Path = typer.Option(
        None, "--out-expert", help="Where the new expert trains (default RUN/experts/<domain>, RUN/experts_<init>init/<domain>)."
    ),
) -> None:
    """Add a new domain to a trained forest: branch its expert from the forest's prior-weighted average, train it with a round-1 expert's budget (fresh optimizer and schedule), merge it. Rerun the same command to resume an interrupted training."""
    from elmforest.btm.growth import grow_expert

    run_dir = run or _run_of(forest)
    meta = grow_expert(_recipe(recipe, run_dir, corpus), run_dir, forest, domain, top_k=top_k, init=init,
                       expert_dir=out_expert)
    parents = meta["parents"]
    how = "seed" if parents == "seed" else ", ".join(f"{p['name']} {p['weight']:.3f}" for p in parents)
    prior = ", ".join(f"{k} {v:.3f}" for k, v in meta["grow"]["prior"].items())
    print(f"prior on {domain}: {prior}")
    print(f"grew {meta['name']} from {how}: {meta['steps']} steps, {meta['tokens']:,} tokens, "
          f"valid loss {meta['final_valid_loss']:.3f}; merged into {forest}")


def forget(
    run: Path = typer.Argument(..., help="Run folder (of `elmforest run` or an incremental run)."),
    domain: str = typer.Option(..., "--domain", help="Domain whose expert is removed."),
    forest: Path = typer.Option(None, "--forest", help="Forest to use (default RUN/forest or the last round's)."),
) -> None:
    """Show that removing a domain's expert removes the domain: copy the forest, drop the expert, and compare the cached-prior ensemble's perplexity before and after on that domain, the other domains and the novel ones. Writes RUN/forget_<domain>.json; the original forest is untouched."""
    from elmforest.study.removal import removal_study, removal_table

    result = removal_study(_recipe(None, run), run, domain, forest_dir=forest)
    print(removal_table(result))
    print(f"wrote {run / f'forget_{domain}.json'}")


def compare(
    run_a: Path = typer.Argument(..., help="First run folder (e.g. the domain-labelled study)."),
    run_b: Path = typer.Argument(..., help="Second run folder (e.g. the c-BTM clustered study)."),
    router: bool = typer.Option(
        False, "--router",
        help="Add RUN_B's c-BTM router ensemble (row cbtm_ensemble_router), routing by RUN_B's corpus clusterer/.",
    ),
    temperature: float = typer.Option(None, "--temperature", help="Router softmax temperature (default 0.1)."),
    top_k: int = typer.Option(None, "--top-k", min=1, help="Route each window to the k nearest clusters' experts only."),
) -> None:
    """Print two runs' results side by side (train and novel means, each novel domain); for a c-BTM run also its clustering (contingency table, adjusted Rand index)."""
    import json

    from elmforest.study.compare import compare_runs, router_row

    extra = None
    rb = _recipe(None, run_b)
    cluster_json = Path(rb.corpus) / "cluster.json"
    if router:
        row = router_row(rb, run_b, Path(rb.corpus) / "clusterer", temperature, top_k=top_k)
        extra = {"cbtm_ensemble_router": row["cbtm_ensemble_router"]}
    print(compare_runs(run_a, run_b, extra))
    if cluster_json.is_file():
        summary = json.loads(cluster_json.read_text(encoding="utf-8"))
        c = summary["contingency"]
        print(f"\n{run_b.name}: documents per source domain (rows) and cluster (columns)")
        print("  ".join(["domain".ljust(14), *[n.rjust(9) for n in c["columns"]]]))
        for name, counts in zip(c["rows"], c["counts"]):
            print("  ".join([name.ljust(14), *[str(x).rjust(9) for x in counts]]))
        print(f"adjusted Rand index: {summary['adjusted_rand_index']:.4f}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("grow")(grow)
    app.command("forget")(forget)
    app.command("compare")(compare)
