"""Batch samplers: shapes, domain balance, determinism, resumption, random splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from elmforest.errors import ElmError
from elmforest.data.sampler import BalancedSampler, DomainSampler, RandomSplitSampler

BLOCK = 8


def _arrays() -> dict[str, np.ndarray]:
    """Domains with disjoint, consecutive token ranges: a row's domain and position are readable
    from its tokens (domain j holds j*1000 + 0, 1, 2, ...)."""
    return {
        "a": np.arange(0, 500, dtype=np.uint16),
        "b": np.arange(1000, 1300, dtype=np.uint16),
        "c": np.arange(2000, 2040, dtype=np.uint16),
    }


def _assert_windows(batch: torch.Tensor, domain_of_row: list[int]) -> None:
    for row, j in zip(batch.tolist(), domain_of_row):
        assert all(j * 1000 <= t < (j + 1) * 1000 for t in row)  # right domain
        assert row == list(range(row[0], row[0] + BLOCK + 1))  # one contiguous window


def test_domain_sampler_shapes_and_bounds():
    arr = np.arange(100, 150, dtype=np.uint16)
    s = DomainSampler(arr, BLOCK, 16, seed=3)
    starts = set()
    for _ in range(20):
        b = s.next_batch()
        assert b.dtype == torch.long and b.shape == (16, BLOCK + 1)
        assert int(b.min()) >= 100 and int(b.max()) <= 149  # never reads past the array end
        assert (b[:, 1:] - b[:, :-1] == 1).all()
        starts.update(b[:, 0].tolist())
    assert starts == set(range(100, 150 - BLOCK))  # every start 0..len-(block+1) is reachable


def test_balanced_equal_blocks_per_domain():
    s = BalancedSampler(_arrays(), BLOCK, blocks_per_domain=4, seed=0)
    assert s.domains == ["a", "b", "c"]
    for _ in range(5):
        batch, dom = s.next_batch_with_domains()
        assert batch.shape == (12, BLOCK + 1)
        assert dom.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        _assert_windows(batch, dom.tolist())
    assert s.state_dict() == {"batches": 5, "seed": 0}


def test_same_seed_same_batches_and_resume():
    first = BalancedSampler(_arrays(), BLOCK, 2, seed=11)
    seq = [first.next_batch() for _ in range(6)]
    other = BalancedSampler(_arrays(), BLOCK, 2, seed=11)
    assert all(torch.equal(x, other.next_batch()) for x in seq)
    assert not torch.equal(seq[0], BalancedSampler(_arrays(), BLOCK, 2, seed=12).next_batch())
    assert not torch.equal(seq[0], seq[1])

    # resume after 3 batches: a fresh sampler continues with batches 3, 4, 5
    resumed = BalancedSampler(_arrays(), BLOCK, 2, seed=11)
    resumed.load_state_dict({"batches": 3, "seed": 11})
    assert all(torch.equal(seq[i], resumed.next_batch()) for i in (3, 4, 5))
    d = DomainSampler(_arrays()["a"], BLOCK, 4, seed=5)
    dseq = [d.next_batch() for _ in range(4)]
    d2 = DomainSampler(_arrays()["a"], BLOCK, 4, seed=5)
    d2.load_state_dict(d.state_dict() | {"batches": 2})
    assert torch.equal(d2.next_batch(), dseq[2])
    with pytest.raises(ElmError, match="seed 11"):
        DomainSampler(_arrays()["a"], BLOCK, 4, seed=5).load_state_dict({"batches": 1, "seed": 11})
    # a domain's rows do not depend on which other domains are mixed in
    only_b = BalancedSampler({"b": _arrays()["b"]}, BLOCK, 2, seed=11)
    mixed = BalancedSampler({"a": _arrays()["a"], "b": _arrays()["b"]}, BLOCK, 2, seed=11)
    assert torch.equal(only_b.next_batch(), mixed.next_batch()[2:])


def test_split_too_small():
    arrays = _arrays() | {"tiny": np.arange(3000, 3000 + BLOCK, dtype=np.uint16)}  # block tokens, needs block+1
    with pytest.raises(ElmError, match=r"split too small for context length 8.*'tiny'"):
        BalancedSampler(arrays, BLOCK, 1, seed=0)
    with pytest.raises(ElmError, match="'law'"):
        DomainSampler(arrays["tiny"], BLOCK, 1, seed=0, name="law")
    DomainSampler(np.arange(BLOCK + 1), BLOCK, 1, seed=0).next_batch()  # exactly block + 1 is enough


def test_random_split_partition():
    arrays = _arrays()
    chunk = 2 * (BLOCK + 1)  # 18 tokens: a 27 + 16 + 2 = 45 whole chunks
    parts = [RandomSplitSampler(arrays, 3, p, BLOCK, 8, seed=p, chunk_tokens=chunk) for p in range(3)]
    assert [len(s.chunks) for s in parts] == [15, 15, 15]
    assert len({s.tokens for s in parts}) == 1
    # disjoint and covering every whole chunk of every domain
    owned = [{(int(k), int(o)) for k, o in s.chunks} for s in parts]
    assert not (owned[0] & owned[1]) and not (owned[1] & owned[2]) and not (owned[0] & owned[2])
    assert len(set().union(*owned)) == 45
    # parts mix domains (a random split, not a domain split)
    assert all(len({k for k, _ in o}) > 1 for o in owned)
    bases = [0, 1000, 2000]
    for s, o in zip(parts, owned):
        for _ in range(10):
            b = s.next_batch()
            assert b.shape == (8, BLOCK + 1) and (b[:, 1:] - b[:, :-1] == 1).all()
            for row in b.tolist():
                k = row[0] // 1000
                start = row[0] - bases[k]
                chunk_start = start - start % chunk
                assert (k, chunk_start) in o  # reads only its own part's chunks
                assert row[-1] - bases[k] < chunk_start + chunk  # and never crosses a chunk edge
    # deterministic and resumable
    again = RandomSplitSampler(arrays, 3, 1, BLOCK, 8, seed=1, chunk_tokens=chunk)
    assert np.array_equal(again.chunks, parts[1].chunks)
    again.load_state_dict({"batches": 10, "seed": 1})
    fresh = RandomSplitSampler(arrays, 3, 1, BLOCK, 8, seed=1, chunk_tokens=chunk)
    assert torch.equal(again.next_batch(), fresh.batch(10))
    with pytest.raises(ElmError, match="fewer than the 50 random parts"):
        RandomSplitSampler(arrays, 50, 0, BLOCK, 8, seed=0, chunk_tokens=chunk)


def test_balanced_random_split_sees_every_domain_equally():
    """The study's random-split experts draw from the seed's domain-balanced mixture: each part holds
    ~1/n of every domain, and over the rows of successive batches every domain gives the same share
    (the pooled split would give domain a, b, c in proportion 500 : 300 : 40)."""
    arrays = _arrays()
    chunk = BLOCK + 1  # 9 tokens: 55 + 33 + 4 whole chunks
    parts = [RandomSplitSampler(arrays, 2, p, BLOCK, 4, seed=p, chunk_tokens=chunk, balanced=True) for p in range(2)]
    owned = [{(int(k), int(o)) for k, o in s.chunks} for s in parts]
    assert not (owned[0] & owned[1]) and len(owned[0] | owned[1]) == 55 + 33 + 4
    for s in parts:
        per_domain = [sum(1 for k, _ in s.chunks if k == j) for j in range(3)]
        assert per_domain in ([28, 17, 2], [27, 16, 2])  # half of each domain's chunks
    rows = torch.cat([parts[0].next_batch() for _ in range(30)])  # 120 rows
    counts = np.bincount((rows[:, 0] // 1000).numpy(), minlength=3)
    assert counts.tolist() == [40, 40, 40]
    for row in rows.tolist():
        k = row[0] // 1000
        start = row[0] - k * 1000
        assert (k, start - start % chunk) in owned[0]  # only its own part's chunks
        assert row == list(range(row[0], row[0] + BLOCK + 1))
    pooled = RandomSplitSampler(arrays, 2, 0, BLOCK, 4, seed=0, chunk_tokens=chunk)
    pooled_counts = np.bincount((torch.cat([pooled.next_batch() for _ in range(30)])[:, 0] // 1000).numpy(), minlength=3)
    assert pooled_counts[2] < 20  # the small domain is rare when pooled
