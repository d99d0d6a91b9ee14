"""Adapter experts as experts of a forest and of the study (the recipe's `experts:` section).

One tiny study (`elmforest run`) on a tiny pretrained llama folder (2 layers, width 32), with
budget.seed_fraction 0, so the seed is the folder itself and every BTM expert is a LoRA adapter on
it; the tests then take its folders apart. Every expected number is computed here from the saved
tensors (the merged weights W0 + scale * B @ A, the FLOPs from the layer shapes' formula)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cli_runner import run_cli
from test_pretrained_seed import pretrained_folder
from tinydata import make_corpus, tiny_recipe, write_recipe
from elmforest.btm.experts import branch_expert, expert_job, train_expert
from elmforest.btm.jobs import read_job
from elmforest.combine.evaluate import token_logprobs
from elmforest.combine.forest import Forest
from elmforest.combine.scoring import ExpertPool
from elmforest.config import AdapterConfig
from elmforest.errors import ElmError
from elmforest.models.adapters import adapter_flops_per_token, attach, base_sha256, load_adapter_model
from elmforest.models.factory import flops_per_token, load_model
from elmforest.study.recipe import load_recipe as load_study_recipe

R, ALPHA, CONTEXT = 4, 8.0, 32
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A finished `elmforest run` with adapter experts -> (run folder, recipe file, pretrained folder)."""
    root = tmp_path_factory.mktemp("adapterstudy")
    corpus = make_corpus(root / "corpus", docs=120)
    folder = pretrained_folder("llama", corpus, root / "llama")
    recipe = tiny_recipe(corpus, root / "run", **{
        "budget.total_tokens": 2048, "budget.seed_fraction": 0.0, "optim.eval_every": 0, "optim.checkpoint_every": 2,
        "optim.log_every": 1, "arms.dense": False, "arms.random_split": False,
        "experts": {"adapter": "lora", "r": R, "alpha": ALPHA},
    })
    recipe["model"] = {"path": str(folder), "context": CONTEXT}
    path = write_recipe(root / "lora.yaml", recipe)
    code = run_cli_plain(["run", path, "--no-progress"])
    assert code == 0
    return root / "run", path, folder


