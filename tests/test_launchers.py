"""Launchers: sequential, local processes, real in-process Ray, submitit's local executor.

The toy jobs in tests/_launcher_jobs.py have the shape of `experts.train_expert`
(`fn(path, threads) -> dict`), run real torch, and write a tensor file per folder.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import _launcher_jobs as jobs
from elmforest.config import LauncherConfig
from elmforest.study.recipe import recipe_from_dict
from elmforest.errors import ElmError
from elmforest.launch.launchers import LAUNCHERS, default_workers, run_jobs

NAMES = ["alpha", "beta", "gamma"]


def make_folders(root: Path, names=NAMES) -> list[str]:
    paths = []
    for name in names:
        (root / name).mkdir(parents=True)
        paths.append(str(root / name))
    return paths


def retry_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("retry ")]


def assert_same_weights(paths: list[str], reference: list[str]) -> None:
    for path, ref in zip(paths, reference):
        got, want = load_file(Path(path) / jobs.RESULT), load_file(Path(ref) / jobs.RESULT)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (path, key)
        # The files themselves are byte-identical too.
        assert (Path(path) / jobs.RESULT).read_bytes() == (Path(ref) / jobs.RESULT).read_bytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list[str], dict]:
    """The three toy experts trained sequentially in this process: what every launcher must match."""
    paths = make_folders(tmp_path_factory.mktemp("sequential"))
    lines: list[str] = []
    before = torch.get_num_threads()
    results = run_jobs(paths, jobs.sgd_job, LauncherConfig(kind="sequential", threads_per_worker=1), log=lines.append)
    assert torch.get_num_threads() == before  # the caller's torch threads are left alone
    assert list(results) == NAMES
    assert not retry_lines(lines)
    return paths, results


@pytest.fixture(scope="module")
def ray_session():
    """One in-process Ray for the whole module (start-up is the slow part)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # Workers must import the toy jobs module from tests/ like the driver does.
    tests_dir = str(Path(__file__).parent)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


# --- the registry: every launcher keeps the same contract ------------------------------------------

# What a launcher needs besides its kind to run on this machine (a new launcher without an entry
# runs with the defaults).
SETTINGS = {"slurm": {"slurm": {"cluster": "local", "timeout_min": 5}}}


@pytest.mark.parametrize("kind", list(LAUNCHERS))
def test_every_registered_launcher_keeps_the_contract(kind, reference, request, tmp_path, monkeypatch):
    """A trivial job trains, a job that fails once is retried and succeeds, a job that always
    fails is reported after its retries, and the other jobs are not disturbed."""
    if kind == "ray":
        request.getfixturevalue("ray_session")
    # Fresh interpreters (submitit's `python -m`) must import the toy jobs too.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    ref_paths, _ = reference
    ok, flaky, bad = make_folders(tmp_path / "experts", ["alpha", "beta", "bad"])
    (Path(flaky) / "flaky").write_text("1")
    (Path(bad) / "fail").write_text("1")
    lines: list[str] = []
    config = LauncherConfig(kind=kind, threads_per_worker=1, retries=1, **SETTINGS.get(kind, {}))
    with pytest.raises(ElmError, match=r"expert bad failed after 2 attempts: RuntimeError: boom in bad"):
        run_jobs([ok, flaky, bad], jobs.contract_job, config, log=lines.append)
    assert sorted(retry_lines(lines)) == [
        "retry 1/1 for expert bad: RuntimeError: boom in bad",
        "retry 1/1 for expert beta: RuntimeError: flaky beta",
    ]
    assert (Path(bad) / "attempts").read_text() == "xx"
    assert_same_weights([ok, flaky], ref_paths[:2])  # trained as the sequential reference did


@pytest.mark.parametrize("kind", list(LAUNCHERS))
def test_ddp_every_registered_launcher_runs_a_job_on_two_ranks(kind, request, tmp_path, monkeypatch):
    """procs_per_job: 2 puts the job on 2 processes of one torch.distributed group (spawned ranks,
    a Ray Train TorchTrainer, 2 Slurm tasks) and returns rank 0's result."""
    if kind == "ray":
        request.getfixturevalue("ray_session")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    (path,) = make_folders(tmp_path / "experts", ["alpha"])
    config = LauncherConfig(kind=kind, procs_per_job=2, threads_per_worker=1, retries=0, **SETTINGS.get(kind, {}))
    result = run_jobs([path], jobs.rank_sum_job, config, log=lambda s: None)["alpha"]
    assert result == {"rank": 0, "size": 2, "sum": 3.0, "torch_threads": 1}  # 1 + 2, summed over the group
    log = (Path(path) / "train.log").read_text()
    assert "attempt 1, rank 0 of 2" in log and "attempt 1, rank 1 of 2" in log


