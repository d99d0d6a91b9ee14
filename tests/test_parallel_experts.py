"""Experts trained by the real `experts.train_expert` under every launcher end bit-identical,
and a worker SIGKILLed mid-training is retried, resumes from its checkpoint, and changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _expert_jobs
from elmforest.models.checkpoint import load_train_state
from elmforest.config import LauncherConfig
from elmforest.study.recipe import recipe_from_dict
from elmforest.launch.launchers import run_jobs
from elmforest.btm.experts import branch_expert, expert_job, train_expert
from elmforest.btm.seed import seed_dir, train_seed
from tinydata import make_corpus, tiny_recipe

DOMAINS = ["animals", "code"]


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    corpus = make_corpus(root / "corpus")
    out = root / "run"
    recipe = recipe_from_dict(tiny_recipe(corpus, out, **{"optim.checkpoint_every": 2}))
    train_seed(recipe, out, progress=False)
    return recipe, out


def branch_all(recipe, out, where: Path) -> list[str]:
    paths = []
    for d in DOMAINS:
        job = expert_job(recipe, out, d, {"kind": "domain", "domain": d})
        paths.append(str(branch_expert(where / d, job, from_seed=seed_dir(out))))
    return paths


def weights(path: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same(paths: list[str], reference: list[str]) -> None:
    for p, r in zip(paths, reference):
        a, b = weights(p), weights(r)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), p


@pytest.fixture(scope="module")
def sequential(seeded):
    recipe, out = seeded
    paths = branch_all(recipe, out, out / "sequential")
    run_jobs(paths, train_expert, LauncherConfig(kind="sequential", threads_per_worker=1), log=lambda s: None)
    return paths


def test_local_workers_match_sequential(seeded, sequential):
    recipe, out = seeded
    paths = branch_all(recipe, out, out / "local")
    run_jobs(paths, train_expert, LauncherConfig(kind="local", workers=2, threads_per_worker=1), log=lambda s: None)
    assert_same(paths, sequential)


def run_on_ray(paths: list[str], config: LauncherConfig) -> dict[str, dict]:
    """run_jobs with the `ray` launcher on an in-process Ray of 2 CPUs, shut down afterwards."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        return run_jobs(paths, train_expert, config, log=lambda s: None)
    finally:
        ray.shutdown()


def test_ray_matches_sequential(seeded, sequential):
    recipe, out = seeded
    paths = branch_all(recipe, out, out / "ray")
    run_on_ray(paths, LauncherConfig(kind="ray", num_cpus=1, threads_per_worker=1))
    assert_same(paths, sequential)


def test_killed_worker_is_retried_and_resumes(seeded, sequential):
    recipe, out = seeded
    paths = branch_all(recipe, out, out / "killed")
    lines: list[str] = []
    run_jobs(paths, _expert_jobs.train_then_die, LauncherConfig(kind="local", workers=2, threads_per_worker=1, retries=2),
             log=lines.append)
    retries = [line for line in lines if line.startswith("retry ")]
    assert len(retries) == 2 and all("SIGKILL" in line for line in retries)  # each expert died once
    assert_same(paths, sequential)
    # the retry resumed from the checkpoint: the second attempt started past step 0
    for p in paths:
        log = (Path(p) / "train.log").read_text()
        assert log.count("== elmforest job: attempt") == 2
        assert "from the checkpoint at step" in log
    shutil.rmtree(out / "killed")


def test_experts_through_fsspec_storage_match_sequential(seeded, sequential, tmp_path):
    """launcher.storage: workers pull each expert folder from an fsspec URL (file:// here, as
    s3:// would be) into scratch space, train there, push it back, and the driver pulls it home."""
    recipe, out = seeded
    paths = branch_all(recipe, out, out / "stored")
    url = f"file://{tmp_path / 'bucket'}"
    config = LauncherConfig(kind="local", workers=2, threads_per_worker=1, storage=url, sync_seconds=0.2)
    run_jobs(paths, train_expert, config, log=lambda s: None)
    assert_same(paths, sequential)
    for p in paths:
        name = Path(p).name
        assert (Path(p) / "expert.json").is_file()  # pulled home
        assert (tmp_path / "bucket" / name / "expert.json").is_file()
        assert (tmp_path / "bucket" / name / "train_state.pt").is_file()
        assert not list((tmp_path / "bucket" / name).glob("*.partial"))


