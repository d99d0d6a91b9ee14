"""The registry of arms: a toy arm added in the test shows up in results.json, report.md and
`elmforest check` (and goes when unregistered); every arm's arm.json is a typed record that
agrees with the figures in the arm's own files; a run folder from before arm.json gets them."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pytest
from cli_runner import run_cli
from elmforest.cli import main
from elmforest.errors import ElmError
from elmforest.models.factory import load_model
from elmforest.study import arms
from elmforest.study.arms import ARM_JSON, Arm, ArmFields, ArmRecord, read_record
from elmforest.study.methods import StudyMethod
from tinydata import make_corpus, tiny_recipe, write_recipe


# --- the toy arm: one class and one registry line ---------------------------------------------


class SeedAgainFields(ArmFields):
    seed_again: bool = False


class SeedAgain(Arm):
    """The seed, scored under another name: trains nothing."""

    name = "seed_again"
    fields = SeedAgainFields
    switch = "seed_again"

    def methods(self, recipe, name):
        return [StudyMethod("seed_again", name, "the seed under another name", lambda ev: ev.single_lp("seed"),
                            lambda sizes: sizes.model)]

    def derive(self, recipe, run_dir, name, earlier):
        seed = earlier["seed"]
        return ArmRecord(arm=name, tokens=seed.tokens, flops=seed.flops,
                         params_at_inference=seed.params_at_inference, compute_matched=False)


@contextmanager
def toy_registered():
    arms.register(SeedAgain())  # the registry line
    try:
        yield
    finally:
        arms.unregister("seed_again")


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("arms")
    corpus = make_corpus(root / "corpus")
    out = root / "run"
    data = tiny_recipe(corpus, out)
    data["arms"] = {"random_split": False, "seed_again": True}
    with toy_registered():
        main(["run", str(write_recipe(root / "recipe.yaml", data)), "--no-progress"])
    return root, out, data, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def _param_total(folder) -> int:
    model = load_model(folder)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def test_a_toy_arm_shows_up_in_results_report_and_check(toy_study, capsys):
    root, out, data, results, report = toy_study
    seed = json.loads((out / "seed" / "seed.json").read_text())
    row = results["seed_again"]
    # it scores the seed: the same numbers on the same windows, under its own name and arm
    assert row["train"] == results["seed"]["train"] and row["novel"] == results["seed"]["novel"]
    assert row["arm"] == "seed_again" and row["train_flops"] == seed["flops"]
    assert row["inference_params"] == _param_total(out / "seed")
    assert results["budget"]["arms"]["seed_again"] == {
        "tokens": seed["tokens"], "flops": seed["flops"], "params_at_inference": _param_total(out / "seed"),
        "compute_matched": False}
    assert "| seed_again |" in report  # its results row and its budget row
    assert sum(line.startswith("| seed_again |") for line in report.splitlines()) == 2
    assert read_record(out / "seed_again" / ARM_JSON).tokens == seed["tokens"]
    with toy_registered():
        code, stdout, err = run_cli(["check", out], capsys)
    assert code == 0, stdout + err
    assert f"checked arm seed_again {out / 'seed_again' / ARM_JSON}" in stdout


def test_an_unregistered_arm_is_gone_and_its_key_refused(toy_study, capsys):
    root, out, data, _, _ = toy_study
    run = root / "unregistered"
    shutil.copytree(out, run)
    bad = write_recipe(root / "bad.yaml", {**data, "out": str(run)})
    code, _, err = run_cli(["run", bad, "--no-progress"], capsys)
    assert code == 2 and "arms.seed_again: unknown key" in err and len(err.strip().splitlines()) == 1
    plain = write_recipe(root / "plain.yaml", {**data, "out": str(run), "arms": {"random_split": False}})
    code, _, err = run_cli(["run", plain, "--no-progress"], capsys)
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    assert "seed_again" not in results and "seed_again" not in results["budget"]["arms"]
    assert "seed_again" not in (run / "report.md").read_text()
    code, stdout, err = run_cli(["check", run], capsys)
    assert code == 0 and "seed_again" not in stdout, stdout + err


# --- arm.json -----------------------------------------------------------------------------------


def _write(path, **fields):
    record = {"arm": "dense", "tokens": 1024, "flops": 2.5e9, "params_at_inference": 5000, "compute_matched": True}
    record.update(fields)
    path.write_text(json.dumps({k: v for k, v in record.items() if v is not ...}))
    return path


def test_a_valid_record_reads_back(tmp_path):
    r = read_record(_write(tmp_path / ARM_JSON, flops=2_500_000_000, extra_tokens=12))
    assert (r.tokens, r.flops, r.extra_tokens, r.flops_measured) == (1024, 2.5e9, 12, None)


@pytest.mark.parametrize("field, value, says", [
    ("flops", ..., "missing"),
    ("compute_matched", ..., "missing"),
    ("tokens", "many", "integer"),
    ("tokens", 1.5, "integer"),
    ("compute_matched", "yes", "boolean"),
    ("params_at_inference", -1, "greater than or equal to 0"),
    ("flop", 3.0, "unknown field"),
])
def test_a_missing_or_mistyped_field_is_one_line_naming_file_and_field(tmp_path, field, value, says):
    path = _write(tmp_path / ARM_JSON, **{field: value})
    with pytest.raises(ElmError) as e:
        read_record(path)
    text = str(e.value)
    assert "\n" not in text and text.startswith(str(path)) and f"field {field!r}" in text and says in text


def test_records_agree_with_the_arms_own_files_and_check_catches_one_that_does_not(toy_study, capsys):
    root, out, _, _, _ = toy_study
    seed = json.loads((out / "seed" / "seed.json").read_text())
    dense = json.loads((out / "dense" / "dense.json").read_text())
    forest = json.loads((out / "forest" / "forest.json").read_text())
    experts = [json.loads((out / "experts" / e["name"] / "expert.json").read_text()) for e in forest["experts"]]
    expected = {  # worked out here from the files each stage wrote
        "seed": (seed["tokens"], seed["flops"], _param_total(out / "seed"), False),
        "dense": (dense["tokens"], dense["flops"], _param_total(out / "dense"), True),
        "btm": (seed["tokens"] + sum(e["tokens"] for e in experts), seed["flops"] + sum(e["flops"] for e in experts),
                sum(_param_total(out / "experts" / e["name"]) for e in experts), True),
    }
    folders = {"seed": "seed", "dense": "dense", "btm": "forest"}
    for arm, (tokens, flops, params, matched) in expected.items():
        r = read_record(out / folders[arm] / ARM_JSON)
        assert (r.arm, r.tokens, r.flops, r.params_at_inference, r.compute_matched) == (arm, tokens, flops, params, matched)
    assert expected["btm"][1] == pytest.approx(expected["dense"][1], rel=0.01)  # compute-matched indeed
    run = root / "tampered"
    shutil.copytree(out, run)
    record = json.loads((run / "forest" / ARM_JSON).read_text())
    (run / "forest" / ARM_JSON).write_text(json.dumps({**record, "flops": record["flops"] * 2}))
    with toy_registered():
        code, stdout, err = run_cli(["check", run], capsys)
    assert code == 2 and f"{run / 'forest' / ARM_JSON}: field 'flops' is" in err, stdout + err


def test_a_run_folder_from_before_arm_json_gets_its_records(toy_study, tmp_path):
    from elmforest.study.recipe import load_recipe
    from elmforest.study.summary import arm_budgets

    _, out, _, results, _ = toy_study
    run = tmp_path / "old"
    shutil.copytree(out, run)
    for f in run.rglob(ARM_JSON):
        f.unlink()
    with toy_registered():
        recipe = load_recipe(run / "recipe.yaml")
        budgets = arm_budgets(recipe, run)[0]
    assert budgets == results["budget"]["arms"]
    assert sorted(p.parent.name for p in run.rglob(ARM_JSON)) == ["dense", "forest", "seed", "seed_again"]