def test_launcher_registry_facts_and_the_config_check(monkeypatch, tmp_path):
    assert list(LAUNCHERS) == ["sequential", "local", "ray", "slurm"]
    assert [n for n, entry in LAUNCHERS.items() if entry.in_process] == ["sequential"]
    assert {n: entry.package for n, entry in LAUNCHERS.items()} == {
        "sequential": None, "local": None, "ray": "ray", "slurm": "submitit"}
    assert all(entry.available for entry in LAUNCHERS.values())  # this environment has every extra
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert not LAUNCHERS["ray"].available and LAUNCHERS["local"].available
    with pytest.raises(ElmError, match=r"launcher.kind: 'ray' needs ray: pip install 'elmforest\[ray\]'"):
        run_jobs(make_folders(tmp_path, ["a"]), jobs.sgd_job, LauncherConfig(kind="ray"))
    with pytest.raises(ElmError, match=r"launcher.kind: .*unknown launcher 'pbs'; choose one of sequential, local, ray, slurm"):
        recipe_from_dict({"corpus": "c", "train_domains": ["a"], "launcher": {"kind": "pbs"}})


# --- default_workers and argument checks ---------------------------------------------------------


def test_default_workers_share_the_cores():
    assert default_workers(4, cores=2) == (2, 1)
    assert default_workers(1, cores=2) == (1, 2)
    assert default_workers(3, cores=8) == (3, 2)
    assert default_workers(16, cores=8) == (8, 1)
    assert default_workers(0, cores=4) == (1, 4)
    # Jobs of 2 processes each: the cores are shared by processes, not by jobs.
    assert default_workers(3, cores=8, procs=2) == (3, 1)
    assert default_workers(1, cores=8, procs=2) == (1, 4)
    assert default_workers(4, cores=2, procs=2) == (1, 1)


def test_bad_arguments_are_user_errors(tmp_path):
    paths = make_folders(tmp_path, ["a", "b"])
    with pytest.raises(ElmError, match="expert folder not found"):
        run_jobs([*paths, str(tmp_path / "missing")], jobs.sgd_job, LauncherConfig(kind="sequential"))
    with pytest.raises(ElmError, match="two experts are named 'x'"):
        run_jobs(paths, jobs.sgd_job, LauncherConfig(kind="sequential"), names=["x", "x"])
    with pytest.raises(ElmError, match="launcher.slurm"):
        run_jobs(paths, jobs.sgd_job, LauncherConfig(kind="slurm", slurm={"cluster": "local", "bogus": 1}))
    assert run_jobs([], jobs.sgd_job, LauncherConfig()) == {}


# --- sequential ----------------------------------------------------------------------------------


def test_sequential_logs_and_is_idempotent(reference):
    paths, results = reference
    for path, name in zip(paths, NAMES):
        log = (Path(path) / "train.log").read_text()
        assert "attempt 1" in log and f"python-level output of {name}" in log
        assert results[name]["threads"] == 1 and results[name]["torch_threads"] == 1
    # A second run finds every expert finished and returns at once with the same numbers.
    again = run_jobs(paths, jobs.sgd_job, LauncherConfig(kind="sequential"), log=lambda line: None)
    assert all(again[n]["resumed"] for n in NAMES)
    assert [again[n]["weight_sum"] for n in NAMES] == [results[n]["weight_sum"] for n in NAMES]


def test_sequential_failure_retries_then_raises(tmp_path):
    (path,) = make_folders(tmp_path, ["bad"])
    lines: list[str] = []
    with pytest.raises(ElmError, match=r"expert bad failed after 3 attempts: RuntimeError: boom in bad"):
        run_jobs([path], jobs.always_fail_job, LauncherConfig(kind="sequential", retries=2), log=lines.append)
    assert (Path(path) / "attempts").read_text() == "xxx"
    assert retry_lines(lines) == [
        "retry 1/2 for expert bad: RuntimeError: boom in bad",
        "retry 2/2 for expert bad: RuntimeError: boom in bad",
    ]
    assert "Traceback" in (Path(path) / "train.log").read_text()


# --- local worker processes ----------------------------------------------------------------------


def test_local_matches_sequential_bit_for_bit(reference, tmp_path):
    ref_paths, ref_results = reference
    paths = make_folders(tmp_path)
    lines: list[str] = []
    config = LauncherConfig(kind="local", workers=2, threads_per_worker=1)
    results = run_jobs(paths, jobs.sgd_job, config, log=lines.append)
    assert list(results) == NAMES
    assert_same_weights(paths, ref_paths)
    for name, path in zip(NAMES, paths):
        assert results[name]["loss"] == ref_results[name]["loss"]
        assert results[name]["torch_threads"] == 1
        # Worker output, Python-level and raw file descriptor, lands in the expert's train.log.
        log = (Path(path) / "train.log").read_text()
        assert f"python-level output of {name}" in log and f"fd-level output of {name}" in log
    assert not retry_lines(lines)


def test_local_sigkilled_worker_is_retried(reference, tmp_path):
    ref_paths, _ = reference
    paths = make_folders(tmp_path, NAMES[:2])
    lines: list[str] = []
    # Only "alpha" is killed (its marker is absent); "beta" already has its marker.
    (Path(paths[1]) / "killed_once").write_text("1")
    config = LauncherConfig(kind="local", workers=2, threads_per_worker=1)
    results = run_jobs(paths, jobs.kill_once_job, config, log=lines.append)
    assert list(results) == NAMES[:2]
    assert retry_lines(lines) == ["retry 1/2 for expert alpha: worker killed by SIGKILL"]
    assert_same_weights(paths, ref_paths[:2])
    assert (Path(paths[0]) / "train.log").read_text().count("== elmforest job") == 2


