"""The `elmforest` command line. Each concept's commands live in `elmforest.cli.<name>`.

Errors the user can fix (`ElmError`) print one line on stderr and exit with status 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from elmforest.errors import ElmError

app = typer.Typer(
    name="elmforest",
    help="Branch-Train-Merge: train a language model as a forest of domain experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, each with `register(app)`; listed here so `--help` shows a stable order.
COMMAND_MODULES = [
    "corpus",
    "cluster",
    "tokenizer",
    "model",
    "train",
    "forest",
    "combine",
    "average",
    "generate",
    "harness",
    "study",
    "grow",
    "mix",
    "anchored",
    "check",
]

_DEBUG = {"on": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    _DEBUG["on"] = debug


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"elmforest.cli.{name}")
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # non-standalone click returns typer.Exit's code
            sys.exit(code)
    except ElmError as e:
        if debug:
            raise
        print(f"elmforest: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("elmforest: interrupted; rerun the same command to continue", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's usage errors arrive here in non-standalone mode
        if type(e).__name__ == "Abort":
            sys.exit(130)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            if debug:
                raise
            print(f"elmforest: error: {' '.join(e.format_message().split())}", file=sys.stderr)
            sys.exit(2)
        raise
