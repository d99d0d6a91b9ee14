"""`elmforest seed`, `branch` and `train`: the BTM phases one at a time."""

from __future__ import annotations

from pathlib import Path

import typer

from elmforest.study.recipe import load_recipe
from elmforest.combine.forest import expert_weights
from elmforest.errors import ElmError

PROCS_HELP = (
    "Train the model data-parallel on this many local processes (torch.distributed: gloo on CPU, "
    "NCCL on GPU); the global batch and the results stay those of one process. Under torchrun, "
    "leave it out: the ranks torchrun started are used."
)


def _parse_parents(text: str, experts_dir: Path) -> list[tuple[Path, float]]:
    parents = []
    for part in text.split(","):
        name, sep, weight = part.partition("=")
        if not sep:
            raise ElmError(f"--from {text!r}: expected name=weight pairs, e.g. a=0.7,b=0.3")
        try:
            w = float(weight)
        except ValueError:
            raise ElmError(f"--from {text!r}: weight {weight!r} is not a number") from None
        path = Path(name.strip())
        if not path.is_dir():
            path = experts_dir / name.strip()
        if not expert_weights(path).is_file():  # a full expert's model.safetensors or an adapter's
            raise ElmError(f"--from: no trained expert {name.strip()!r} (looked in {path})")
        parents.append((path, w))
    return parents


def seed(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: the recipe's `out`)."),
    full: bool = typer.Option(False, "--full", help="Continue the same run to the whole budget (the dense baseline)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
    procs: int = typer.Option(None, "--procs", help=PROCS_HELP + " Default: the recipe's launcher.procs_per_job."),
) -> None:
    """Train the dense LM on all train domains with domain-balanced batches up to the seed fraction of the budget and save it as RUN/seed; --full continues to the dense baseline."""
    from elmforest.train import distributed
    from elmforest.checks.check import check_recipe
    from elmforest.btm.seed import prepare_tokenizer, train_seed
    from elmforest.study.run_folder import claim_run_dir

    r = load_recipe(recipe, set_)
    run_dir = out or Path(r.out)
    procs = procs or (1 if distributed.env_size() > 1 else r.launcher.procs_per_job)  # torchrun's ranks, else ours
    if distributed.env_rank() == 0:  # under torchrun, rank 0 checks and claims
        check_recipe(r, recipe, procs=1)  # the seed's own rows are checked when its ranks split a batch
        claim_run_dir(r, run_dir)
        if procs > 1:
            prepare_tokenizer(r, run_dir)  # once, before the ranks start
    result = distributed.run_procs(train_seed, r, run_dir, full=full, seed_fractions=list(r.arms.seed_fractions), procs=procs)
    if distributed.env_rank() == 0:
        print(f"seed: {run_dir / 'seed'}" + (f"; dense: {run_dir / 'dense'}" if full else ""))
        if result:
            print(f"steps {result['steps']}, tokens {result['tokens']:,}, FLOPs {result['flops']:.3e}")


def branch(
    recipe: Path = typer.Argument(..., help="YAML recipe of the run."),
    domain: str = typer.Option(..., "--domain", help="The domain the new expert trains on."),
    name: str = typer.Option(None, "--name", help="Expert name (default: the domain)."),
    from_: str = typer.Option(None, "--from", help="Branch from a weighted average of experts: a=0.7,b=0.3 (names in RUN/experts or folders)."),
    no_optimizer_state: bool = typer.Option(False, "--no-optimizer-state", help="Start AdamW afresh instead of continuing the seed's state and schedule."),
    out: Path = typer.Option(None, "--out", "-o", help="Run folder (default: the recipe's `out`)."),
    set_: list[str] = typer.Option(None, "--set", help="Override a recipe key (repeatable)."),
) -> None:
    """Create an expert folder RUN/experts/NAME initialised from the seed (weights, AdamW state, schedule position) or from a weighted parameter average of existing experts."""
    from elmforest.data.corpus import Corpus
    from elmforest.btm.experts import branch_expert, expert_job
    from elmforest.btm.seed import seed_dir

    r = load_recipe(recipe, set_)
    run_dir = out or Path(r.out)
    Corpus(r.corpus).require([domain], "--domain")
    name = name or domain
    job = expert_job(r, run_dir, name, {"kind": "domain", "domain": domain})
    target = run_dir / "experts" / name
    if from_:
        branch_expert(target, job, from_experts=_parse_parents(from_, run_dir / "experts"))
    else:
        branch_expert(target, job, from_seed=seed_dir(run_dir), copy_optimizer=not no_optimizer_state)
    print(f"branched {target}")


def job_runner(expert: Path):
    """The function that trains the job in folder `expert`, by the runner its job.json records
    (`elmforest.btm.jobs`: older records' module paths resolved, or the runner inferred)."""
    from elmforest.btm.experts import train_expert
    from elmforest.btm.jobs import ANCHORED_RUNNER, EXPERT_RUNNER, read_job
    from elmforest.mixtures.anchored import train_anchored_expert

    runners = {EXPERT_RUNNER: train_expert, ANCHORED_RUNNER: train_anchored_expert}
    return runners[read_job(expert).runner]


def train(
    expert: Path = typer.Argument(..., help="Expert folder made by `elmforest branch` (or any folder with a job.json: an anchored expert's too)."),
    threads: int = typer.Option(None, "--threads", help="torch threads per process (default: the recipe's optim.threads)."),
    procs: int = typer.Option(1, "--procs", help=PROCS_HELP),
) -> None:
    """Train one expert on its own domain to its token budget (resumes if interrupted) with the function its job.json names, and write its record (expert.json, anchored.json)."""
    from elmforest.train import distributed

    meta = distributed.run_procs(job_runner(expert), str(expert), threads, True, procs=procs, rank_threads=threads)
    if distributed.env_rank() == 0:
        print(
            f"{meta['name']}: {meta['steps']} steps, {meta['tokens']:,} tokens, FLOPs {meta['flops']:.3e}, "
            f"valid loss {meta['final_valid_loss']:.4f}"
        )


def register(app: typer.Typer) -> None:
    app.command("seed")(seed)
    app.command("branch")(branch)
    app.command("train")(train)
