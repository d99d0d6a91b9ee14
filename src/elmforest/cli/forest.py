"""`elmforest merge`, `remove` and `ls`: manage the experts of a forest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from elmforest.console import stdout_console
from elmforest.combine.forest import Forest


def merge(
    forest: Path = typer.Argument(..., help="Forest folder (created with its first expert's tokenizer if absent)."),
    expert: Path = typer.Argument(..., help="A trained expert folder (HF model files + expert.json)."),
    name: str = typer.Option(None, help="Name in the forest (default: the expert's own name)."),
) -> None:
    """Merge a trained expert into a forest (copy it in and record it in forest.json)."""
    from elmforest.combine.forest import read_expert

    meta = read_expert(expert)
    if not (forest / "forest.json").exists():
        from elmforest.models.checkpoint import verify_weights

        verify_weights(expert)  # before the new forest folder is written (merge checks it again)
        Forest.create(forest, expert, meta["tokenizer_hash"], meta["arch_hash"])
    entry = Forest(forest).merge(expert, name=name)
    print(f"merged {entry.name} (domain {entry.domain}) into {forest}")


def remove(
    forest: Path = typer.Argument(..., help="Forest folder."),
    name: str = typer.Argument(..., help="Expert to drop."),
) -> None:
    """Remove an expert from a forest (its data leaves the model; nothing is retrained)."""
    Forest(forest).remove(name)
    print(f"removed {name} from {forest}")


def ls(forest: Path = typer.Argument(..., help="Forest folder.")) -> None:
    """List a forest's experts with their domain, tokens and final valid loss."""
    f = Forest(forest)
    table = Table(title=f"{forest} ({len(f.experts)} experts)")
    for col in ("name", "domain", "parents", "tokens", "FLOPs", "valid loss"):
        table.add_column(col)
    for e in f.experts:
        meta = f.expert_meta(e.name)
        parents = meta.get("parents", "")
        if isinstance(parents, list):
            parents = ", ".join(f"{p['name']}={p['weight']:.2f}" for p in parents)
        loss = meta.get("final_valid_loss")
        table.add_row(
            e.name,
            e.domain,
            str(parents),
            f"{meta.get('tokens', 0):,}",
            f"{meta.get('flops', 0):.2e}",
            "-" if loss is None else f"{loss:.3f}",
        )
    stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
    app.command("remove")(remove)
    app.command("ls")(ls)