def test_worker_killed_inside_a_push_leaves_a_resumable_checkpoint(seeded, sequential, tmp_path):
    """A worker SIGKILLed halfway through uploading train_state.pt to launcher.storage: the URL
    still holds the previous checkpoint (the half file sits under its temporary name), the retry
    pulls it and resumes from it, and the expert ends as the uninterrupted one."""
    recipe, out = seeded
    paths = branch_all(recipe, out, out / "push_killed")
    bucket = tmp_path / "bucket"
    config = LauncherConfig(kind="local", workers=2, threads_per_worker=1, storage=f"killpush://{bucket}", sync_seconds=0.01)
    lines: list[str] = []
    run_jobs(paths, _expert_jobs.train_with_killing_storage, config, log=lines.append)
    retries = [line for line in lines if line.startswith("retry ")]
    assert len(retries) == 2 and all("SIGKILL" in line for line in retries)
    total = recipe.budget.total_tokens // recipe.budget.batch_tokens
    for p in paths:
        name = Path(p).name
        local_step, stored_step = map(int, (bucket / _expert_jobs.KILLED_IN_PUSH.format(name)).read_text().split())
        assert 0 < stored_step <= local_step and stored_step < total  # killed mid-run, inside a push
        log = (Path(p) / "train.log").read_text()
        assert log.count("== elmforest job: attempt") == 2
        assert f"from the checkpoint at step {stored_step}" in log  # the retry resumed the stored checkpoint
        assert not list((bucket / name).glob("*.partial"))
    assert_same(paths, sequential)


@pytest.fixture(scope="module")
def ddp_local(seeded):
    """The two experts trained by the `local` launcher with procs_per_job: 2 (spawned ranks)."""
    recipe, out = seeded
    paths = branch_all(recipe, out, out / "ddp_local")
    run_jobs(paths, train_expert, LauncherConfig(kind="local", procs_per_job=2, threads_per_worker=1), log=lambda s: None)
    return paths


def test_ddp_ray_train_and_local_processes_train_the_same_expert(seeded, sequential, ddp_local):
    """procs_per_job: 2 with the local launcher and with Ray Train (a TorchTrainer of 2 workers):
    bit-identical experts (same slices, same all-reduce), and within the data-parallel tolerance
    of tests/test_distributed.py of the 1-process experts."""
    recipe, out = seeded
    on_ray = branch_all(recipe, out, out / "ddp_ray")
    results = run_on_ray(on_ray, LauncherConfig(kind="ray", procs_per_job=2, num_cpus=1, threads_per_worker=1))
    assert set(results) == set(DOMAINS) and all(r["steps"] > 0 for r in results.values())
    assert_same(on_ray, ddp_local)
    for p, ref in zip(ddp_local, sequential):
        a, b = weights(p), weights(ref)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-3, msg=k)
        log = (Path(p) / "train.log").read_text()
        assert "rank 0 of 2" in log and "rank 1 of 2" in log
        assert load_train_state(Path(p) / "train_state.pt")["world_size"] == 2


@pytest.mark.parametrize("how", ["procs", "torchrun"])
def test_ddp_cli_train_procs_and_torchrun_match_the_launcher(seeded, ddp_local, how):
    """`elmforest train EXPERT --procs 2`, and the same command without --procs under torchrun
    (which starts the 2 ranks itself), train the expert exactly as the `local` launcher does."""
    recipe, out = seeded
    job = expert_job(recipe, out, "animals", {"kind": "domain", "domain": "animals"})
    path = str(branch_expert(out / f"cli_{how}" / "animals", job, from_seed=seed_dir(out)))
    cli = ["-m", "elmforest.cli", "train", path, "--threads", "1"]
    if how == "procs":
        cmd = [sys.executable, *cli, "--procs", "2"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cli]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("animals: ") == 1  # rank 0 alone prints the summary
    assert_same([path], ddp_local[:1])
