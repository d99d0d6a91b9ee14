"""elmforest.launch.remote: expert folders pushed to and pulled from an fsspec URL."""

from __future__ import annotations

import time

import pytest

from elmforest.launch import remote
from elmforest.errors import ElmError


def test_push_pull_round_trip_skips_hidden_and_partial(tmp_path):
    src = tmp_path / "expert"
    (src / "sub").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"\x00weights")
    (src / "sub" / "a.json").write_text("{}")
    (src / ".model.safetensors.123.tmp").write_text("half a write")
    url = f"file://{tmp_path / 'bucket' / 'expert'}"
    assert remote.push(src, url) == 2
    assert not (tmp_path / "bucket" / "expert" / ".model.safetensors.123.tmp").exists()
    (tmp_path / "bucket" / "expert" / "x.partial").write_text("an interrupted upload")
    dst = tmp_path / "home"
    assert remote.pull(url, dst) == 2
    assert (dst / "model.safetensors").read_bytes() == b"\x00weights"
    assert (dst / "sub" / "a.json").read_text() == "{}"
    assert not (dst / "x.partial").exists()


def test_pull_of_a_missing_url_is_empty(tmp_path):
    assert remote.pull(f"file://{tmp_path / 'nothing'}", tmp_path / "home") == 0


def test_pusher_pushes_while_running_and_at_the_end(tmp_path):
    src = tmp_path / "expert"
    src.mkdir()
    url = f"file://{tmp_path / 'bucket'}"
    with remote.Pusher(src, url, seconds=0.05):
        (src / "train_state.pt").write_text("step 1")
        deadline = time.time() + 5
        while not (tmp_path / "bucket" / "train_state.pt").exists() and time.time() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "bucket" / "train_state.pt").read_text() == "step 1"  # a periodic push
        (src / "train_state.pt").write_text("step 2")
    assert (tmp_path / "bucket" / "train_state.pt").read_text() == "step 2"  # the final push


def test_unknown_protocol_is_a_user_error(tmp_path):
    with pytest.raises(ElmError, match="launcher.storage"):
        remote.push(tmp_path, "nosuchprotocol://bucket/x")


def test_upload_order_puts_the_resume_point_first_then_oldest_first(tmp_path):
    """A push killed midway must leave a resumable folder: train_state.pt (self-contained) goes
    first, then every other file in the order it was written, so expert.json or a final
    train.json never reaches the URL before the weights they vouch for."""
    import os

    names = ["expert.json", "train.json", "model.safetensors", "metrics.jsonl", "config.json", "train_state.pt"]
    written = {"config.json": 1, "metrics.jsonl": 2, "train_state.pt": 3, "model.safetensors": 4,
               "train.json": 5, "expert.json": 6}  # the order training writes them in
    for name in names:
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, ns=(written[name] * 10**9, written[name] * 10**9))
    (tmp_path / ".model.safetensors.1.tmp").write_text("half a write")
    order = [p.name for p in remote.upload_order(tmp_path)]
    assert order == ["train_state.pt", "config.json", "metrics.jsonl", "model.safetensors", "train.json", "expert.json"]