def run_cli_plain(argv) -> int:
    from elmforest.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def _windows(n: int = 3, t: int = 16, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def _merged_by_hand(base: Path, adapter: Path) -> torch.nn.Module:
    """The base with each adapted W0 replaced by W0 + (B @ A) * alpha / r, computed here from the files."""
    model = load_model(base)
    state = model.state_dict()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    touched = 0
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            state[f"{module}.weight"] = state[f"{module}.weight"] + (b @ a) * scale
            touched += 1
    assert touched == 2 * 7  # 2 layers x (q k v o gate up down)
    model.load_state_dict(state)
    return model.eval()


# --- 1. the recipe section -----------------------------------------------------------------------


def test_the_experts_section_is_validated_with_one_line_naming_file_and_field(study, tmp_path, capsys):
    run, path, _ = study
    recipe = load_study_recipe(path)
    assert recipe.experts == AdapterConfig(r=R, alpha=ALPHA)
    assert load_study_recipe(path, ["experts.r=8"]).experts.r == 8  # --set reaches into the optional section
    for bad, field in [({"r": 0}, "experts.r"), ({"adapter": "ia3"}, "experts.adapter"), ({"rank": 4}, "experts.rank"),
                       ({"target_modules": []}, "experts.target_modules")]:
        data = json.loads(json.dumps(__import__("yaml").safe_load(Path(path).read_text())))
        data["experts"] = bad
        bad_path = write_recipe(tmp_path / "bad.yaml", data)
        code, out, err = run_cli(["run", bad_path, "--no-progress"], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and str(bad_path) in lines[0] and field in lines[0], err


# --- 2. adapter expert folders -------------------------------------------------------------------


def test_branch_writes_a_fresh_adapter_that_is_the_seed_exactly(study, tmp_path):
    run, path, folder = study
    recipe = load_study_recipe(path)
    job = expert_job(recipe, run, "animals", {"kind": "domain", "domain": "animals"})
    expert = branch_expert(tmp_path / "animals", job, from_seed=run / "seed")
    assert sorted(p.name for p in expert.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "job.json"]
    record = read_job(expert)
    assert record.adapter == AdapterConfig(r=R, alpha=ALPHA) and record.base == str((run / "seed").resolve())
    assert record.init_state is None and record.start_step == 0  # a fresh AdamW over the whole schedule
    tensors = load_file(str(expert / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(t) == 0 for k, t in tensors.items() if "lora_B" in k)
    assert all(torch.count_nonzero(t) > 0 for k, t in tensors.items() if "lora_A" in k)
    windows = _windows()
    peft = PeftModel.from_pretrained(load_model(folder), str(expert)).eval()
    with torch.no_grad():
        assert torch.equal(peft(windows).logits, load_model(folder).eval()(windows).logits)
    # the init is seeded by the job: branching again gives the same A
    again = load_file(str(branch_expert(tmp_path / "again", job, from_seed=run / "seed") / "adapter_model.safetensors"))
    assert all(torch.equal(again[k], tensors[k]) for k in tensors)
    stranger = tmp_path / "stranger"  # an adapter on another base cannot be a parent
    shutil.copytree(run / "experts" / "code", stranger)
    meta = json.loads((stranger / "expert.json").read_text())
    (stranger / "expert.json").write_text(json.dumps({**meta, "base_sha256": "0" * 64}))
    with pytest.raises(ElmError, match="parent 'code' is not an adapter on this run's base"):
        branch_expert(tmp_path / "grown", job, from_experts=[(stranger, 1.0)])


def test_trained_expert_records_its_base_by_hash_and_honest_flops(study):
    run, path, folder = study
    expert = run / "experts" / "animals"
    meta = json.loads((expert / "expert.json").read_text())
    assert meta["base_sha256"] == base_sha256(run / "seed") == base_sha256(folder)  # seed_fraction 0: the folder's weights
    assert meta["adapter"]["r"] == R and meta["base"] == str((run / "seed").resolve())
    assert not (expert / "model.safetensors").exists()
    # FLOPs: the frozen-base count of this architecture, per token, times the tokens trained
    model = attach(load_model(folder), AdapterConfig(r=R, alpha=ALPHA))
    per_token = adapter_flops_per_token(model, CONTEXT)
    assert meta["tokens"] == 8 * 128 and meta["flops"] == per_token * meta["tokens"]
    assert per_token < flops_per_token(load_model(folder).config, CONTEXT)  # less than training every weight
    tensors = load_file(str(expert / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(t) > 0 for t in tensors.values())  # it trained (B moved off zero)


def test_a_killed_adapter_expert_resumes_bit_identically(study, tmp_path):
    run, path, _ = study
    recipe = load_study_recipe(path)
    job = expert_job(recipe, run, "code", {"kind": "domain", "domain": "code"})
    straight = branch_expert(tmp_path / "straight" / "code", job, from_seed=run / "seed")
    killed = branch_expert(tmp_path / "killed" / "code", job, from_seed=run / "seed")
    train_expert(str(straight), threads=1)
    tests = Path(__file__).parent
    child = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tests)!r}); from _expert_jobs import train_then_die; "
         f"train_then_die({str(killed)!r}, 1)"],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (killed / "expert.json").exists() and (killed / "train_state.pt").exists()
    meta = train_expert(str(killed), threads=1)  # resumes from the checkpoint the killed run left
    a, b = load_file(str(straight / "adapter_model.safetensors")), load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta["final_loss"] == json.loads((straight / "expert.json").read_text())["final_loss"]


# --- the forest: base stored once, merge / ls / remove, loading, averaging, check ---------------------


