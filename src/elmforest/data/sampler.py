"""Batch samplers over token arrays.

Every sampler yields `torch.LongTensor [B, block + 1]`: B random windows of block + 1 tokens,
so a batch gives inputs `x = batch[:, :-1]` and targets `y = batch[:, 1:]` (shifted by one).
Windows may span document boundaries; the EOS token between documents tells the model.

Batch number i is a pure function of (seed, i): its random generator is seeded with [seed, i].
A sampler's whole state is therefore {"batches": i, "seed": seed}, and a resumed run draws
exactly the batches the interrupted one would have drawn, with no RNG state to save.

- `DomainSampler`: one domain's array (an expert trains on its domain only).
- `BalancedSampler`: exactly `blocks_per_domain` windows from every domain in each batch, in a
  fixed domain order (the seed and the dense baseline: every update sees equal tokens per domain).
- `RandomSplitSampler`: the random-split baseline: training tokens cut into equal chunks, the
  chunks dealt at random into n parts; samples from part i. `balanced=True` (the study's): each
  domain's chunks are dealt separately and the rows of successive batches cycle through the
  domains, so every random expert sees the same domain-balanced mixture as the seed and the dense
  model (equal tokens per domain); `balanced=False` pools all chunks (each domain in proportion to
  its size).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from elmforest.errors import ElmError


def _check_sizes(block: int, rows: int, rows_name: str) -> None:
    if block < 1:
        raise ElmError(f"context length (block) must be at least 1, got {block}")
    if rows < 1:
        raise ElmError(f"{rows_name} must be at least 1, got {rows}")


def _check_array(array: np.ndarray, block: int, name: str) -> None:
    """A window needs block + 1 tokens (block inputs plus the one-step-shifted last target)."""
    if array.ndim != 1:
        raise ElmError(f"token array of domain {name!r} must be 1-D, got shape {tuple(array.shape)}")
    if len(array) < block + 1:
        raise ElmError(
            f"split too small for context length {block}: domain {name!r} has {len(array)} tokens, "
            f"a window needs {block + 1}"
        )


def _windows(array: np.ndarray, starts: np.ndarray, block: int) -> np.ndarray:
    """Rows array[s : s + block + 1] for each start s -> int64 [len(starts), block + 1]."""
    index = starts[:, None] + np.arange(block + 1)[None, :]  # [B, block+1]
    return np.asarray(array[index], dtype=np.int64)


class _Sampler:
    """Shared bookkeeping: the batch counter, state_dict/load_state_dict, iteration.

    Subclasses implement `batch(i)`, which must depend only on (seed, i).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.batches = 0  # batches drawn so far == index of the next batch

    def batch(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def _rng(self, i: int, *stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, i, *stream])

    def next_batch(self) -> torch.Tensor:
        """The next batch, LongTensor [B, block + 1]."""
        out = self.batch(self.batches)
        self.batches += 1
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume after `state["batches"]` batches; the seed must match the one the sampler was built with."""
        try:
            batches, seed = int(state["batches"]), int(state["seed"])
        except (KeyError, TypeError, ValueError):
            raise ElmError(f"sampler state must hold integer 'batches' and 'seed', got {dict(state)!r}") from None
        if seed != self.seed:
            raise ElmError(f"sampler state was saved with seed {seed}, but this run uses seed {self.seed}")
        if batches < 0:
            raise ElmError(f"sampler state 'batches' must be >= 0, got {batches}")
        self.batches = batches


class DomainSampler(_Sampler):
    """`batch_blocks` windows at uniform random starts in one domain's array."""

    def __init__(self, array: np.ndarray, block: int, batch_blocks: int, seed: int, name: str = "domain"):
        super().__init__(seed)
        _check_sizes(block, batch_blocks, "batch_blocks")
        _check_array(array, block, name)
        self.array, self.block, self.batch_blocks, self.name = array, block, batch_blocks, name

    def batch(self, i: int) -> torch.Tensor:
        # Starts 0 .. len - (block + 1) inclusive, so every window lies inside the array.
        starts = self._rng(i).integers(0, len(self.array) - self.block, size=self.batch_blocks)
        return torch.from_numpy(_windows(self.array, starts, self.block))


class BalancedSampler(_Sampler):
    """Each batch: `blocks_per_domain` windows from every domain, domains in the dict's order.

    Rows [j * blocks_per_domain, (j + 1) * blocks_per_domain) come from domain j, so every
    update sees the same number of tokens from each domain (B = n_domains * blocks_per_domain).
    Each domain's windows come from their own generator [seed, i, crc32(name)], so they do not
    depend on which other domains are in the mix or in what order.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], block: int, blocks_per_domain: int, seed: int):
        super().__init__(seed)
        _check_sizes(block, blocks_per_domain, "blocks_per_domain")
        if not arrays:
            raise ElmError("BalancedSampler needs at least one domain")
        for name, array in arrays.items():
            _check_array(array, block, name)
        self.arrays = dict(arrays)
        self.domains = list(self.arrays)
        self.block, self.blocks_per_domain = block, blocks_per_domain
        self._streams = [zlib.crc32(name.encode("utf-8")) for name in self.domains]  # stable across runs
        # Row r came from domain row_domains[r]: [0,0,..,1,1,..] (fixed for every batch).
        self.row_domains = torch.arange(len(self.domains)).repeat_interleave(blocks_per_domain)

    def batch(self, i: int) -> torch.Tensor:
        rows = [
            _windows(a, self._rng(i, stream).integers(0, len(a) - self.block, size=self.blocks_per_domain), self.block)
            for stream, a in zip(self._streams, self.arrays.values())
        ]
        return torch.from_numpy(np.concatenate(rows))

    def next_batch_with_domains(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens LongTensor [B, block + 1], domain index LongTensor [B]), as DEMix needs."""
        return self.next_batch(), self.row_domains.clone()


