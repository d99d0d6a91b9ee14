"""The BTM phases one command at a time: seed, branch, train, merge, remove, ls."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from elmforest.cli import main
from elmforest.combine.forest import Forest
from tinydata import make_corpus, tiny_recipe, write_recipe


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _exit_code(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return e.value.code, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    corpus = make_corpus(root / "corpus")
    out = root / "run"
    recipe = write_recipe(root / "recipe.yaml", tiny_recipe(corpus, out))
    main(["seed", str(recipe)])
    for d in ("animals", "code"):
        main(["branch", str(recipe), "--domain", d])
        main(["train", str(out / "experts" / d)])
    return recipe, out


def test_seed_snapshot_and_dense_continuation(run):
    recipe, out = run
    seed = json.loads((out / "seed" / "seed.json").read_text())
    assert seed["step"] == 32  # half of 16384 / 256 = 64 steps
    assert (out / "seed" / "train_state.pt").is_file()
    main(["seed", str(recipe), "--full"])
    dense = json.loads((out / "dense" / "dense.json").read_text())
    assert dense["steps"] == 64 and dense["tokens"] == 16384
    # the seed snapshot is untouched by the continuation
    assert json.loads((out / "seed" / "seed.json").read_text()) == seed


def test_branch_from_seed_copies_weights_exactly(run, tmp_path):
    recipe, out = run
    main(["branch", str(recipe), "--domain", "numbers", "--name", "fresh", "--out", str(out)])
    a, b = _weights(out / "seed"), _weights(out / "experts" / "fresh")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    job = json.loads((out / "experts" / "fresh" / "job.json").read_text())
    assert job["init_state"].endswith("train_state.pt") and job["start_step"] == 32
    shutil.rmtree(out / "experts" / "fresh")


def test_branch_from_experts_is_the_weighted_mean(run):
    recipe, out = run
    main(["branch", str(recipe), "--domain", "numbers", "--name", "one", "--from", "animals=1.0"])
    a, one = _weights(out / "experts" / "animals"), _weights(out / "experts" / "one")
    assert all(torch.equal(a[k], one[k]) for k in a)
    main(["branch", str(recipe), "--domain", "numbers", "--name", "mix", "--from", "animals=0.7,code=0.3"])
    c, mix = _weights(out / "experts" / "code"), _weights(out / "experts" / "mix")
    for k in a:
        expected = (0.7 * a[k].float() + 0.3 * c[k].float()).to(a[k].dtype)
        assert torch.allclose(mix[k], expected, atol=1e-7), k
    job = json.loads((out / "experts" / "mix" / "job.json").read_text())
    assert job["init_state"] is None and job["start_step"] == 0  # fresh AdamW, own schedule
    for name in ("one", "mix"):
        shutil.rmtree(out / "experts" / name)


def test_expert_trains_with_a_fraction_of_the_batch(run):
    _, out = run
    meta = json.loads((out / "experts" / "animals" / "expert.json").read_text())
    # 2 experts: each gets 128 of the dense 256 tokens per step for the remaining 32 steps
    assert meta["steps"] == 32 and meta["tokens"] == 32 * 128
    assert meta["schedule"] == {"start_step": 32, "total_steps": 64}
    assert meta["domain"] == "animals" and meta["parents"] == "seed"


def test_job_recording_the_old_module_path_resumes_through_elmforest_train(run, tmp_path):
    """A job folder whose job.json names the trainer by its module path before the package moved
    into layers (`elmforest.phases:train_expert`), killed part-way through training, resumes with
    `elmforest train` and ends bit-identical to the uninterrupted expert of the same job."""
    import multiprocessing

    import _expert_jobs
    from elmforest.btm.experts import branch_expert, expert_job
    from elmforest.btm.seed import seed_dir
    from elmforest.models.checkpoint import load_train_state
    from elmforest.study.recipe import load_recipe

    recipe, out = run
    job = expert_job(load_recipe(recipe), out, "animals", {"kind": "domain", "domain": "animals"})
    folder = branch_expert(tmp_path / "animals", job, from_seed=seed_dir(out))
    record = json.loads((folder / "job.json").read_text())
    assert record["runner"] == "elmforest.btm.experts:train_expert"
    (folder / "job.json").write_text(json.dumps({**record, "runner": "elmforest.phases:train_expert"}))
    # Trained part-way: SIGKILLed once step 42 is logged, after the checkpoint at step 40 (every 8 steps).
    worker = multiprocessing.get_context("spawn").Process(target=_expert_jobs.train_killed_past, args=(str(folder), 1, 42))
    worker.start()
    worker.join()
    assert worker.exitcode == -9 and not (folder / "expert.json").exists()
    stopped_at = load_train_state(folder / "train_state.pt")["step"]
    assert 40 <= stopped_at < 64  # a checkpoint between the seed step (32) and the end
    kept = [line for line in (folder / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= stopped_at]
    main(["train", str(folder)])
    ref, got = out / "experts" / "animals", folder
    assert (got / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    a, b = json.loads((ref / "expert.json").read_text()), json.loads((got / "expert.json").read_text())
    for key in ("tokens", "flops", "steps", "schedule", "final_loss", "final_valid_loss"):
        assert b[key] == a[key], key
    # resumed, not restarted: the rows logged before the kill (with their timings) are still there
    assert (got / "metrics.jsonl").read_text().splitlines()[: len(kept)] == kept and kept
    assert json.loads((folder / "job.json").read_text())["runner"] == "elmforest.phases:train_expert"  # never rewritten


def test_merge_remove_ls(run, tmp_path, capsys):
    _, out = run
    forest = tmp_path / "forest"
    main(["merge", str(forest), str(out / "experts" / "animals")])
    main(["merge", str(forest), str(out / "experts" / "code")])
    assert Forest(forest).names == ["animals", "code"]
    main(["ls", str(forest)])
    assert "animals" in capsys.readouterr().out
    code, err = _exit_code(["merge", str(forest), str(out / "experts" / "code")], capsys)
    assert code == 2 and "already has an expert" in err[0]
    main(["remove", str(forest), "code"])
    f = Forest(forest)
    assert f.names == ["animals"] and not (forest / "code").exists()


def test_merge_refuses_mismatched_tokenizer_or_architecture(run, tmp_path, capsys):
    _, out = run
    forest = tmp_path / "forest"
    main(["merge", str(forest), str(out / "experts" / "animals")])
    for field in ("tokenizer_hash", "arch_hash"):
        odd = tmp_path / f"odd-{field}"
        shutil.copytree(out / "experts" / "code", odd)
        meta = json.loads((odd / "expert.json").read_text())
        meta[field] = "0" * 16
        meta["name"] = "odd"
        (odd / "expert.json").write_text(json.dumps(meta))
        before = (forest / "forest.json").read_bytes()
        code, err = _exit_code(["merge", str(forest), str(odd)], capsys)
        assert code == 2 and len(err) == 1 and "expert.json" in err[0]
        assert ("tokenizer" if field == "tokenizer_hash" else "architecture") in err[0]
        assert (forest / "forest.json").read_bytes() == before


def test_training_valid_windows_come_from_the_whole_split():
    """The loop's valid loss is measured on seeded windows from the whole valid split, like the
    evaluation's, not on its first windows: with token i at position i, the windows' first tokens
    are their starts."""
    import numpy as np

    from elmforest.btm.seed import valid_batches

    arrays = {"a": np.arange(4000, dtype=np.int64), "b": np.arange(4000, dtype=np.int64) + 10000}
    batches = valid_batches(arrays, context=8, windows_per_domain=5, batch_size=4, window_seed=0)
    rows = torch.cat(batches)
    assert rows.shape == (10, 9)
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(10, 8, dtype=rows.dtype))  # contiguous windows
    starts_a, starts_b = rows[:5, 0], rows[5:, 0] - 10000
    assert torch.all(starts_a % 8 == 0) and len(set(starts_a.tolist())) == 5  # on the window grid, distinct
    assert starts_a.max() > 5 * 8  # not the first five windows
    again = torch.cat(valid_batches(arrays, 8, 5, 4, window_seed=0))
    other = torch.cat(valid_batches(arrays, 8, 5, 4, window_seed=1))
    assert torch.equal(again, rows) and not torch.equal(other, rows)
    assert torch.equal(starts_b, starts_a)  # one draw per domain from the same seed: equal-length splits match