def test_the_forest_stores_the_base_once_and_merge_refuses_another_base(study, tmp_path, capsys):
    run, _, folder = study
    forest = Forest(run / "forest")
    assert forest.names == ["animals", "code"] and forest.base_sha256 == base_sha256(folder)
    assert (run / "forest" / "base" / "model.safetensors").stat().st_ino == (run / "seed" / "model.safetensors").stat().st_ino
    files = {p.name for p in (run / "forest" / "animals").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "expert.json", "job.json"} <= files
    assert not files & {"model.safetensors", "config.json", "train_state.pt"}  # the adapter only

    new = tmp_path / "forest"  # `elmforest merge` builds a new adapter forest from the experts' base
    for name in ("animals", "code"):
        code, out, err = run_cli(["merge", new, run / "experts" / name], capsys)
        assert code == 0, err
    assert Forest(new).base_sha256 == forest.base_sha256 and (new / "base" / "config.json").is_file()
    code, out, err = run_cli(["ls", new], capsys)
    assert code == 0 and "animals" in out and "code" in out

    other = tmp_path / "other"  # the same adapter claiming another base
    shutil.copytree(run / "experts" / "animals", other)
    meta = json.loads((other / "expert.json").read_text())
    meta.update(base_sha256="0" * 64, name="other")
    (other / "expert.json").write_text(json.dumps(meta))
    code, out, err = run_cli(["merge", new, other], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "base_sha256 " + "0" * 64 in err and "differs" in err, err
    full = tmp_path / "fullforest"  # an adapter expert never joins a forest of full experts, nor the reverse
    Forest.create(full, run / "tokenizer", meta["tokenizer_hash"], meta["arch_hash"])
    with pytest.raises(ElmError, match="an adapter expert cannot join a forest of full experts"):
        Forest(full).merge(run / "experts" / "animals")

    code, out, err = run_cli(["remove", new, "animals"], capsys)
    assert code == 0 and Forest(new).names == ["code"] and not (new / "animals").exists() and (new / "base").is_dir()


def test_a_one_expert_adapter_forest_scores_base_plus_adapter(study, tmp_path, capsys):
    run, _, folder = study
    one = tmp_path / "one"
    assert run_cli(["merge", one, run / "experts" / "code"], capsys)[0] == 0
    windows = _windows()
    got = ExpertPool(Forest(one)).logprobs(windows)[0]
    by_hand = _merged_by_hand(folder, run / "experts" / "code")
    with torch.no_grad():
        assert torch.equal(got, token_logprobs(by_hand, windows))
        peft = load_adapter_model(folder, run / "experts" / "code").eval()  # unmerged: the same up to rounding
        assert torch.allclose(got, token_logprobs(peft, windows), atol=1e-5)
        assert not torch.allclose(got, token_logprobs(load_model(folder).eval(), windows), atol=1e-3)


def test_generate_on_an_adapter_forest_continues_as_its_merged_model(study, tmp_path, capsys):
    """`generate` on a one-expert adapter forest writes what the base + adapter merged by hand in
    the test (saved as a plain model folder) writes, and not what the bare base writes."""
    run, _, folder = study
    one = tmp_path / "one"
    assert run_cli(["merge", one, run / "experts" / "code"], capsys)[0] == 0
    merged = tmp_path / "merged"
    _merged_by_hand(folder, run / "experts" / "code").save_pretrained(str(merged))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, merged / name)
    args = ["--prompt", "def f", "--greedy", "--max-new-tokens", "24", "--device", "cpu"]
    texts = {}
    for key, target in (("forest", one), ("merged", merged), ("base", folder)):
        code, out, err = run_cli(["generate", target, *args], capsys)
        assert code == 0, err
        texts[key] = out
    assert texts["forest"] == texts["merged"] and texts["forest"].startswith("def f")
    assert texts["forest"] != texts["base"]


