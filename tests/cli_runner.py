"""Run the `elmforest` CLI in-process in tests."""

from __future__ import annotations

from elmforest.cli import main


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run the CLI in-process -> (exit status, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
