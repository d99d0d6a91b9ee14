"""elmforest.remote: expert folders pushed to and pulled from an fsspec URL."""

from __future__ import annotations

import time

import pytest

from elmforest import remote
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