def test_local_failure_raises_after_retries_and_spares_the_others(reference, tmp_path):
    ref_paths, _ = reference
    bad, good = make_folders(tmp_path, ["bad", "alpha"])
    (Path(bad) / "fail").write_text("1")  # jobs are importable functions: a marker picks the behaviour
    lines: list[str] = []
    with pytest.raises(ElmError, match=r"expert bad failed after 2 attempts: RuntimeError: boom in bad") as err:
        run_jobs(
            [bad, good],
            jobs.fail_if_marked_job,
            LauncherConfig(kind="local", workers=2, threads_per_worker=1, retries=1),
            log=lines.append,
        )
    assert str(Path(bad) / "train.log") in str(err.value)
    assert (Path(bad) / "attempts").read_text() == "xx"
    assert retry_lines(lines) == ["retry 1/1 for expert bad: RuntimeError: boom in bad"]
    # The other expert trained once, undisturbed, and its result is on disk.
    assert (Path(good) / "train.log").read_text().count("== elmforest job") == 1
    assert_same_weights([good], ref_paths[:1])


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler for the test, whatever this process inherited (a shell's
    background job starts with SIGINT ignored, and an interrupt would then never arrive)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_local_ctrl_c_terminates_workers(tmp_path, python_ctrl_c):
    (path,) = make_folders(tmp_path, ["sleepy"])
    pid_file = Path(path) / "pid"

    def interrupt_when_started():
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_jobs([path], jobs.sleep_job, LauncherConfig(kind="local"), log=lambda s: None)
    worker, threads = map(int, pid_file.read_text().split())
    assert threads == os.cpu_count() == default_workers(1)[1]  # one job gets every core
    with pytest.raises(ProcessLookupError):  # terminated and reaped
        os.kill(worker, 0)


# --- Ray -----------------------------------------------------------------------------------------


def test_ray_matches_sequential_bit_for_bit(ray_session, reference, tmp_path):
    ref_paths, ref_results = reference
    paths = make_folders(tmp_path)
    results = run_jobs(paths, jobs.sgd_job, LauncherConfig(kind="ray", threads_per_worker=1), log=lambda s: None)
    assert list(results) == NAMES
    assert_same_weights(paths, ref_paths)
    assert [results[n]["loss"] for n in NAMES] == [ref_results[n]["loss"] for n in NAMES]
    for name, path in zip(NAMES, paths):
        log = (Path(path) / "train.log").read_text()
        assert f"python-level output of {name}" in log and f"fd-level output of {name}" in log
    assert ray_session.is_initialized()  # a Ray we did not start is left running


def test_ray_crashed_worker_is_retried(ray_session, reference, tmp_path):
    ref_paths, _ = reference
    (path,) = make_folders(tmp_path, NAMES[:1])
    lines: list[str] = []
    results = run_jobs([path], jobs.kill_once_job, LauncherConfig(kind="ray", threads_per_worker=1), log=lines.append)
    assert list(results) == NAMES[:1]
    (line,) = retry_lines(lines)
    assert re.match(r"retry 1/2 for expert alpha: \w*(Worker|Crash|Died|Actor)\w*", line), line
    assert_same_weights([path], ref_paths[:1])


def test_ray_failure_raises_after_retries(ray_session, tmp_path):
    (path,) = make_folders(tmp_path, ["bad"])
    lines: list[str] = []
    with pytest.raises(ElmError, match=r"expert bad failed after 2 attempts: RuntimeError: boom in bad"):
        run_jobs([path], jobs.always_fail_job, LauncherConfig(kind="ray", retries=1), log=lines.append)
    assert retry_lines(lines) == ["retry 1/1 for expert bad: RuntimeError: boom in bad"]
    assert (Path(path) / "attempts").read_text() == "xx"


def test_ray_rejects_tasks_the_local_cluster_cannot_fit(ray_session, tmp_path):
    paths = make_folders(tmp_path, ["a"])
    with pytest.raises(ElmError, match="launcher.num_gpus"):
        run_jobs(paths, jobs.sgd_job, LauncherConfig(kind="ray", num_gpus=1), log=lambda s: None)


# --- submitit ------------------------------------------------------------------------------------


def test_slurm_local_executor_runs_a_job(reference, tmp_path, monkeypatch):
    ref_paths, ref_results = reference
    # submitit's local executor starts a fresh `python -m`: it must import the toy jobs too.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    (path,) = make_folders(tmp_path / "experts", NAMES[:1])
    config = LauncherConfig(kind="slurm", threads_per_worker=1, slurm={"cluster": "local", "timeout_min": 5})
    results = run_jobs([path], jobs.sgd_job, config, log=lambda s: None)
    assert results["alpha"]["loss"] == ref_results["alpha"]["loss"]
    assert_same_weights([path], ref_paths[:1])
    assert "fd-level output of alpha" in (Path(path) / "train.log").read_text()
    assert (tmp_path / "experts" / ".submitit").is_dir()
