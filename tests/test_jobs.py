"""Job records (`elmforest.btm.jobs`): records of every earlier version load, each field is
validated with a one-line error naming the file and the field, `elmforest check` reports every
problem, and `runner` resolves to the function that trains the job (old module paths included).

No training here: the records are written by hand, with the fields earlier versions wrote
(the record-writing and resuming paths are tested end to end in test_phases.py and test_anchored.py).
"""

from __future__ import annotations

import importlib
import json

import pytest

from cli_runner import run_cli
from elmforest.btm.experts import train_expert
from elmforest.btm.jobs import (
    ANCHORED_RUNNER, EXPERT_RUNNER, AnchoredJob, ExpertJob, RandomSplitData, read_job, write_job,
)
from elmforest.cli.train import job_runner
from elmforest.errors import ElmError
from elmforest.mixtures.anchored import train_anchored_expert

# A BTM expert's job.json as the first version wrote it (84ae143): no runner; a spec without bf16.
OLD_SPEC = {
    "lr": 0.01, "betas": [0.9, 0.95], "weight_decay": 0.1, "warmup_steps": 5, "total_steps": 64,
    "final_lr_fraction": 0.1, "grad_clip": 1.0, "micro_batches": 1, "compile": False, "threads": 1,
    "log_every": 2, "checkpoint_every": 8, "eval_every": 8, "seed": 0, "device": "cpu",
}
OLD_RECORD = {
    "name": "animals", "domain": "animals", "corpus": "/data/corpus", "tokenizer": "/runs/r/tokenizer",
    "data": {"kind": "domain", "domain": "animals"}, "context": 32, "batch_blocks": 4, "sampler_seed": 58122,
    "spec": OLD_SPEC, "start_step": 32, "init_state": "/runs/r/seed/train_state.pt", "parents": "seed",
    "seed_checkpoint": "/runs/r/seed", "valid_windows": 4, "eval_batch_size": 8,
    "train_domains": ["animals", "code"], "recipe": {"eval": {"batch_size": 8}},
}


def _folder(tmp_path, record):
    folder = tmp_path / "job"
    folder.mkdir(exist_ok=True)
    (folder / "job.json").write_text(json.dumps(record))
    return folder


def test_records_of_earlier_versions_load(tmp_path):
    job = read_job(_folder(tmp_path, OLD_RECORD))
    assert type(job) is ExpertJob and job.runner == EXPERT_RUNNER  # inferred: no anchored-only field
    assert job.spec.betas == (0.9, 0.95) and job.spec.bf16 is False and job.spec.total_steps == 64
    assert job.window_seed == 0  # the recipe predates eval.window_seed
    # A random-split record from before partition_seed and mix: partition 0, pooled.
    random = {**OLD_RECORD, "name": "random0", "domain": "random0",
              "data": {"kind": "random_split", "domains": ["animals", "code"], "part": 0, "parts": 2}}
    data = read_job(_folder(tmp_path, random)).data
    assert data == RandomSplitData(domains=["animals", "code"], part=0, parts=2, partition_seed=0, mix="pooled")
    # An anchored record from before runners were recorded: told apart by its anchored-only fields.
    anchored = read_job(_folder(tmp_path, {**OLD_RECORD, "start_step": 0, "init_state": None, "kind": "anchored",
                                            "embed_windows": 8}))
    assert type(anchored) is AnchoredJob and anchored.runner == ANCHORED_RUNNER and anchored.embed_windows == 8


@pytest.mark.parametrize("old, new", [
    ("elmforest.phases:train_expert", EXPERT_RUNNER),
    ("elmforest.btm.phases:train_expert", EXPERT_RUNNER),
    ("elmforest.anchored:train_anchored_expert", ANCHORED_RUNNER),
])
def test_module_paths_from_before_the_move_resolve(tmp_path, old, new):
    extra = {"kind": "anchored", "embed_windows": 8} if "anchored" in old else {}
    job = read_job(_folder(tmp_path, {**OLD_RECORD, **extra, "runner": old}))
    assert job.runner == new


def test_runners_name_the_functions_that_train_the_jobs(tmp_path):
    for runner, fn in ((EXPERT_RUNNER, train_expert), (ANCHORED_RUNNER, train_anchored_expert)):
        module, _, name = runner.partition(":")
        assert getattr(importlib.import_module(module), name) is fn
    assert job_runner(_folder(tmp_path, OLD_RECORD)) is train_expert
    assert job_runner(_folder(tmp_path, {**OLD_RECORD, "runner": "elmforest.anchored:train_anchored_expert",
                                         "kind": "anchored", "embed_windows": 8})) is train_anchored_expert


def test_a_record_round_trips_and_is_frozen(tmp_path):
    job = read_job(_folder(tmp_path, OLD_RECORD))
    write_job(tmp_path / "again", job)
    written = json.loads((tmp_path / "again" / "job.json").read_text())
    assert written == {**OLD_RECORD, "runner": EXPERT_RUNNER, "spec": {**OLD_SPEC, "bf16": False}}
    with pytest.raises(Exception):
        job.name = "other"  # a record is never changed in place


@pytest.mark.parametrize("change, field", [
    ({"name": None}, "field 'name' is missing"),
    ({"context": "32"}, "field 'context': Input should be a valid integer"),
    ({"spec": {**OLD_SPEC, "lr": "0.01"}}, "field 'spec.lr'"),
    ({"spec": {**OLD_SPEC, "total_steps": 0}}, "field 'spec': train spec total_steps=0"),
    ({"data": {"kind": "domain"}}, "field 'data.domain' is missing"),
    ({"parents": [{"name": "a"}]}, "field 'parents.0.weight' is missing"),
    ({"extra": 1}, "field 'extra' is not a job field"),
    ({"runner": "os:system"}, "field 'runner': 'os:system' is not a job runner"),
])
def test_a_bad_field_is_one_line_naming_the_file_and_the_field(tmp_path, capsys, change, field):
    record = {k: v for k, v in {**OLD_RECORD, **change}.items() if v is not None}
    folder = _folder(tmp_path, record)
    with pytest.raises(ElmError) as e:
        read_job(folder)
    assert str(e.value).startswith(str(folder / "job.json")) and field in str(e.value)
    code, _, err = run_cli(["train", folder], capsys)  # never imports or runs anything
    assert code == 2 and len(err.strip().splitlines()) == 1 and field in err and "job.json" in err


def test_a_runner_reading_another_runners_job_refuses_it(tmp_path):
    folder = _folder(tmp_path, {**OLD_RECORD, "kind": "anchored", "embed_windows": 8})
    with pytest.raises(ElmError, match="trained by elmforest.mixtures.anchored:train_anchored_expert"):
        train_expert(str(folder))
    with pytest.raises(ElmError, match="trained by elmforest.btm.experts:train_expert"):
        train_anchored_expert(str(_folder(tmp_path, OLD_RECORD)))


def test_check_reports_every_bad_field_of_a_job(tmp_path, capsys):
    folder = _folder(tmp_path, {**OLD_RECORD, "context": "32", "sampler_seed": 1.5, "valid_windows": 0})
    code, out, err = run_cli(["check", folder], capsys)
    lines = [line for line in (out + err).splitlines() if "job.json" in line]
    assert code != 0
    for field in ("'context'", "'sampler_seed'", "'valid_windows'"):
        assert sum(field in line for line in lines) == 1, (field, lines)
    code, out, err = run_cli(["check", _folder(tmp_path, OLD_RECORD)], capsys)
    assert not [line for line in (out + err).splitlines() if "job.json" in line]  # an old record is valid
