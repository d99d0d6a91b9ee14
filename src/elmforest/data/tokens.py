"""Token caches: each split of a corpus tokenised once into a flat memory-mapped array.

    CORPUS/.cache/tokens/<tokenizer hash>/<domain>/<split>.bin    raw token ids, little-endian
    CORPUS/.cache/tokens/<tokenizer hash>/<domain>/<split>.json   dtype, length, source size/mtime

The array is the split's documents, in file order, each followed by the tokenizer's
end-of-text id: `doc0 EOS doc1 EOS ... docN EOS`. Ids are stored as uint16 when the vocabulary
fits (<= 65536 ids: 2 bytes a token), else uint32. A cache is reused while its split file keeps
the size and modification time recorded in the meta file; otherwise it is rebuilt. Samplers
read it through `np.memmap`, so a split far larger than memory costs only page cache.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from elmforest import storage
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError
from elmforest.data.tokenizer import load_tokenizer, tokenizer_hash, vocab_size

CACHE_DIR = Path(".cache") / "tokens"
FORMAT = "elmforest-tokens/1"
# Documents per encode_batch call: large enough for the Rust side to parallelise, small enough
# that one batch of long documents stays a few MB of Python strings.
BATCH_DOCUMENTS = 512


def token_dtype(n_ids: int) -> np.dtype:
    """uint16 holds ids 0..65535, so a vocabulary of up to 65536 ids takes 2 bytes a token."""
    return np.dtype(np.uint16) if n_ids <= 2**16 else np.dtype(np.uint32)


def encode_documents(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Yield each document's ids (no special tokens added), encoding `BATCH_DOCUMENTS` at a time.

    One batch ahead is encoded in a worker thread (the Rust tokenizer releases the GIL), so
    reading the next batch's texts and using the previous batch's ids overlap the encoding.
    """
    backend = tokenizer.backend_tokenizer  # the Rust `tokenizers.Tokenizer` behind the HF wrapper
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets we do not need.
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for text in texts:
            batch.append(text)
            if len(batch) == BATCH_DOCUMENTS:
                yield batch
                batch = []
        if batch:
            yield batch

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending = None
        for batch in batches():
            ahead = pool.submit(encode_batch, batch, add_special_tokens=False)
            if pending is not None:
                for enc in pending.result():
                    yield enc.ids
            pending = ahead
        if pending is not None:
            for enc in pending.result():
                yield enc.ids


def cache_paths(corpus: Corpus, tokenizer_hash_: str, domain: str, split: str) -> tuple[Path, Path]:
    """(array file, meta file) of one split's token cache."""
    folder = corpus.path / CACHE_DIR / tokenizer_hash_ / domain
    return folder / f"{split}.bin", folder / f"{split}.json"


def _source_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_cache(bin_path: Path, meta_path: Path, source: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached array when it is complete and its split file is unchanged, else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        length = int(meta["length"])
        if meta.get("format") != FORMAT or meta.get("source") != _source_stamp(source):
            return None
        if length <= 0 or bin_path.stat().st_size != length * dtype.itemsize:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(length,)), meta


def _build_cache(corpus: Corpus, tokenizer_dir: Path, domain: str, split: str, bin_path: Path, meta_path: Path) -> dict[str, Any]:
    """Tokenise one split into `bin_path` (atomically) and write its meta file; return the meta."""
    source = corpus.split_path(domain, split)
    if not source.is_file():
        raise ElmError("split file is missing", source)
    stamp = _source_stamp(source)  # taken before reading: a concurrent edit makes the cache stale
    tok = load_tokenizer(tokenizer_dir)
    eos = int(tok.eos_token_id)
    dtype = token_dtype(vocab_size(tok))
    length = documents = 0
    with storage.atomic_path(bin_path) as tmp, open(tmp, "wb") as f:
        for ids in encode_documents(tok, corpus.texts(domain, split)):
            arr = np.asarray(ids + [eos], dtype=dtype)  # numpy refuses an id the dtype cannot hold
            arr.tofile(f)  # native byte order (little-endian on every platform torch supports)
            length += arr.size
            documents += 1
        if documents == 0:
            raise ElmError("split is empty: no documents to tokenise", source)
    meta = {
        "format": FORMAT,
        "tokenizer_hash": tokenizer_hash(tokenizer_dir),
        "domain": domain,
        "split": split,
        "dtype": dtype.name,
        "length": length,
        "documents": documents,
        "eos_id": eos,
        "source": stamp,
    }
    storage.write_json(meta_path, meta)
    return meta


def _record_tokens(corpus: Corpus, domain: str, split: str, tok_hash: str, n: int) -> None:
    """Record `n` tokens as manifest["domains"][domain]["splits"][split]["tokens"][tok_hash].

    Counts are keyed by tokenizer hash because one corpus may be tokenised by several tokenizers.
    Several processes may tokenise splits of the same corpus at once, so the manifest is re-read
    and rewritten under a lock (a stale in-memory copy would drop the others' counts).
    """

    def put(manifest: dict[str, Any]) -> None:
        splits = manifest["domains"][domain].setdefault("splits", {})
        counts = splits.setdefault(split, {}).setdefault("tokens", {})
        counts[tok_hash] = n

    known = corpus.manifest["domains"][domain].get("splits", {}).get(split, {}).get("tokens", {})
    if isinstance(known, dict) and known.get(tok_hash) == n:
        return
    lock_path = corpus.path / CACHE_DIR / "manifest.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_path)):
        Corpus(corpus.path).update_manifest(put)
    put(corpus.manifest)  # keep the caller's copy in step with the file


def token_array(corpus: Corpus, tokenizer_dir: Path, domain: str, split: str) -> np.ndarray:
    """The split's token ids as a read-only 1-D memmap, tokenising and caching it on first use.

    Layout `doc0 EOS doc1 EOS ... docN EOS`; dtype uint16 when the vocabulary has <= 65536 ids,
    else uint32. Raises ElmError naming the file when the split is missing or empty.
    """
    tokenizer_dir = Path(tokenizer_dir)
    source = corpus.split_path(domain, split)
    if not source.is_file():
        raise ElmError("split file is missing", source)
    tok_hash = tokenizer_hash(tokenizer_dir)
    bin_path, meta_path = cache_paths(corpus, tok_hash, domain, split)
    cached = _read_cache(bin_path, meta_path, source)
    if cached is None:
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        # One process tokenises while the others wait, then they all read its cache.
        with FileLock(str(bin_path.with_suffix(".lock"))):
            cached = _read_cache(bin_path, meta_path, source)
            if cached is None:
                _build_cache(corpus, tokenizer_dir, domain, split, bin_path, meta_path)
                cached = _read_cache(bin_path, meta_path, source)
    if cached is None:  # the split file changed while we tokenised it
        raise ElmError("split file changed while it was being tokenised; run again", source)
    array, meta = cached
    _record_tokens(corpus, domain, split, tok_hash, int(meta["length"]))
    return array


def cached_token_count(corpus: Corpus, tokenizer_hash_: str, domain: str, split: str) -> int | None:
    """Tokens of a split as recorded in the manifest by `token_array`, or None when not yet known."""
    counts = corpus.manifest["domains"].get(domain, {}).get("splits", {}).get(split, {}).get("tokens")
    if isinstance(counts, dict) and tokenizer_hash_ in counts:
        return int(counts[tokenizer_hash_])
    return None

