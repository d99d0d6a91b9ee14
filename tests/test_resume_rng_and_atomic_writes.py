"""Two promises checked directly: resuming restores the RNG (a model with dropout resumes
bit-identically), and an exception in the middle of a write leaves the old file untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from _resume_child import PatternSampler, tiny_train_spec
from elmforest import storage
from elmforest.train.loop import train


def dropout_model() -> GPT2LMHeadModel:
    """A tiny GPT-2 whose forward draws random numbers (dropout 0.2 everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                          resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2))


def test_resume_with_dropout_is_bit_identical(tmp_path):
    torch.set_num_threads(1)
    spec = tiny_train_spec(total_steps=12, checkpoint_every=4)
    train(dropout_model(), PatternSampler(7), spec, tmp_path / "straight", progress=False)
    train(dropout_model(), PatternSampler(7), spec, tmp_path / "split", progress=False, stop_at_step=4)
    torch.manual_seed(12345)  # a new process starts from another RNG state; only the checkpoint's may count
    torch.rand(1000)
    train(dropout_model(), PatternSampler(7), spec, tmp_path / "split", progress=False)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the dropout really draws: two different RNG streams give different weights
    torch.manual_seed(1)
    other = dropout_model()
    spec_other = tiny_train_spec(total_steps=12, checkpoint_every=4, seed=99)
    train(other, PatternSampler(7), spec_other, tmp_path / "other", progress=False)
    c = load_file(tmp_path / "other" / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_an_exception_mid_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    storage.write_json(target, {"old": 1})
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with storage.atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b'{"new": ')  # half of the new content is out ...
            raise RuntimeError("disk full")  # ... when the write fails
    assert target.read_bytes() == before
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind


def test_a_failing_serialisation_leaves_the_old_file(tmp_path):
    target = tmp_path / "meta.json"
    storage.write_json(target, {"old": 1})
    with pytest.raises(TypeError):
        storage.write_json(target, {"new": object()})
    assert json.loads(target.read_text()) == {"old": 1}


def test_a_folder_built_halfway_never_replaces_anything(tmp_path):
    target = tmp_path / "avg"
    with pytest.raises(RuntimeError):
        with storage.atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
