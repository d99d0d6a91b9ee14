"""Experiment trackers (recipe `logging.report_to`), each offline: what TensorBoard, W&B and MLflow
hold after a tiny training equals the run's metrics.jsonl, one tracker run per trained model
grouped under the study, the study's results at the end, and a broken tracker never costs a run."""

from __future__ import annotations

import json
import os
import shutil
import struct
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from elmforest.btm.experts import train_expert
from elmforest.cli import main
from elmforest.config import LoggingConfig, load_recipe
from elmforest.errors import ElmError
from elmforest.study.run_folder import claim_run_dir
from elmforest.study.tracking import report_results
from elmforest.train import trackers
from elmforest.train.state import read_metrics
from tinydata import make_corpus, tiny_recipe, write_recipe

FIELDS = ("loss", "valid_loss", "lr", "tokens_per_s", "mfu", "flops", "tokens")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A seed run continued to the dense baseline (two trainings of one folder) and one expert trained
    from its job.json alone, all three trackers on, W&B offline, MLflow's default file store."""
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "MLFLOW_TRACKING_URI")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    root = tmp_path_factory.mktemp("trackers")
    corpus = make_corpus(root / "corpus")
    out = root / "study"
    recipe = write_recipe(root / "recipe.yaml", tiny_recipe(
        corpus, out, **{"logging.report_to": ["tensorboard", "wandb", "mlflow"], "budget.total_tokens": 8192,
                        "optim.log_every": 3}))
    main(["seed", str(recipe)])
    main(["seed", str(recipe), "--full"])  # the same folder continued: one tracker run, continued
    main(["branch", str(recipe), "--domain", "animals"])
    main(["branch", str(recipe), "--domain", "code"])  # left untrained: the failure tests copy it
    main(["train", str(out / "experts" / "animals")])  # no Recipe object: the job's own recipe names the trackers
    yield recipe, out
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _expected(folder: Path) -> dict[str, dict[int, float]]:
    """field -> {step: value} from metrics.jsonl."""
    rows = read_metrics(folder / "metrics.jsonl")
    assert len(rows) >= 5
    return {f: {r["step"]: r[f] for r in rows if f in r} for f in FIELDS}


# ------------------------------------------------------------------------------------------------
# TensorBoard


def _tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_files_hold_every_metrics_row(study):
    _, out = study
    assert {"dense", "experts"} <= {p.name for p in (out / "tensorboard").iterdir()}
    for run in ("dense", "experts/animals"):
        logged, expected = _tensorboard(out / "tensorboard" / run), _expected(out / run)
        assert set(logged) == set(FIELDS)
        for field in FIELDS:  # TensorBoard keeps scalars as float32
            assert logged[field] == {s: float(np.float32(v)) for s, v in expected[field].items()}, (run, field)
    dense = read_metrics(out / "dense" / "metrics.jsonl")
    assert dense[-1]["step"] == 32 and len(list((out / "tensorboard" / "dense").glob("events.*"))) == 2


