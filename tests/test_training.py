"""The training loop: learning, schedule, counts, determinism, stop/continue, kill and resume."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _resume_child import BLOCK, ROWS, PatternSampler, tiny_model_spec, tiny_train_spec
from elmforest.models.checkpoint import load_train_state
from elmforest.errors import ElmError
from elmforest.models.factory import build_model, flops_per_token, load_model, non_embedding_params
from elmforest.train.spec import TrainSpec
from elmforest.train.loop import lr_at, train
from elmforest.train.state import read_metrics

torch.set_num_threads(1)
CHILD = Path(__file__).with_name("_resume_child.py")


def run(out: Path, *, seed: int = 0, data_seed: int = 7, family: str = "gpt2", **kw) -> dict:
    """Train the tiny model into `out` (kw: TrainSpec overrides, plus train()'s keyword options)."""
    options = {k: kw.pop(k) for k in ("stop_at_step", "valid_batches", "init_optimizer_state") if k in kw}
    spec = tiny_train_spec(**kw)
    model = build_model(tiny_model_spec(family), seed)
    return train(model, PatternSampler(data_seed), spec, out, progress=False, **options)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_optimizer(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for name, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][name]), (i, name)


def weights(out: Path) -> dict:
    return load_file(out / "model.safetensors")


def test_loss_falls_on_a_learnable_sequence(tmp_path):
    valid = [PatternSampler(99).batch(i) for i in range(2)]
    result = run(tmp_path, total_steps=40, valid_batches=valid, eval_every=20)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["loss"] for r in rows[:3]) / 3
    assert first > 0.8 * math.log(32)  # starts near uniform over the 32-token vocabulary
    assert result["final_loss"] < 0.5 * first
    assert [r["step"] for r in rows if "valid_loss" in r] == [20, 40]
    assert result["final_valid_loss"] == pytest.approx(rows[-1]["valid_loss"], abs=1e-6)
    assert result["final_valid_loss"] < 0.5 * math.log(32)
    info = json.loads((tmp_path / "train.json").read_text())
    assert info["status"] == "done" and info["step"] == 40 and info["spec"]["total_steps"] == 40


def test_lr_schedule_warmup_peak_and_final_value():
    spec = TrainSpec(lr=1e-3, warmup_steps=10, total_steps=110, final_lr_fraction=0.1)
    assert lr_at(0, spec) == pytest.approx(1e-4)
    assert lr_at(9, spec) == pytest.approx(1e-3)  # last warm-up step reaches the peak
    assert lr_at(10, spec) == pytest.approx(1e-3)
    assert lr_at(60, spec) == pytest.approx(0.55e-3)  # halfway down the linear decay
    assert lr_at(110, spec) == pytest.approx(1e-4)
    assert lr_at(500, spec) == pytest.approx(1e-4)
    lrs = [lr_at(s, spec) for s in range(111)]
    assert max(lrs) == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(0, TrainSpec(lr=2e-3, warmup_steps=0, total_steps=5)) == pytest.approx(2e-3)


def test_logged_lr_follows_the_schedule(tmp_path):
    run(tmp_path, total_steps=12, warmup_steps=4)
    spec = tiny_train_spec(total_steps=12, warmup_steps=4)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, spec) for s in range(12)])


def test_train_spec_validation_names_the_field():
    with pytest.raises(ElmError, match="warmup_steps"):
        TrainSpec(warmup_steps=10, total_steps=10)
    with pytest.raises(ElmError, match="micro_batches"):
        TrainSpec(micro_batches=0)


