"""Crash safety: real `elmforest` processes killed with SIGKILL at seeded moments.

After every kill, `elmforest check` must pass on each folder involved (leftover `.*.tmp` files
allowed) and rerunning the same command must finish with exactly the result of a run that was
never interrupted: the same results.json numbers for `elmforest run`, bit-identical weights for
`elmforest train`. Kill moments are "when this file appears, plus a delay drawn from a seeded
RNG", so the stages hit are the same on every machine even though the exact step is not; what
the test asserts does not depend on where a kill lands.

Also: a corrupted checkpoint is an ElmError on load and a problem for `check`, and two concurrent
`elmforest merge` processes into one new forest both land in forest.json (the file lock).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from elmforest.checks.check import check_path
from elmforest.models.checkpoint import verify_weights
from elmforest.data.corpus import Corpus, DomainSource, write_corpus
from elmforest.errors import ElmError
from elmforest.combine.forest import Forest
from elmforest.data.tokenizer import train_tokenizer

ELMFOREST = [sys.executable, "-m", "elmforest.cli"]
WORDS = {
    "alpha": "sun moon star sky cloud rain wind light dark night day".split(),
    "beta": "code line file loop test data type list call value error".split(),
}
RECIPE = """\
corpus: {corpus}
train_domains: [alpha, beta]
tokenizer: {{path: {tokenizer}}}
model: {{size: tiny, context: 32}}
budget: {{total_tokens: 4096, seed_fraction: 0.5, batch_tokens: 128}}
optim: {{lr: 0.003, eval_every: 8, checkpoint_every: 2, log_every: 1, threads: 1}}
eval: {{max_tokens_per_domain: 512, prior_sequences: 4, valid_windows_per_domain: 4, batch_size: 4}}
launcher: {{kind: sequential, threads_per_worker: 1}}
arms: {{random_split: false}}
"""
VOLATILE = ("timing", "recipe")  # wall-clock seconds; the recipe's `out`


def synthetic_documents(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[domain]) for _ in range(rng.randint(20, 40))) + f" {i}" for i in range(n)]


def elmforest(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*ELMFOREST, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def check_ok(path: Path) -> None:
    """What `elmforest check PATH` runs finds no problem (leftovers of killed writes are allowed)."""
    report = check_path(path)
    assert report.ok, "\n".join(map(str, report.problems))


def appeared(path: Path) -> Callable[[float], bool]:
    """Kill trigger: `path` exists (already at the start, or written since)."""
    return lambda started: path.exists()


def rewritten(path: Path) -> Callable[[float], bool]:
    """Kill trigger: `path` was (re)written by the process started at `started`."""

    def ready(started: float) -> bool:
        try:
            return path.stat().st_mtime > started
        except FileNotFoundError:
            return False

    return ready


def kill_when(args: list[str | Path], ready: Callable[[float], bool], delay: float) -> bool:
    """Start `elmforest ARGS`; once `ready(start time)` holds, wait `delay` s and SIGKILL it.

    Returns True when the process was killed, False when it finished first (then it must have
    succeeded).
    """
    started = time.time()
    child = subprocess.Popen([*ELMFOREST, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while child.poll() is None and not ready(started):
            time.sleep(0.002)
        if child.poll() is None:
            time.sleep(delay)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            return True
        err = child.stderr.read().decode()
        assert child.returncode == 0, err
        return False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stderr.close()


def results_numbers(run: Path) -> dict:
    data = json.loads((run / "results.json").read_text())
    for key in VOLATILE:
        data.pop(key)
    return data


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A two-domain synthetic corpus, its tokenizer, a tiny recipe and one uninterrupted run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("crash")
    write_corpus(root / "corpus", [DomainSource(d, synthetic_documents(d, 300, i)) for i, d in enumerate(WORDS)])
    train_tokenizer(Corpus(root / "corpus"), list(WORDS), 300, root / "tok")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(corpus=root / "corpus", tokenizer=root / "tok"))
    done = elmforest("run", recipe, "--out", root / "reference", "--no-progress")
    assert done.returncode == 0, done.stderr
    return root


def test_run_killed_at_seeded_moments_resumes_to_the_same_results(world, tmp_path):
    run = tmp_path / "run"
    rng = random.Random(20240601)
    # (the file whose appearance arms the kill, the largest extra delay in seconds)
    moments = [
        (run / "dense" / "train_state.pt", 0.3),  # the seed / dense training
        (run / "experts" / "alpha" / "job.json", 0.6),  # branching and expert training
        (run / "experts" / "beta" / "train_state.pt", 0.3),  # the second expert
        (run / "forest" / "forest.json", 0.4),  # merging and evaluation
    ]
    args = ["run", world / "recipe.yaml", "--out", run, "--no-progress"]
    for marker, spread in moments:
        assert kill_when(args, appeared(marker), rng.uniform(0.0, spread)), f"finished before the kill after {marker}"
        if run.exists():
            check_ok(run)
        check_ok(world / "corpus")
    done = elmforest(*args)
    assert done.returncode == 0, done.stderr
    assert results_numbers(run) == results_numbers(world / "reference")
    assert elmforest("check", run).returncode == 0


def untrained_copy(world: Path, target: Path) -> Path:
    """The reference run's alpha expert as it was right after branching (seed weights + job.json)."""
    ref = world / "reference"
    target.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(ref / "seed" / name, target / name)
    shutil.copy2(ref / "experts" / "alpha" / "job.json", target / "job.json")
    return target