# ------------------------------------------------------------------------------------------------
# W&B (offline): the run's .wandb transaction log, read record by record


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks of chunks
    with a 7-byte header: CRC32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _wandb_runs(out: Path) -> dict[str, dict]:
    """name -> {group, id, history rows} over every offline run folder (a continued run adds one)."""
    runs: dict[str, dict] = {}
    for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        name, info = None, {}
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                name = r.run.display_name
                info = runs.setdefault(name, {"group": r.run.run_group, "id": r.run.run_id, "project": r.run.project,
                                              "history": []})
            elif kind == "history":
                info["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "summary" and name == "results":
                info.setdefault("summary", {}).update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return runs


def test_wandb_offline_runs_hold_every_metrics_row_grouped_by_study(study):
    _, out = study
    runs = _wandb_runs(out)
    assert {"dense", "experts/animals"} <= set(runs)
    for run in ("dense", "experts/animals"):
        info, expected = runs[run], _expected(out / run)
        assert info["group"] == "study" and info["project"] == "elmforest"
        assert info["id"] == trackers.run_key(out.resolve(), run)  # the continued dense run kept its id
        for field in FIELDS:  # JSON values: exact
            logged = {h["step"]: h[field] for h in info["history"] if field in h}
            assert logged == expected[field], (run, field)


# ------------------------------------------------------------------------------------------------
# MLflow (a local file store, the default DIR/mlruns)


def _mlflow(out: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("elmforest")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    return client, runs


def test_mlflow_file_store_holds_every_metrics_row(study):
    _, out = study
    client, runs = _mlflow(out)
    assert {"dense", "experts/animals"} <= set(runs)
    for run in ("dense", "experts/animals"):
        r, expected = runs[run], _expected(out / run)
        assert r.data.tags["elmforest.group"] == "study" and r.info.status == "FINISHED"
        assert r.data.params["train.total_steps"] == "32"  # the experts continue the seed's schedule
        for field in FIELDS:
            logged = {m.step: m.value for m in client.get_metric_history(r.info.run_id, field)}
            assert logged == {s: float(v) for s, v in expected[field].items()}, (run, field)


# ------------------------------------------------------------------------------------------------
# The study's results


def _results() -> dict:
    def row(train, novel):
        return {"train": {"animals": train}, "novel": {"numbers": novel}, "train_mean": train, "novel_mean": novel,
                "train_mean_ci": [train - 1, train + 1], "novel_mean_ci": [novel - 2, novel + 2],
                "train_flops": 1.5e12, "inference_params": 123456}

    return {
        "dense": row(30.5, 41.25),
        "btm_ensemble_cached": row(27.0, 38.0),
        "comparisons": [{"a": "btm_ensemble_cached", "b": "dense", "part": "train", "ratio": 0.885, "ci": [0.8, 0.95],
                         "verdict": "held", "claim": "the forest beats dense"}],
        "budget": {"total_tokens": 8192},
    }


def test_the_study_results_reach_every_tracker(study):
    recipe, out = study
    report_results(load_recipe(recipe), out, _results())
    client, runs = _mlflow(out)
    results = runs["results"]
    got = {k: client.get_metric_history(results.info.run_id, k)[-1].value for k in results.data.metrics}
    assert got["dense/train_mean"] == 30.5 and got["btm_ensemble_cached/novel_mean"] == 38.0
    assert got["btm_ensemble_cached_vs_dense/train_ratio"] == 0.885
    assert (got["btm_ensemble_cached_vs_dense/train_ratio_lo"], got["btm_ensemble_cached_vs_dense/train_ratio_hi"]) == (0.8, 0.95)
    artifacts = Path(results.info.artifact_uri.removeprefix("file://"))
    table = json.loads((artifacts / "results.json").read_text())
    assert table["columns"][:2] == ["method", "train_mean"] and [r[0] for r in table["data"]] == ["dense", "btm_ensemble_cached"]
    text = (artifacts / "results.md").read_text()
    assert "the forest beats dense on train domains" in text and "held" in text
    for run in ("dense", "experts/animals"):  # the study's runs nest under its results
        assert client.get_run(runs[run].info.run_id).data.tags["mlflow.parentRunId"] == results.info.run_id
    tb = _tensorboard(out / "tensorboard" / "results")
    assert tb["dense/novel_mean"] == {0: 41.25} and tb["btm_ensemble_cached_vs_dense/train_ratio"] == {0: float(np.float32(0.885))}
    wandb = _wandb_runs(out)["results"]
    assert wandb["group"] == "study" and wandb["summary"]["dense/train_mean"] == 30.5


# ------------------------------------------------------------------------------------------------
# A broken tracker never costs a run


class _FailsToStart:
    def __init__(self, settings, root):
        pass

    def start(self, run_name, group, config):
        raise RuntimeError("no such directory\nsecond line")


class _FailsToLog(_FailsToStart):
    calls = 0

    def start(self, run_name, group, config):
        pass

    def log(self, step, row):
        type(self).calls += 1
        if type(self).calls >= 2:
            raise OSError("disk full")

    def finish(self, failed=False):
        pass


def _copy_expert(out: Path, dest: Path, report_to: list[str]) -> Path:
    shutil.copytree(out / "experts" / "code", dest)
    job = json.loads((dest / "job.json").read_text())
    job["recipe"]["logging"]["report_to"] = report_to
    (dest / "job.json").write_text(json.dumps(job))
    return dest


@pytest.mark.parametrize("broken, what", [(_FailsToStart, "could not start"), (_FailsToLog, "failed to log")])
def test_a_broken_tracker_is_one_warning_and_the_same_weights(study, tmp_path, monkeypatch, capsys, broken, what):
    _, out = study
    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", broken)
    with_it = _copy_expert(out, tmp_path / "a" / "code", ["tensorboard"])
    without = _copy_expert(out, tmp_path / "b" / "code", [])
    capsys.readouterr()
    train_expert(str(with_it))
    lines = [line for line in capsys.readouterr().err.splitlines() if "tracker" in line]
    assert len(lines) == 1 and lines[0].startswith(f"elmforest: tensorboard tracker {what} for code (")
    assert lines[0].endswith("training goes on without it")  # the error's own lines joined into one
    train_expert(str(without))
    a, b = load_file(str(with_it / "model.safetensors")), load_file(str(without / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(with_it / "metrics.jsonl") != [] and (with_it / "expert.json").is_file()


def test_an_uninstalled_tracker_package_is_a_warning(tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ModuleNotFoundError("No module named 'wandb'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    started = trackers.start_trackers(LoggingConfig(report_to=["wandb"]), tmp_path, "dense", {})
    assert started == {}
    assert capsys.readouterr().err.count("elmforest: wandb tracker could not start for dense (ModuleNotFoundError") == 1


# ------------------------------------------------------------------------------------------------
# The recipe section


def test_report_to_names_the_registry_and_is_checked(tmp_path):
    names = typing.get_args(typing.get_args(LoggingConfig.model_fields["report_to"].annotation)[0])
    assert set(names) == set(trackers.TRACKERS)
    assert LoggingConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert LoggingConfig(report_to="none").report_to == []
    corpus = make_corpus(tmp_path / "corpus", docs=20)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, tmp_path / "run", **{"logging.report_to": ["comet"]}))
    with pytest.raises(ElmError) as e:
        load_recipe(path)
    assert "logging.report_to" in str(e.value)
    # trackers may change between runs of one folder: they do not touch its models
    claim_run_dir(load_recipe(path, ["logging.report_to=[]"]), tmp_path / "run")
    claim_run_dir(load_recipe(path, ["logging.report_to=[mlflow]", "logging.project=other"]), tmp_path / "run")


def test_run_names_come_from_the_study_folder(tmp_path):
    study = tmp_path / "s"
    (study / "seed-1" / "experts" / "wiki").mkdir(parents=True)
    (study / "recipe.yaml").write_text("{}")
    (study / "seed-1" / "recipe.yaml").write_text("{}")
    folder = study / "seed-1" / "experts" / "wiki"
    assert trackers.study_folder(folder) == study.resolve()
    assert trackers.run_name(folder, trackers.study_folder(folder)) == "seed-1/experts/wiki"
    (tmp_path / "recipe.yaml").write_text("{}")  # a user's recipe beside the study folder is not a study
    assert trackers.study_folder(study / "dense") == study.resolve()
    lone = tmp_path / "elsewhere" / "mine"
    lone.mkdir(parents=True)
    (tmp_path / "recipe.yaml").unlink()
    assert trackers.study_folder(lone) == lone.parent.resolve() and trackers.run_name(lone, lone.parent.resolve()) == "mine"


class _Recorder:
    """A tracker that records what it is asked."""

    events: list = []

    def __init__(self, settings, root):
        pass

    def start(self, run_name, group, config):
        self.events.append(("start", run_name, group, config["train"]["total_steps"]))

    def log(self, step, row):
        self.events.append(("log", step, row))

    def finish(self, failed=False):
        self.events.append(("finish", failed))


def test_one_tracker_run_per_folder_once_however_nested_and_failed_on_error(tmp_path, monkeypatch):
    from elmforest.train.state import METRICS_OBSERVERS

    monkeypatch.setitem(trackers.TRACKERS, "tensorboard", _Recorder)
    _Recorder.events = []
    study = tmp_path / "proj" / "s1"
    for name in ("dense", "demix"):
        (study / name).mkdir(parents=True)
        (study / name / "train.json").write_text(json.dumps({"spec": {"total_steps": 7}}))
    (study / "recipe.yaml").write_text("{}")
    recipe = {"logging": {"report_to": ["tensorboard"]}}
    with pytest.raises(KeyError):
        with trackers.following(recipe), trackers.following(recipe):  # the inner one adds nothing
            assert sum(isinstance(o, trackers._Follower) for o in METRICS_OBSERVERS) == 1
            for observe in list(METRICS_OBSERVERS):
                observe(study / "dense", {"step": 2, "loss": 1.5, "lr": 0.1})
                observe(study / "demix", {"step": 2, "loss": 2.5, "lr": 0.1})
                observe(study / "dense", {"step": 4, "loss": 1.25, "lr": 0.05, "valid_loss": 1.75})
            raise KeyError("the training failed")
    assert METRICS_OBSERVERS == []
    assert _Recorder.events == [
        ("start", "dense", "s1", 7), ("log", 2, {"loss": 1.5, "lr": 0.1}),
        ("start", "demix", "s1", 7), ("log", 2, {"loss": 2.5, "lr": 0.1}),
        ("log", 4, {"loss": 1.25, "lr": 0.05, "valid_loss": 1.75}),
        ("finish", True), ("finish", True),
    ]
    _Recorder.events = []
    with trackers.following({"logging": {"report_to": []}}):  # nothing asked: no observer at all
        assert METRICS_OBSERVERS == []