def test_average_of_an_adapter_forest_is_the_exact_delta_average(study, tmp_path, capsys):
    run, _, folder = study
    out = tmp_path / "avg"
    code, stdout, err = run_cli(["average", run / "forest", "--method", "weighted", "--weights", "animals=0.25,code=0.75",
                                 "--out", out], capsys)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)  # a complete plain folder
    assert (out / "tokenizer.json").is_file() and json.loads((out / "average.json").read_text())["kind"] == "adapters"
    expected = load_model(folder).state_dict()
    base = {k: v.clone() for k, v in expected.items()}
    for name, w in (("animals", 0.25), ("code", 0.75)):
        delta = {k: v - base[k] for k, v in _merged_by_hand(folder, run / "experts" / name).state_dict().items()}
        expected = {k: expected[k] + w * delta[k] for k in expected}
    got = model.state_dict()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert not torch.allclose(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_check_passes_an_adapter_forest_and_flags_a_wrong_base_hash(study, tmp_path, capsys):
    run, _, _ = study
    for target in (run / "forest", run / "experts" / "animals"):
        code, out, err = run_cli(["check", target], capsys)
        assert code == 0, out + err
    forest = tmp_path / "forest"
    shutil.copytree(run / "forest", forest)
    data = json.loads((forest / "forest.json").read_text())
    data["base_sha256"] = "f" * 64
    (forest / "forest.json").write_text(json.dumps(data))
    code, out, err = run_cli(["check", forest], capsys)
    assert code == 2 and f"base_sha256 {'f' * 64} differs from base/'s" in err, out + err
    expert = forest / "code"  # an expert whose base hash is not its forest's
    data["base_sha256"] = base_sha256(forest / "base")
    (forest / "forest.json").write_text(json.dumps(data))
    meta = json.loads((expert / "expert.json").read_text())
    meta["base_sha256"] = "e" * 64
    (expert / "expert.json").write_text(json.dumps(meta))
    code, out, err = run_cli(["check", forest], capsys)
    assert code == 2 and f"base_sha256 {'e' * 64} differs from forest.json's" in err, out + err


# --- 4. the study ------------------------------------------------------------------------------------


def test_the_study_reports_base_arrow_and_cat_rows_and_adapter_flops(study):
    run, _, _ = study
    results = json.loads((run / "results.json").read_text())
    for method in ("base", "seed", "btm_ensemble_cached", "btm_average_posterior", "btm_arrow", "btm_cat"):
        assert set(results[method]["train"]) == {"animals", "code"}, method
    assert results["base"]["train"] == results["seed"]["train"]  # seed_fraction 0: the seed is the base
    for domain in ("animals", "code"):  # the experts trained: their ensemble beats the untrained base
        assert results["btm_ensemble_cached"]["train"][domain] < results["base"]["train"][domain]
        assert results["btm_arrow"]["train"][domain] != results["btm_cat"]["train"][domain]
    metas = [json.loads((run / "experts" / d / "expert.json").read_text()) for d in ("animals", "code")]
    arm = results["budget"]["arms"]["btm"]
    assert arm["flops"] == sum(m["flops"] for m in metas)  # the seed (the folder itself) cost nothing
    assert arm["tokens"] == sum(m["tokens"] for m in metas) == 2048
    assert any(n.startswith("`btm` is a forest of LoRA adapter experts") for n in results["notes"])
    # the forest's posterior against PEFT's router and merge: paired ratios of the train-domain
    # geometric means, worked out here from the per-domain perplexities
    for a, b in (("btm_ensemble_cached", "btm_arrow"), ("btm_average_posterior", "btm_cat")):
        (row,) = [c for c in results["comparisons"] if (c["a"], c["b"], c["part"]) == (a, b, "train")]
        logs = {m: [math.log(results[m]["train"][d]) for d in ("animals", "code")] for m in (a, b)}
        assert row["ratio"] == pytest.approx(math.exp(sum(logs[a]) / 2 - sum(logs[b]) / 2), rel=1e-6)
        assert row["ci"][0] <= row["ratio"] <= row["ci"][1]


def test_the_dense_adapter_trains_the_forests_tokens_and_flops_on_balanced_batches(study):
    """arms.dense_adapter: one adapter on both train domains, the dense batch's rows (each domain's
    share of them) for the experts' steps: the forest's tokens and FLOPs, and it learned."""
    run, _, folder = study
    results = json.loads((run / "results.json").read_text())
    arms = results["budget"]["arms"]
    assert arms["dense_adapter"]["tokens"] == arms["btm"]["tokens"] == 2048
    assert arms["dense_adapter"]["flops"] == arms["btm"]["flops"]
    assert arms["dense_adapter"]["params_at_inference"] == sum(p.numel() for p in load_model(folder).parameters())
    adapter = run / "dense_adapter" / "adapter"
    job, expert = read_job(adapter), read_job(run / "experts" / "code")
    assert job.batch_blocks == 2 * expert.batch_blocks  # B, against each expert's B/2
    assert job.data.domains == ["animals", "code"] and job.data.parts == 1 and job.data.mix == "balanced"
    meta = json.loads((adapter / "expert.json").read_text())
    assert meta["steps"] == json.loads((run / "experts" / "code" / "expert.json").read_text())["steps"]
    assert meta["base_sha256"] == base_sha256(run / "seed") and not (adapter / "model.safetensors").exists()
    # its row scores the base with its adapter merged by hand here
    for domain in ("animals", "code"):
        assert results["dense_adapter"]["train"][domain] < results["base"]["train"][domain]
    by_hand = _merged_by_hand(folder, adapter)
    windows = _windows()
    from types import SimpleNamespace

    from elmforest.study.arms import ARMS

    lent = SimpleNamespace(run_dir=run, singles={})  # what the evaluation's StudyModels gives an arm
    ARMS["dense_adapter"].provide(lent, "dense_adapter")
    with torch.no_grad():
        assert torch.equal(token_logprobs(lent.singles["dense_adapter"], windows), token_logprobs(by_hand, windows))
    rows = {(c["a"], c["b"]) for c in results["comparisons"]}
    assert ("btm_ensemble_cached", "dense_adapter") in rows


def test_the_smollm2_lora_recipe_validates_and_lists_the_adapter_rows(study):
    _, _, folder = study  # a llama folder in place of models/smollm2-135m (git-ignored, imported per README)
    recipe = load_study_recipe(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-lora.yaml", [f"model.path={folder}"])
    assert recipe.experts == AdapterConfig(r=16, alpha=32) and recipe.budget.seed_fraction == 0
    from elmforest.study.arms import study_methods
    from elmforest.train.budget import plan_budget

    budget = plan_budget(recipe, recipe.model.context)
    assert (budget.total_steps, budget.expert_blocks) == (64, 2)
    names = [m.name for m in study_methods(recipe)]
    assert {"base", "dense", "dense_adapter", "btm_ensemble_cached", "btm_arrow", "btm_cat"} <= set(names)


def _deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    plain = load_model(base).state_dict()
    merged = _merged_by_hand(base, adapter).state_dict()
    return {k: (merged[k] - plain[k]).double() for k in plain if not torch.equal(merged[k], plain[k])}


def test_a_grown_adapter_starts_as_the_best_rank_r_adapter_of_its_parents(study, tmp_path, capsys):
    from elmforest.btm.growth import branch_grown_expert, expert_recipe, grow_expert

    run, path, folder = study
    recipe = expert_recipe(load_study_recipe(path))
    forest = tmp_path / "forest"
    shutil.copytree(run / "forest", forest)
    grown = branch_grown_expert(recipe, run, forest, "numbers", tmp_path / "numbers", top_k=2)
    parents = json.loads((grown / "grow.json").read_text())["parents"]
    assert [p["name"] for p in parents] == ["animals", "code"] or [p["name"] for p in parents] == ["code", "animals"]
    wanted: dict[str, torch.Tensor] = {}
    for p in parents:
        for k, d in _deltas(folder, forest / p["name"]).items():
            wanted[k] = wanted.get(k, 0) + p["weight"] * d
    got = _deltas(folder, grown)
    assert got.keys() == wanted.keys() and len(got) == 14
    for k, d in wanted.items():  # Eckart-Young: the error is the norm of the singular values past rank r
        s = torch.linalg.svdvals(d)
        assert torch.linalg.matrix_rank(got[k], rtol=1e-4) <= R
        assert torch.isclose(torch.linalg.norm(got[k] - d), s[R:].norm(), rtol=1e-3, atol=1e-6), k
    nearest = branch_grown_expert(recipe, run, forest, "numbers", tmp_path / "nearest", init="nearest")
    parent = json.loads((nearest / "grow.json").read_text())["parents"][0]["name"]
    one = _deltas(folder, forest / parent)
    assert all(torch.allclose(v, one[k], atol=1e-6) for k, v in _deltas(folder, nearest).items())  # exact: rank r

    meta = grow_expert(recipe, run, forest, "numbers", expert_dir=grown, log=lambda _: None)  # trains, merges
    assert meta["base_sha256"] == Forest(forest).base_sha256 and Forest(forest).names == ["animals", "code", "numbers"]
    code, out, err = run_cli(["check", forest], capsys)
    assert code == 0, out + err


def test_an_adapter_expert_trains_data_parallel_in_a_local_worker_as_in_one_process(study, tmp_path):
    from elmforest.btm.experts import train_pending

    run, path, _ = study
    recipe = load_study_recipe(path, ["launcher.kind=local", "launcher.procs_per_job=2", "launcher.workers=1"])
    job = expert_job(recipe, run, "code", {"kind": "domain", "domain": "code"})
    folder = branch_expert(tmp_path / "code", job, from_seed=run / "seed")
    train_pending(recipe, [folder], log=lambda _: None)  # a worker process spawning 2 gloo ranks
    one = json.loads((run / "experts" / "code" / "expert.json").read_text())  # the study's: sequential, 1 process
    two = json.loads((folder / "expert.json").read_text())
    assert (two["tokens"], two["flops"], two["steps"]) == (one["tokens"], one["flops"], one["steps"])
    assert two["final_loss"] == pytest.approx(one["final_loss"], abs=1e-5)
    a, b = load_file(str(run / "experts" / "code" / "adapter_model.safetensors")), load_file(str(folder / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    from elmforest.models.checkpoint import load_train_state

    assert load_train_state(folder / "train_state.pt")["world_size"] == 2  # it did run on two ranks


def test_forget_drops_an_adapter_expert_from_a_copy_of_the_forest(study, capsys):
    run, _, _ = study
    code, out, err = run_cli(["forget", run, "--domain", "animals"], capsys)
    assert code == 0, err
    after = Forest(run / "forget_animals" / "forest")
    assert after.names == ["code"] and after.base_sha256 == Forest(run / "forest").base_sha256
    table = json.loads((run / "forget_animals.json").read_text())
    assert table["ppl"]["after"]["animals"] > table["ppl"]["before"]["animals"]  # its expert gone, the domain got worse
    shutil.rmtree(run / "forget_animals")
    (run / "forget_animals.json").unlink()  # the run folder as the other tests expect it


def test_an_adapter_expert_trains_on_ray_slurm_and_through_storage_as_in_one_process(study, tmp_path, monkeypatch):
    """The same adapter branch trained by the sequential launcher, a real local Ray, submitit's
    local executor (a fresh `python -m`) and a local worker through `launcher.storage` (the folder
    pulled from a file:// URL into scratch space, pushed back, pulled home; the base read from its
    path, like the corpus): the same adapter, bit for bit."""
    from elmforest.config import LauncherConfig
    from elmforest.launch.launchers import run_jobs
    from test_parallel_experts import run_on_ray

    run, path, _ = study
    recipe = load_study_recipe(path)
    job = expert_job(recipe, run, "code", {"kind": "domain", "domain": "code"})
    kinds = ("sequential", "ray", "slurm", "storage")
    folders = {k: str(branch_expert(tmp_path / k / "code", job, from_seed=run / "seed")) for k in kinds}
    run_jobs([folders["sequential"]], train_expert, LauncherConfig(kind="sequential", threads_per_worker=1), log=lambda _: None)
    run_on_ray([folders["ray"]], LauncherConfig(kind="ray", num_cpus=1, threads_per_worker=1))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    slurm = LauncherConfig(kind="slurm", threads_per_worker=1, slurm={"cluster": "local", "timeout_min": 5})
    run_jobs([folders["slurm"]], train_expert, slurm, log=lambda _: None)
    bucket = tmp_path / "bucket"
    stored = LauncherConfig(kind="local", workers=1, threads_per_worker=1, storage=f"file://{bucket}", sync_seconds=0.2)
    run_jobs([folders["storage"]], train_expert, stored, log=lambda _: None)
    assert (bucket / "code" / "adapter_model.safetensors").is_file() and (bucket / "code" / "expert.json").is_file()
    want = (Path(folders["sequential"]) / "adapter_model.safetensors").read_bytes()
    for kind in ("ray", "slurm", "storage"):
        folder = Path(folders[kind])
        assert (folder / "adapter_model.safetensors").read_bytes() == want, kind
        assert json.loads((folder / "expert.json").read_text())["base_sha256"] == base_sha256(run / "seed")
    assert not (Path(folders["sequential"]) / "model.safetensors").exists()  # an adapter, not a full copy
