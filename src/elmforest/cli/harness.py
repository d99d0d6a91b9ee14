"""`elmforest lm-eval`: score a forest (or a model folder) with lm-evaluation-harness.

lm-eval 0.4.x loads model classes only from its own package, so this command registers
`elmforest` (`elmforest.combine.harness`) and then runs lm-eval's own `run` command with
`--model elmforest --model_args {"pretrained": TARGET, ...}`: lm-eval's option spellings, its
task loading, and its usual results and samples files under --output_path. Options this command
does not name are passed to `lm-eval run` unchanged (--num_fewshot, --gen_kwargs, --seed, ...).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import typer

from elmforest.cli.combine import DEVICE_OPT, pick_device
from elmforest.errors import ElmError


def _require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ElmError("lm-evaluation-harness is not installed; install it with: pip install 'elmforest[lm-eval]'")


def lm_eval_command(
    ctx: typer.Context,
    target: Path = typer.Argument(..., metavar="TARGET", help="A forest folder (ensemble) or a model folder."),
    tasks: str = typer.Option(
        ..., "--tasks", help="lm-eval task names or groups, comma-separated (e.g. hellaswag,lambada_openai)."
    ),
    prior: str = typer.Option(
        "updating", "--prior",
        help="updating (moving average carried across the scored requests), flat (1/n for every request, the posterior "
        "following each request's tokens), uniform (fixed 1/n weights, no per-token update) or cached:DOMAIN "
        "(estimated on DOMAIN's valid split, then frozen).",
    ),
    posterior: str | None = typer.Option(
        None, "--posterior", help="Per-token weights (default: the recipe's eval.posterior recorded in expert.json, else one_step)."
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", min=1, help="Run only the k experts with the largest cached prior (needs cached:DOMAIN or --load-prior)."
    ),
    corpus: str | None = typer.Option(
        None, "--corpus", help="Corpus whose valid split gives a cached prior (default: the one recorded in expert.json)."
    ),
    load_prior: Path | None = typer.Option(
        None, "--load-prior", help="Use a prior saved with `elmforest ensemble --save-prior` (and its mixing settings)."
    ),
    include_path: str | None = typer.Option(None, "--include_path", help="lm-eval: extra folder of task YAMLs."),
    output_path: str | None = typer.Option(None, "--output_path", help="lm-eval: folder (or .json) for results and samples."),
    log_samples: bool = typer.Option(False, "--log_samples", help="lm-eval: also write every request and response."),
    limit: float | None = typer.Option(None, "--limit", help="lm-eval: documents per task (a count, or a fraction < 1)."),
    batch_size: str = typer.Option("8", "--batch_size", help="lm-eval: requests per forward pass (an integer, or auto)."),
    device: str = DEVICE_OPT,
) -> None:
    """Run lm-evaluation-harness tasks on a forest's ensemble or on one model folder.

    Writes lm-eval's usual results (and with --log_samples its samples) files; any other `lm-eval run` option is passed through.
    """
    _require_lm_eval()
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    from elmforest.combine.harness import check_harness_args  # also registers `elmforest` with lm-eval

    if load_prior is not None and prior == "updating":
        prior = None  # the file's prior
    check_harness_args(target, prior, top_k, load_prior)  # fail before lm-eval indexes its tasks
    model_args = {"pretrained": str(target), "prior": prior, "posterior": posterior, "top_k": top_k,
                  "corpus": corpus, "load_prior": str(load_prior) if load_prior is not None else None}
    argv = ["run", "--model", "elmforest", "--model_args", json.dumps({k: v for k, v in model_args.items() if v is not None}),
            "--tasks", tasks, "--batch_size", batch_size, "--device", pick_device(device)]
    for flag, value in (("--include_path", include_path), ("--output_path", output_path), ("--limit", limit)):
        if value is not None:
            argv += [flag, str(int(value) if flag == "--limit" and float(value).is_integer() else value)]
    if log_samples:
        argv.append("--log_samples")
    argv += list(ctx.args)
    setup_logging()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        harness = HarnessCLI()
        harness.execute(harness.parse_args())
    finally:
        sys.argv = saved


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(lm_eval_command)
