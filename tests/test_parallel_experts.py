"""Experts trained by the real `phases.train_expert` under every launcher end bit-identical,
and a worker SIGKILLed mid-training is retried, resumes from its checkpoint, and changes nothing."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _expert_jobs
from elmforest.config import LauncherConfig, recipe_from_dict
from elmforest.launchers import run_jobs
from elmforest.phases import branch_expert, expert_job, seed_dir, train_expert, train_seed
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


def test_ray_matches_sequential(seeded, sequential):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    recipe, out = seeded
    paths = branch_all(recipe, out, out / "ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        run_jobs(paths, train_expert, LauncherConfig(kind="ray", num_cpus=1, threads_per_worker=1), log=lambda s: None)
    finally:
        ray.shutdown()
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
