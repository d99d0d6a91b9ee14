"""`elmforest merge`, `remove` and `ls`: manage the experts of a forest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from elmforest.console import stdout_console
from elmforest.combine.forest import Forest


def merge(
    forest: Path = typer.Argument(..., help="Forest folder (created with its first expert's tokenizer if absent)."),
    expert: Path = typer.Argument(..., help="A trained expert folder (HF model files + expert.json, or an adapter "
                                  "expert's PEFT files + expert.json naming its base)."),
    name: str = typer.Option(None, help="Name in the forest (default: the expert's own name)."),
) -> None:
    """Merge a trained expert into a forest (copy it in and record it in forest.json).

    A new forest of adapter experts stores the first one's base (expert.json `base`) in FOREST/base;
    an adapter expert whose base hash differs from the forest's is refused."""
    from elmforest.combine.forest import expert_weights, is_adapter_expert, read_expert

    meta = read_expert(expert)
    if not (forest / "forest.json").exists():
        from elmforest.models.checkpoint import verify_weights

        verify_weights(expert_weights(expert))  # before the new forest folder is written (merge checks it again)
        base = Path(meta["base"]) if is_adapter_expert(meta) and isinstance(meta.get("base"), str) else None
        if is_adapter_expert(meta) and (base is None or not base.is_dir()):
            from elmforest.errors import ElmError

            raise ElmError(f"field 'base': the adapter expert's base folder {meta.get('base')!r} is not there", expert / "expert.json")
        Forest.create(forest, base or expert, meta["tokenizer_hash"], meta["arch_hash"], base_dir=base)
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
