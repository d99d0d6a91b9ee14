"""Data-parallel training of one model (`elmforest.train.distributed`, `training.train` under DDP):
2 gloo ranks on CPU against 1 process at the same global batch, a rank killed mid-run, errors.

Tolerance. Two ranks compute each half-batch's mean loss and average the two gradients; one
process averages over the whole batch at once. The sums run in another order, so float32
gradients differ in their last bits (relative ~1e-7). Losses and gradients therefore agree to
~1e-6; the weights after several AdamW steps agree less well, because Adam divides by
sqrt(v): where a gradient entry is tiny, its rounding noise is a large *relative* error and turns
into an update difference of up to lr per step. Measured: logged losses equal to their 6
decimals but one (1e-6), weights within 2.4e-4 after 12 steps at lr 1e-2 while they move up to
0.07; the weight tolerance below is 2e-3, ~8x the measured gap and still 1/35 of how far the
weights move (asserted > 0.05). A rank training on its half alone, or a sum instead of a mean, fails the
gradient test by a factor of ~2; a wrong data slice fails the loss comparison at once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _ddp_jobs as jobs
from _resume_child import PatternSampler, tiny_model_spec, tiny_train_spec
from elmforest.train import distributed
from elmforest.models.checkpoint import load_train_state
from elmforest.errors import ElmError
from elmforest.models.factory import build_model
from elmforest.train.loop import train
from elmforest.train.state import read_metrics

WEIGHT_ATOL = 2e-3
SPEC = dict(steps=12, checkpoint_every=3, eval_every=4, valid=3)  # micro_batches 2 of 4 rows (tiny_train_spec)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same tiny training in 1 process (here) and on 2 ranks (spawned)."""
    root = tmp_path_factory.mktemp("ddp")
    one = jobs.train_tiny(str(root / "one"), **SPEC)
    two = distributed.run_procs(jobs.train_tiny, str(root / "two"), **SPEC, procs=2)
    return root, one, two


def test_ddp_two_processes_equal_one_at_the_same_global_batch(runs):
    root, one, two = runs
    # Counts are of the whole batch, whatever the number of ranks.
    assert (two["steps"], two["tokens"], two["flops"]) == (one["steps"], one["tokens"], one["flops"])
    a, b = read_metrics(root / "one" / "metrics.jsonl"), read_metrics(root / "two" / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 13))  # rank 0 alone logs
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5)
    assert [r.get("valid_loss") for r in b] == pytest.approx([r.get("valid_loss") for r in a], abs=1e-5)
    assert two["final_valid_loss"] == pytest.approx(one["final_valid_loss"], abs=1e-5)
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in b)
    start = build_model(tiny_model_spec(), seed=0).state_dict()
    wa, wb = weights(root / "one"), weights(root / "two")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - start[k]).abs().max().item() for k in wa) > 0.05  # they trained
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=WEIGHT_ATOL, msg=k)
    state = load_train_state(root / "two" / "train_state.pt")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2  # every rank's RNG, gathered
    assert load_train_state(root / "one" / "train_state.pt").get("world_size") == 1


def test_ddp_gradient_is_the_full_batch_mean(tmp_path):
    """After one AdamW step, exp_avg = (1 - beta1) * gradient: read it from the checkpoint of a
    1-rank and a 2-rank run and compare with the gradient computed here by plain autograd."""
    spec = dict(steps=1, grad_clip=0.0, warmup_steps=0, micro_batches=2)
    distributed.run_procs(jobs.train_tiny, str(tmp_path / "two"), **spec, procs=2)
    jobs.train_tiny(str(tmp_path / "one"), **spec)

    model = build_model(tiny_model_spec(), seed=0)
    sampler = PatternSampler(7)
    for _ in range(2):  # the step's two micro-batches, each [4, 17]
        batch = sampler.next_batch()
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        (loss / 2).backward()
    params = [p for p in model.parameters() if p.dim() >= 2] + [p for p in model.parameters() if p.dim() < 2]
    for run in ("one", "two"):
        state = load_train_state(tmp_path / run / "train_state.pt")["optimizer"]["state"]
        assert len(state) == len(params)
        for i, p in enumerate(params):
            grad = state[i]["exp_avg"] / (1 - 0.9)
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"{run}: parameter {i}")


def test_ddp_killed_rank_resumes_to_the_uninterrupted_run(runs, tmp_path):
    root, _, two = runs
    out = tmp_path / "killed"
    with pytest.raises(distributed.RankFailed, match=r"rank 1 of 2: killed by SIGKILL"):
        distributed.run_procs(jobs.train_tiny_kill_rank1, str(out), **SPEC, procs=2)
    killed_at = int((out / jobs.KILLED).read_text())
    resumed_from = load_train_state(out / "train_state.pt")["step"]
    assert json.loads((out / "train.json").read_text())["status"] == "running"  # the kill landed mid-run
    assert 0 < resumed_from < killed_at < SPEC["steps"]

    again = distributed.run_procs(jobs.train_tiny_kill_rank1, str(out), **SPEC, procs=2)
    assert again["steps"] == SPEC["steps"] and again["start_step"] == 0 and again["tokens"] == two["tokens"]
    # Same ranks, same slices, same all-reduce order: bit-identical to the run never interrupted.
    wa, wb = weights(root / "two"), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))  # the re-run steps logged once
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(root / "two" / "metrics.jsonl")]