class RandomSplitSampler(_Sampler):
    """Samples from random part `part` of `n_parts` of the domains' training tokens.

    The random-split baseline trains a forest on random data splits instead of domains, at the
    same compute. Partition: each domain's array is cut into chunks of `chunk_tokens` (a
    remainder shorter than a chunk, under `chunk_tokens` tokens per domain, is left out) and the
    chunks are dealt at random (a generator seeded by `partition_seed`): part p gets chunks
    perm[p::n_parts]. Pooled (`balanced=False`): one permutation of all domains' chunks, so a part
    holds each domain in proportion to its size. Balanced (`balanced=True`): one permutation per
    domain, so a part holds ~1/n_parts of every domain, and row r of batch i comes from domain
    (i * batch_blocks + r) mod n_domains: over any n_domains consecutive rows every domain gives
    one, the mixture the seed sees. Either way the parts are disjoint and cover the chunks, and a
    window never crosses a chunk boundary, so it never reads another part's tokens.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        n_parts: int,
        part: int,
        block: int,
        batch_blocks: int,
        seed: int,
        partition_seed: int = 0,
        chunk_tokens: int | None = None,
        balanced: bool = False,
    ):
        super().__init__(seed)
        _check_sizes(block, batch_blocks, "batch_blocks")
        if n_parts < 1 or not 0 <= part < n_parts:
            raise ElmError(f"random split part must be in 0..{n_parts - 1}, got {part} (n_parts={n_parts})")
        if not arrays:
            raise ElmError("RandomSplitSampler needs at least one domain")
        # Default: 4 windows' worth, so windows start at varied offsets yet the split stays fine-grained.
        chunk = 4 * (block + 1) if chunk_tokens is None else int(chunk_tokens)
        if chunk < block + 1:
            raise ElmError(f"chunk_tokens={chunk} must be at least the window length block + 1 = {block + 1}")
        self.arrays = list(arrays.values())
        self.block, self.batch_blocks, self.chunk_tokens, self.balanced = block, batch_blocks, chunk, balanced

        def table(ks: list[int]) -> np.ndarray:
            """(array index, chunk start) of every whole chunk of the arrays `ks`, in order."""
            rows = [(k, s) for k in ks for s in range(0, len(self.arrays[k]) - chunk + 1, chunk)]
            return np.array(rows, dtype=np.int64).reshape(-1, 2)

        def deal(chunks: np.ndarray, what: str) -> np.ndarray:
            if len(chunks) < n_parts:
                raise ElmError(
                    f"{what} holds {len(chunks)} chunks of {chunk} tokens, fewer than the "
                    f"{n_parts} random parts; use more data or a shorter context length"
                )
            perm = np.random.default_rng([partition_seed, n_parts]).permutation(len(chunks))
            return chunks[np.sort(perm[part::n_parts])]  # sorted: sequential reads per domain

        names = list(arrays)
        if balanced:
            self.domain_chunks = [deal(table([k]), f"domain {names[k]!r}'s training data") for k in range(len(names))]
            self.chunks = np.concatenate(self.domain_chunks)
        else:
            self.chunks = deal(table(list(range(len(names)))), "pooled training data")

    @property
    def tokens(self) -> int:
        """Training tokens in this part."""
        return len(self.chunks) * self.chunk_tokens

    def batch(self, i: int) -> torch.Tensor:
        rng = self._rng(i)
        if self.balanced:
            n = len(self.domain_chunks)
            domains = (i * self.batch_blocks + np.arange(self.batch_blocks)) % n  # [B] cycling through the domains
            picks = np.stack([self.domain_chunks[d][rng.integers(0, len(self.domain_chunks[d]))] for d in domains])
        else:
            picks = self.chunks[rng.integers(0, len(self.chunks), size=self.batch_blocks)]  # [B, 2]
        # Offsets 0 .. chunk - (block + 1) inclusive: the window stays inside its chunk.
        offsets = rng.integers(0, self.chunk_tokens - self.block, size=self.batch_blocks)
        out = np.empty((self.batch_blocks, self.block + 1), dtype=np.int64)
        for k, array in enumerate(self.arrays):
            rows = picks[:, 0] == k
            if rows.any():
                out[rows] = _windows(array, picks[rows, 1] + offsets[rows], self.block)
        return torch.from_numpy(out)
