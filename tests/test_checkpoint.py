"""Checkpoint files are reproducible byte for byte: the same weights saved by separate processes
give identical model.safetensors files (safetensors' own writer orders the metadata keys of
its header differently from one process to the next)."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys

import torch
from safetensors.torch import load_file

from elmforest.models.checkpoint import verify_weights
from elmforest.models.factory import load_model

# Builds a tiny GPT-2 from a fixed seed and saves it the way every training run does.
SAVE = """
import sys
from elmforest.models.checkpoint import save_weights
from elmforest.models.factory import ModelSpec, build_model
spec = ModelSpec(family="gpt2", layers=2, width=32, heads=2, context=16, vocab_size=64)
save_weights(build_model(spec, seed=3), sys.argv[1])
"""


def test_two_processes_saving_the_same_weights_write_identical_bytes(tmp_path):
    outs = [tmp_path / f"p{i}" for i in range(4)]  # the old writer: equal in all four 1 time in 8
    procs = [subprocess.Popen([sys.executable, "-c", SAVE, str(o)]) for o in outs]
    assert [p.wait(timeout=300) for p in procs] == [0] * 4
    blobs = [(o / "model.safetensors").read_bytes() for o in outs]
    digests = {hashlib.sha256(b).hexdigest() for b in blobs}
    assert len(digests) == 1, digests
    assert (outs[0] / "config.json").read_bytes() == (outs[1] / "config.json").read_bytes()

    # Still a valid safetensors file: header length, JSON header, tensors at their offsets.
    blob = blobs[0]
    (n,) = struct.unpack("<Q", blob[:8])
    assert n % 8 == 0
    header = json.loads(blob[8 : 8 + n])
    assert set(header["__metadata__"]) == {"format", "sha256"}
    tensors = load_file(outs[0] / "model.safetensors")
    assert set(tensors) == set(header) - {"__metadata__"}
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == len(blob) - 8 - n
    assert verify_weights(outs[0]) == header["__metadata__"]["sha256"]
    model = load_model(outs[0])  # and Hugging Face loads it
    for name, t in tensors.items():
        assert torch.equal(model.state_dict()[name], t), name


def test_every_dtype_round_trips(tmp_path):
    from elmforest.models.checkpoint import write_safetensors

    tensors = {
        "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "f16": torch.tensor([0.25], dtype=torch.float16),
        "i64": torch.tensor([7, -8]),
        "flag": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.0),
    }
    digest = write_safetensors(tensors, tmp_path / "x.safetensors")
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert verify_weights(tmp_path / "x.safetensors") == digest