def test_ddp_checkpoint_resumes_only_under_the_same_process_count(runs, tmp_path):
    root, _, _ = runs
    shutil.copytree(root / "two", tmp_path / "two")
    (tmp_path / "two" / "train.json").unlink()  # not finished: train() must resume from train_state.pt
    model = build_model(tiny_model_spec(), seed=0)
    with pytest.raises(ElmError, match=r"train_state.pt: this checkpoint was written by 2 processes .*not 1"):
        train(model, PatternSampler(7), tiny_train_spec(total_steps=12), tmp_path / "two", progress=False)


def test_ddp_user_errors_are_one_line_and_name_the_problem(tmp_path):
    with pytest.raises(ElmError, match=r"--procs=\d+ exceeds the \d+ CPU cores"):
        distributed.run_procs(jobs.train_tiny, str(tmp_path / "x"), procs=(os.cpu_count() or 1) + 1)
    # Every rank raises the same ElmError on the first batch; it comes back as that ElmError.
    with pytest.raises(ElmError, match=r"2 processes cannot split a micro-batch of 3 rows evenly"):
        distributed.run_procs(jobs.train_tiny, str(tmp_path / "odd"), rows=3, procs=2)


def test_ddp_a_rank_that_raises_brings_the_others_down(tmp_path):
    """Rank 0 waits in a collective for rank 1, which raised: run_procs must return, naming rank 1."""
    with pytest.raises(distributed.RankFailed, match=r"rank 1 of 2: RuntimeError: boom on rank 1"):
        distributed.run_procs(jobs.raise_on_rank1, str(tmp_path / "x"), procs=2)


def test_ddp_shard_rows_gives_each_rank_its_block():
    rows = [distributed.shard_rows(8, distributed.World(rank=r, size=4)) for r in range(4)]
    assert [(s.start, s.stop) for s in rows] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ElmError, match="4 processes cannot split a micro-batch of 2 rows"):
        distributed.shard_rows(2, distributed.World(rank=0, size=4))


def test_ddp_study_gives_the_perplexities_of_one_process(tmp_path):
    """`elmforest run` with launcher.procs_per_job: 2 trains the seed, the dense baseline, every
    expert and DEMix on 2 ranks each; every perplexity matches the 1-process study's. (The
    random-split arm is off: its experts take the same launcher path as the BTM experts.)
    Measured: largest relative difference 4e-7; the bound is 1e-4."""
    from elmforest.cli import main
    from tinydata import make_corpus, tiny_recipe, write_recipe

    corpus = make_corpus(tmp_path / "corpus")
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"run{procs}"
        recipe = tiny_recipe(corpus, out, **{"launcher.procs_per_job": procs, "arms.demix": True, "arms.random_split": False})
        main(["run", str(write_recipe(tmp_path / f"recipe{procs}.yaml", recipe)), "--no-progress"])
        results[procs] = json.loads((out / "results.json").read_text())
    one, two = results[1], results[2]
    methods = [m for m in one if isinstance(one[m], dict) and isinstance(one[m].get("train"), dict)]
    assert {"dense", "btm_ensemble_cached", "btm_average_posterior", "demix_cached"} <= set(methods)
    for m in methods:
        for part in ("train", "novel"):
            assert two[m][part] == pytest.approx(one[m][part], rel=1e-4), (m, part)
    assert two["budget"]["arms"] == one["budget"]["arms"]  # the same tokens and FLOPs per arm
    state = load_train_state(tmp_path / "run2" / "experts" / "animals" / "train_state.pt")
    assert state["world_size"] == 2
    assert load_train_state(tmp_path / "run2" / "demix" / "train_state.pt")["world_size"] == 2


def test_ddp_study_refuses_a_process_count_that_cannot_split_its_micro_batches():
    from elmforest.train.budget import Budget, check_data_parallel

    # 3 domains x 3 windows = 9 rows per dense micro-batch, 3 per expert micro-batch.
    budget = Budget(context=32, n_experts=3, batch_tokens=288, total_steps=10, seed_steps=5, warmup_steps=1,
                    dense_micro_batches=1, dense_blocks_per_domain=3, expert_micro_batches=1, expert_blocks=3)
    check_data_parallel(budget, 3, "r.yaml")  # 9 and 3 both split in 3
    with pytest.raises(ElmError, match=r"r.yaml: launcher.procs_per_job=2 does not divide the 9 windows of a dense"):
        check_data_parallel(budget, 2, "r.yaml")


def test_ddp_run_refuses_an_unsplittable_process_count_before_writing(tmp_path, capsys):
    """`elmforest run` checks launcher.procs_per_job with the rest of the recipe: exit 2, one line
    naming the recipe and the key, and no run folder written."""
    from cli_runner import run_cli
    from tinydata import make_corpus, tiny_recipe, write_recipe

    corpus = make_corpus(tmp_path / "corpus")
    # 256 tokens / context 32 = 8 windows per dense micro-batch, 4 per expert: 3 processes split neither.
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, tmp_path / "run", **{"launcher.procs_per_job": 3}))
    code, _, err = run_cli(["run", recipe], capsys)
    assert code == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert "r.yaml" in err and "launcher.procs_per_job=3 does not divide the 8 windows of a dense" in err
    assert not (tmp_path / "run").exists()
