"""The console the commands print their results (rich tables) to on stdout.

On a terminal rich fits tables to the window, as usual. When stdout is not a terminal (piped
into `cat` or `grep`, redirected to a file, captured by a script) rich assumes 80 columns and
wraps any wider table, splitting words and numbers over several lines; a script reading the
output then cannot take a row as a line. So off a terminal the console is as wide as
`PIPE_WIDTH`: tables keep their natural width (a table is never padded to the console's
width), each row stays on one line, and no colour codes are written.
"""

from __future__ import annotations

from rich.console import Console

# Wider than any table the commands print; rich only wraps what exceeds the console width.
PIPE_WIDTH = 10_000


def stdout_console() -> Console:
    """A `rich.console.Console` on stdout: the terminal's width on a terminal, else `PIPE_WIDTH`."""
    console = Console()
    if console.is_terminal:
        return console
    return Console(width=PIPE_WIDTH)