def test_train_killed_at_seeded_moments_resumes_bit_identically(world, tmp_path):
    expert = untrained_copy(world, tmp_path / "alpha")
    rng = random.Random(7)
    # 16 expert steps, a checkpoint every 2: each kill lands a few steps after a checkpoint, well
    # before the end (asserted: a kill after completion would test nothing)
    for _ in range(3):
        assert kill_when(["train", expert], rewritten(expert / "train_state.pt"), rng.uniform(0.0, 0.01))
        check_ok(expert)
    assert not (expert / "expert.json").exists()  # still unfinished after the kills
    done = elmforest("train", expert)
    assert done.returncode == 0, done.stderr
    check_ok(expert)
    # The weights' sha256 (stored in the safetensors metadata and re-computed from the tensors by
    # verify_weights); the files' bytes may differ in the order of the metadata keys.
    reference = world / "reference" / "experts" / "alpha" / "model.safetensors"
    digest = verify_weights(reference)
    assert digest is not None and verify_weights(expert / "model.safetensors") == digest
    meta = json.loads((expert / "expert.json").read_text())
    assert meta["steps"] == json.loads((reference.parent / "expert.json").read_text())["steps"]


def test_merge_killed_at_seeded_moments_leaves_a_valid_forest(world, tmp_path):
    forest = tmp_path / "forest"
    source = world / "reference" / "experts" / "beta"
    rng = random.Random(11)
    landed = 0
    for _ in range(3):
        landed += kill_when(["merge", forest, source], appeared(forest), rng.uniform(0.0, 0.05))
        if (forest / "forest.json").exists():
            check_ok(forest)
    assert landed >= 1  # at least one kill hit the merge before it finished
    if "beta" not in (Forest(forest).names if (forest / "forest.json").exists() else []):
        done = elmforest("merge", forest, source)
        assert done.returncode == 0, done.stderr
    assert Forest(forest).names == ["beta"]
    assert (forest / "beta" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()  # a copy
    check_ok(forest)


def test_average_killed_leaves_no_partial_output(world, tmp_path):
    """`elmforest average` builds its output in a hidden temporary folder renamed into place."""
    forest = world / "reference" / "forest"
    out = tmp_path / "avg"
    args = [*ELMFOREST, "average", str(forest), "--method", "uniform", "--out", str(out)]
    rng = random.Random(3)
    for _ in range(3):
        child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # arm on the hidden staging folder (after imports, while the average is being written)
        while child.poll() is None and not list(tmp_path.glob(".avg.*.tmp")):
            time.sleep(0.001)
        time.sleep(rng.uniform(0.0, 0.01))
        child.kill()
        child.wait()
        assert child.returncode == -signal.SIGKILL  # killed before it finished, not after
        assert not out.exists() or (out / "average.json").is_file()  # absent or complete
        shutil.rmtree(out, ignore_errors=True)
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check_ok(out)


def test_corrupted_checkpoint_is_a_clear_error(world, tmp_path):
    from elmforest.models.factory import load_model

    expert = tmp_path / "alpha"
    shutil.copytree(world / "reference" / "experts" / "alpha", expert)
    weights = expert / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64] ^= 0xFF  # a flipped byte inside the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(ElmError, match="checksum mismatch"):
        load_model(expert)
    done = elmforest("check", expert)
    assert done.returncode == 2
    assert f"{weights}: checkpoint corrupt: checksum mismatch" in done.stderr
    assert "Traceback" not in done.stderr
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ElmError, match="truncated"):
        load_model(expert)


def test_concurrent_merges_into_one_new_forest_both_land(world, tmp_path):
    forest = tmp_path / "forest"
    experts = world / "reference" / "experts"
    children = [
        subprocess.Popen([*ELMFOREST, "merge", str(forest), str(experts / name)], stderr=subprocess.PIPE, text=True)
        for name in ("alpha", "beta")
    ]
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    assert sorted(Forest(forest).names) == ["alpha", "beta"]
    check_ok(forest)