def test_token_and_flop_counts_match_the_formula(tmp_path):
    result = run(tmp_path, total_steps=3, warmup_steps=1, micro_batches=2)
    tokens = 3 * 2 * ROWS * BLOCK  # steps * micro-batches * rows * block
    model = build_model(tiny_model_spec(), 0)
    L, d, n = 2, 64, non_embedding_params(model)
    assert result["tokens"] == tokens
    assert result["flops"] == tokens * (6 * n + 6 * L * BLOCK * d) == tokens * flops_per_token(model.config, BLOCK)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["tokens"] for r in rows] == [tokens // 3, 2 * tokens // 3, tokens]
    assert rows[-1]["flops"] == result["flops"]


def test_same_seed_twice_is_bit_identical(tmp_path):
    run(tmp_path / "a", total_steps=8)
    run(tmp_path / "b", total_steps=8)
    run(tmp_path / "c", total_steps=8, seed=1)
    assert_same_tensors(weights(tmp_path / "a"), weights(tmp_path / "b"))
    wte = "transformer.wte.weight"
    assert not torch.equal(weights(tmp_path / "a")[wte], weights(tmp_path / "c")[wte])


def test_stop_then_continue_equals_straight_run(tmp_path):
    straight = run(tmp_path / "straight", total_steps=20)
    first = run(tmp_path / "split", total_steps=20, stop_at_step=8)
    assert first["steps"] == 8
    assert json.loads((tmp_path / "split" / "train.json").read_text())["status"] == "stopped"
    # a differently initialised model: the weights must come from the checkpoint
    second = run(tmp_path / "split", total_steps=20, seed=123)
    assert second["steps"] == 20 and second["start_step"] == 0 and second["tokens"] == straight["tokens"]
    assert second["final_loss"] == straight["final_loss"]
    assert_same_tensors(weights(tmp_path / "straight"), weights(tmp_path / "split"))
    assert_same_optimizer(
        load_train_state(tmp_path / "straight" / "train_state.pt")["optimizer"],
        load_train_state(tmp_path / "split" / "train_state.pt")["optimizer"],
    )
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_branch_with_seed_optimizer_state_continues_the_schedule(tmp_path):
    """An expert started from the seed checkpoint's weights + AdamW state + step, fed the same
    data, must equal the run that never branched."""
    run(tmp_path / "straight", total_steps=16)
    run(tmp_path / "seed", total_steps=16, stop_at_step=6)
    seed_state = load_train_state(tmp_path / "seed" / "train_state.pt")
    sampler = PatternSampler(7)
    sampler.load_state_dict(seed_state["sampler"])
    expert = train(load_model(tmp_path / "seed"), sampler, tiny_train_spec(total_steps=16), tmp_path / "expert",
                   progress=False, init_optimizer_state=seed_state)
    assert expert["start_step"] == 6 and expert["steps"] == 16
    assert expert["tokens"] == 10 * 2 * ROWS * BLOCK  # this run's tokens only
    rows = read_metrics(tmp_path / "expert" / "metrics.jsonl")
    assert rows[0]["step"] == 7 and rows[0]["lr"] == pytest.approx(lr_at(6, tiny_train_spec(total_steps=16)))
    assert_same_tensors(weights(tmp_path / "straight"), weights(tmp_path / "expert"))


def test_finished_run_returns_without_training(tmp_path):
    result = run(tmp_path, total_steps=4)

    class Exploding(PatternSampler):
        def next_batch(self):
            raise AssertionError("a finished run must not draw batches")

    model = build_model(tiny_model_spec(), 0)
    again = train(model, Exploding(7), tiny_train_spec(total_steps=4), tmp_path, progress=False)
    assert again == result
    assert torch.equal(model.transformer.wte.weight.detach(), weights(tmp_path)["transformer.wte.weight"])


def test_progress_bar_and_bf16_and_llama_train(tmp_path):
    r = run(tmp_path / "llama", family="llama", total_steps=1, warmup_steps=0, micro_batches=1)
    assert r["steps"] == 1 and math.isfinite(r["final_loss"])
    assert type(load_model(tmp_path / "llama")).__name__ == "LlamaForCausalLM"
    spec = tiny_train_spec(total_steps=2, warmup_steps=1, bf16=True)
    r = train(build_model(tiny_model_spec(), 0), PatternSampler(7), spec, tmp_path / "bf16", progress=True)
    assert r["steps"] == 2 and math.isfinite(r["final_loss"])


def test_kill_and_resume_is_bit_identical(tmp_path):
    steps, every = 30, 5
    reference = tmp_path / "reference"
    run(reference, total_steps=steps, checkpoint_every=every)  # the same spec as the child's

    out = tmp_path / "killed"
    cmd = [sys.executable, str(CHILD), str(out), "--steps", str(steps), "--checkpoint-every", str(every)]
    child = subprocess.Popen([*cmd, "--delay", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline and child.poll() is None:
            rows = read_metrics(out / "metrics.jsonl")
            if rows and rows[-1]["step"] >= every + 2:  # past the first checkpoint, before the second
                break
            time.sleep(0.02)
        assert child.poll() is None, "child ended before it could be killed: " + child.stdout.read().decode()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert json.loads((out / "train.json").read_text())["status"] == "running"
    killed_at = read_metrics(out / "metrics.jsonl")[-1]["step"]
    resumed_from = load_train_state(out / "train_state.pt")["step"]
    assert 0 < resumed_from < killed_at < steps and resumed_from % every == 0

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"start_step=0 steps={steps}" in done.stdout

    assert_same_tensors(weights(reference), weights(out))
    ref_state = load_train_state(reference / "train_state.pt")
    out_state = load_train_state(out / "train_state.pt")
    assert_same_optimizer(ref_state["optimizer"], out_state["optimizer"])
    assert out_state["sampler"] == ref_state["sampler"] and out_state["tokens"] == ref_state["tokens"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # steps after the checkpoint re-logged once
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(reference / "metrics.jsonl")]


def test_resume_errors_name_the_problem(tmp_path):
    run(tmp_path, total_steps=10, stop_at_step=4)
    wrong = build_model(tiny_model_spec("llama"), 0)
    with pytest.raises(ElmError, match="train_state.pt.*do not match the model architecture"):
        train(wrong, PatternSampler(7), tiny_train_spec(total_steps=10), tmp_path, progress=False)
    with pytest.raises(ElmError, match="stop_at_step=11"):
        run(tmp_path, total_steps=10, stop_at_step=11)
    run(tmp_path, total_steps=10)
    with pytest.raises(ElmError, match="past the requested stop step 4"):
        run(tmp_path, total_steps=10, stop_at_step=4)


def test_a_finished_train_json_beside_other_weights_is_not_trusted(tmp_path):
    """A folder assembled from an interrupted upload can pair the final train.json with older
    weights; train() must then finish from train_state.pt instead of returning those weights."""
    final = run(tmp_path / "final", total_steps=10)
    run(tmp_path / "early", total_steps=10, stop_at_step=4)
    good = {k: v.clone() for k, v in weights(tmp_path / "final").items()}  # (load_file maps the file)
    (tmp_path / "final" / "model.safetensors").write_bytes((tmp_path / "early" / "model.safetensors").read_bytes())
    model = build_model(tiny_model_spec(), 0)
    again = train(model, PatternSampler(7), tiny_train_spec(total_steps=10), tmp_path / "final", progress=False)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in final.items() if k != "seconds"}
    assert_same_tensors(weights(tmp_path / "final"), good)
    assert torch.equal(model.transformer.wte.weight.detach(), good["transformer.wte.weight"])


def test_models_train_with_sdpa_attention_and_log_mfu(tmp_path):
    model = build_model(tiny_model_spec(), 0)
    model.set_attn_implementation("eager")  # e.g. a folder whose config asked for it
    train(model, PatternSampler(7), tiny_train_spec(total_steps=2, warmup_steps=1), tmp_path, progress=False)
    assert model.config._attn_implementation == "sdpa"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    # MFU = FLOPs in the interval / its seconds / peak; tokens/s is over the same interval.
    from elmforest.models.hardware import peak_flops

    for prev, row in zip([{"flops": 0, "tokens": 0}] + rows, rows):
        seconds = (row["tokens"] - prev["tokens"]) / row["tokens_per_s"]
        expected = (row["flops"] - prev["flops"]) / seconds / peak_flops("cpu", torch.float32)
        assert row["mfu"] == pytest.approx(expected, rel=1e-2, abs=2e-6)


def test_fused_adamw_takes_a_state_saved_unfused(tmp_path):
    """The loop's CUDA path: AdamW fused, fed a state saved by the unfused optimizer (e.g. the
    seed trained on CPU). Fused AdamW also runs on CPU, so the step counters' move and the update
    are checked here: one fused step equals one unfused step."""
    from elmforest.train.loop import _apply_spec_to_optimizer, make_optimizer

    spec = tiny_train_spec(total_steps=4)
    run(tmp_path, total_steps=4, stop_at_step=2)
    saved = load_train_state(tmp_path / "train_state.pt")
    results = []
    for fused in (False, True):
        model = build_model(tiny_model_spec(), 0)
        model.load_state_dict(saved["model"], strict=False)
        opt = make_optimizer(model, spec, fused=fused)
        opt.load_state_dict(copy.deepcopy(saved["optimizer"]))  # (a loaded state shares its step tensors)
        _apply_spec_to_optimizer(opt, spec, fused=fused)
        assert all(g["fused"] is (True if fused else None) for g in opt.param_groups)
        batch = PatternSampler(7).batch(5)
        model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss.backward()
        opt.step()
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-5, atol=1e-7, msg=k)
