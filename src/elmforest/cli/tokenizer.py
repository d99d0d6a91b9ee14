"""`elmforest tokenizer train`: a byte-level BPE tokenizer for a corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError


def _parse_domains(corpus: Corpus, domains: str | None) -> list[str]:
    if not domains:
        return corpus.domains
    names = [d.strip() for d in domains.split(",") if d.strip()]
    if not names:
        raise ElmError(f"--domains {domains!r} names no domain")
    corpus.require(names, "--domains")
    return names


def train(
    corpus: Path = typer.Argument(..., help="Corpus folder (with manifest.json), as written by `elmforest corpus`."),
    vocab_size: int = typer.Option(4096, "--vocab-size", help="Vocabulary size, the special token included (>= 257)."),
    out: Path = typer.Option(..., "--out", help="Folder to write the tokenizer to; must not exist or be empty."),
    domains: str = typer.Option(
        None, "--domains", help="Comma-separated domains to train on, e.g. 'code,legal'. Default: all."
    ),
    sample_bytes: int = typer.Option(
        4_000_000, "--sample-bytes", help="Bytes of training text sampled from each domain's train split."
    ),
) -> None:
    """Train a byte-level BPE tokenizer on the corpus, the same amount of text from every domain.

    Prints the vocabulary size, the tokenizer hash, and bytes per token on each domain's valid split (higher means better compression of that domain).
    """
    from elmforest.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer, vocab_size as n_ids
    from elmforest.data.tokens import encode_documents

    c = Corpus(corpus)
    names = _parse_domains(c, domains)
    path = train_tokenizer(c, names, vocab_size, out, sample_bytes_per_domain=sample_bytes)
    tok = load_tokenizer(path)
    typer.echo(f"tokenizer  {path}")
    typer.echo(f"vocab size {n_ids(tok)}")
    typer.echo(f"hash       {tokenizer_hash(path)}")
    typer.echo("bytes/token on the valid split:")
    for d in c.domains:
        texts = list(c.texts(d, "valid"))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(ids) for ids in encode_documents(tok, texts))
        figure = f"{n_bytes / n_tokens:6.2f}" if n_tokens else "     -"
        mark = "" if d in names else "  (not trained on)"
        typer.echo(f"  {d:<24} {figure}{mark}")


def register(app: typer.Typer) -> None:
    """Add `elmforest tokenizer ...` to the app."""
    group = typer.Typer(help="Train and inspect the forest's BPE tokenizer.", no_args_is_help=True)
    group.command("train")(train)
    app.add_typer(group, name="tokenizer")
