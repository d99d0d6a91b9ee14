"""Mixtures inside one model in the product: the DEMix arm of `elmforest run`, the BTX arm and
`elmforest mix`, on a tiny synthetic corpus (2 train domains, 1 novel, 300-token BPE, context 32).

DEMix routing itself (each row through its own domain's MLP) is unit-tested in test_demix.py,
the Mixtral construction in test_btx.py; here: compute matching, the carried-over AdamW state,
resumption, the rows of results.json, and the mix command's folder.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

from cli_runner import run_cli
from elmforest.train.budget import plan_budget, train_spec
from elmforest.btm.seed import train_seed
from elmforest.models.checkpoint import load_train_state
from elmforest.cli import main
from elmforest.study.recipe import recipe_from_dict
from elmforest.data.corpus import Corpus
from elmforest.mixtures.demix import domain_mlps, load_demix
from elmforest.combine.evaluate import token_logprobs
from elmforest.combine.forest import Forest
from elmforest.mixtures.stages import build_moe, demix_optimizer_state, mix_forest, train_demix
from elmforest.mixtures.btx import moe_flops_per_token
from elmforest.models.factory import (
    ModelSpec, arch_hash, build_model, flops_per_token, load_model, non_embedding_params, param_count, save_model,
)
from elmforest.combine.scoring import domain_windows
from elmforest.data.tokenizer import tokenizer_hash, train_tokenizer
from elmforest.train.loop import lr_at, make_optimizer
from elmforest.train.state import read_metrics
from tinydata import make_corpus, tiny_recipe, write_recipe

torch.set_num_threads(1)
BTX_TOKENS = 1024


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("mix-corpus") / "corpus")


@pytest.fixture(scope="module")
def llama_study(corpus, tmp_path_factory):
    """A whole `elmforest run` with llama models and the DEMix and BTX arms on."""
    root = tmp_path_factory.mktemp("mix-study")
    out = root / "run"
    recipe = tiny_recipe(
        corpus, out,
        **{"model.family": "llama", "arms.random_split": False, "arms.demix": True, "arms.btx": True,
           "arms.btx_tokens": BTX_TOKENS},
    )
    main(["run", str(write_recipe(root / "recipe.yaml", recipe)), "--no-progress"])
    return recipe_from_dict(recipe), out, json.loads((out / "results.json").read_text())


def test_demix_row_is_finite_and_compute_matched(llama_study):
    recipe, out, results = llama_study
    row, dense = results["demix_cached"], results["dense"]
    assert set(row["train"]) == {"animals", "code"} and set(row["novel"]) == {"numbers"}
    for v in [*row["train"].values(), *row["novel"].values(), row["train_mean"], row["novel_mean"]]:
        assert math.isfinite(v) and 1.0 < v < results["unigram"]["novel_mean"] * 10
    assert row["train_mean"] < results["seed"]["train_mean"]  # DEMix learned beyond the seed
    # Each token passes through one MLP: the FLOPs are the dense run's.
    assert abs(row["train_flops"] - dense["train_flops"]) / dense["train_flops"] < 0.01
    arms = results["budget"]["arms"]
    assert (arms["demix"]["tokens"], arms["demix"]["flops"]) == (arms["dense"]["tokens"], arms["dense"]["flops"])
    assert arms["demix"]["compute_matched"] is True and arms["demix"]["params_at_inference"] == row["inference_params"]
    # Parameters at inference: the dense model's plus one more llama MLP (3*H*I) per layer per extra domain.
    model, domains = load_demix(out / "demix")
    cfg = model.config
    extra = (len(domains) - 1) * cfg.num_hidden_layers * 3 * cfg.hidden_size * cfg.intermediate_size
    assert row["inference_params"] == param_count(model) == dense["inference_params"] + extra
    # The cached prior over DEMix domains is a distribution that picks each train domain's own MLPs.
    for d, prior in results["priors"]["demix"].items():
        assert sum(prior.values()) == pytest.approx(1.0)
        if d in recipe.train_domains:
            assert prior[d] > 0.5, (d, prior)
    report = (out / "report.md").read_text()
    assert "| demix_cached |" in report and "BTM beats DEMix at equal compute" in report
    assert (out / "plots" / "prior_demix.png").is_file()


def test_demix_continues_the_seed_schedule_and_adam_state(llama_study):
    recipe, out, _ = llama_study
    budget = plan_budget(recipe, 32)
    rows = read_metrics(out / "demix" / "metrics.jsonl")
    spec = train_spec(recipe, budget, budget.dense_micro_batches)
    # Logged steps run from just after the seed to the end, on the seed's schedule (update s uses lr_at(s - 1)).
    assert budget.seed_steps < rows[0]["step"] <= budget.seed_steps + recipe.optim.log_every
    assert rows[-1]["step"] == budget.total_steps
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(r["step"] - 1, spec) for r in rows])
    assert any("valid_loss" in r for r in rows)  # validation routes each window through its domain
    # The domain MLP copies start from the seed's moments; shared parameters keep theirs.
    seed_model = load_model(out / "seed")
    state = load_train_state(out / "seed" / "train_state.pt")
    dense_opt = make_optimizer(seed_model, spec)
    dense_opt.load_state_dict(state["optimizer"])
    seed_moments = {n: dense_opt.state[p]["exp_avg"] for n, p in seed_model.named_parameters()}
    model, opt_state = demix_optimizer_state(load_model(out / "seed"), state["optimizer"], 2, spec)
    opt = make_optimizer(model, spec)
    opt.load_state_dict(opt_state)
    for name, p in model.named_parameters():
        dense_name = name.replace(".mlp.experts.0.", ".mlp.").replace(".mlp.experts.1.", ".mlp.")
        assert torch.equal(opt.state[p]["exp_avg"], seed_moments[dense_name]), name
        assert float(opt.state[p]["step"]) == state["step"]
    # After training the two copies of one MLP differ: each saw only its own domain.
    trained, _ = load_demix(out / "demix")
    a, b = (e.gate_proj.weight for e in domain_mlps(trained)[0].experts)
    assert not torch.allclose(a, b)


def test_btx_row_counts_its_extra_fine_tuning(llama_study):
    _, out, results = llama_study
    mix = json.loads((out / "btx" / "mix.json").read_text())
    assert mix["top_k"] == 2 and mix["experts"] == ["animals", "code"] and mix["weights"] == [0.5, 0.5]
    assert mix["finetune"]["tokens"] >= BTX_TOKENS and mix["finetune"]["flops"] > 0
    row = results["btx"]
    assert row["train_flops"] == results["btm_ensemble_cached"]["train_flops"] + mix["finetune"]["flops"]
    assert row["inference_params"] == mix["params"]
    assert all(math.isfinite(v) and v > 1.0 for v in [*row["train"].values(), *row["novel"].values()])
    assert "BTX (`btx`) is not compute-matched" in (out / "report.md").read_text()


def test_mixture_metrics_count_the_flops_of_their_run_jsons(llama_study):
    """metrics.jsonl of the DEMix and BTX arms ends at their run JSONs' FLOPs. DEMix: the dense
    formula (each token runs one domain's MLP), not 6 x the DEMix model's parameters (every copy).
    BTX: mix.json's finetune flops, 2 x the MoE's forward per token (routers only), not the dense
    formula on the Mixtral's config (all n expert MLPs on every token)."""
    _, out, _ = llama_study
    demix = json.loads((out / "demix" / "demix_run.json").read_text())
    rows = read_metrics(out / "demix" / "metrics.jsonl")
    dense = load_model(out / "seed").config
    per_token = flops_per_token(dense, 32)
    assert rows[-1]["tokens"] == demix["tokens"] and rows[-1]["flops"] == demix["flops"] == per_token * demix["tokens"]
    model, _ = load_demix(out / "demix")
    assert per_token != 6 * non_embedding_params(model) + 6 * dense.num_hidden_layers * 32 * dense.hidden_size
    finetune = json.loads((out / "btx" / "mix.json").read_text())["finetune"]
    rows = read_metrics(out / "btx" / "metrics.jsonl")
    moe = AutoModelForCausalLM.from_pretrained(out / "btx")
    assert rows[-1]["tokens"] == finetune["tokens"]
    assert rows[-1]["flops"] == finetune["flops"] == 2 * moe_flops_per_token(moe, 32)["moe"] * finetune["tokens"]
    assert finetune["flops"] != flops_per_token(moe.config, 32) * finetune["tokens"]


def test_btx_arm_rebuilds_when_asked_to_fine_tune_every_parameter(llama_study, tmp_path):
    """arms.btx_train_all: the finished router-only RUN/btx is rebuilt with every parameter trained;
    the same settings again reuse it."""
    from elmforest.mixtures.stages import build_btx

    recipe, out, _ = llama_study
    run = tmp_path / "run"
    shutil.copytree(out / "forest", run / "forest")
    shutil.copytree(out / "btx", run / "btx")
    before = load_file(str(run / "btx" / "model.safetensors"))
    router_only = json.loads((run / "btx" / "mix.json").read_text())
    written = (run / "btx" / "model.safetensors").stat().st_mtime_ns
    assert build_btx(recipe, run, recipe.arms.btx_tokens, log=lambda s: None) == router_only  # same settings: reused ...
    assert (run / "btx" / "model.safetensors").stat().st_mtime_ns == written  # ... not rebuilt
    meta = build_btx(recipe, run, recipe.arms.btx_tokens, train_all=True, log=lambda s: None)
    assert meta["finetune"]["train_all"] is True and meta["finetune"]["tokens"] == router_only["finetune"]["tokens"]
    # backward through every weight: more FLOPs than router-only for the same tokens (3 vs 2 passes)
    assert meta["finetune"]["flops"] == pytest.approx(router_only["finetune"]["flops"] * 3 / 2)
    after = load_file(str(run / "btx" / "model.safetensors"))
    gates = [k for k in before if k.endswith("mlp.gate.weight")]
    shared = [k for k in before if "mlp" not in k]
    assert gates and shared
    assert any(not torch.equal(before[k], after[k]) for k in shared)  # attention, embeddings, norms moved too
    assert json.loads((run / "btx" / "mix.json").read_text()) == meta


def test_mix_writes_a_mixtral_folder_that_scores_as_in_memory(llama_study, corpus, tmp_path, capsys):
    _, out, _ = llama_study
    target = tmp_path / "moe"
    code, stdout, err = run_cli(["mix", out / "forest", "--out", target, "--top-k", "1",
                                 "--finetune-tokens", 512, "--device", "cpu"], capsys)
    assert code == 0, err
    assert "fine-tuned on 512 tokens" in stdout
    mix = json.loads((target / "mix.json").read_text())
    assert mix["top_k"] == 1 and mix["finetune"]["tokens"] == 512 and mix["finetune"]["steps"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert isinstance(loaded, MixtralForCausalLM) and loaded.config.num_local_experts == 2
    assert AutoTokenizer.from_pretrained(target)("the cat")["input_ids"]
    memory, meta = build_moe(out / "forest", top_k=1, finetune_tokens=512, device="cpu", log=lambda s: None)
    assert meta["finetune"]["flops"] == mix["finetune"]["flops"]
    forest = Forest(out / "forest")
    windows = domain_windows(Corpus(corpus), forest.tokenizer_dir, "numbers", "test", 32, 400)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(loaded, windows), token_logprobs(memory, windows), atol=1e-5, rtol=0)


def test_mix_stopped_midway_continues_to_the_same_model(llama_study, tmp_path, capsys):
    """A BTX fine-tune stopped at step 2 of 4 continues when `elmforest mix` runs again on its folder,
    bit-identically to one that never stopped; other options on that folder are refused."""
    _, out, _ = llama_study
    opts = dict(finetune_tokens=1024, device="cpu", log=lambda s: None)
    straight = mix_forest(out / "forest", tmp_path / "straight", **opts)
    assert straight["finetune"]["steps"] == 4
    stopped = mix_forest(out / "forest", tmp_path / "split", stop_at_step=2, **opts)
    assert stopped["finetune"]["stopped"] and stopped["finetune"]["steps"] == 2
    assert not (tmp_path / "split" / "mix.json").exists()
    code, _, err = run_cli(["mix", out / "forest", "--out", tmp_path / "split", "--finetune-tokens", 1024, "--top-k", 1], capsys)
    assert code == 2 and "top_k=2" in err and "(now 1)" in err
    code, stdout, err = run_cli(["mix", out / "forest", "--out", tmp_path / "split", "--finetune-tokens", 1024, "--device", "cpu"], capsys)
    assert code == 0, err
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    done = json.loads((tmp_path / "split" / "mix.json").read_text())
    assert done["finetune"] == straight["finetune"]
    code, _, err = run_cli(["mix", out / "forest", "--out", tmp_path / "split"], capsys)
    assert code == 2 and "already exists" in err


def test_mix_posterior_weights_lean_to_the_domain(llama_study, tmp_path, capsys):
    _, out, _ = llama_study
    code, _, err = run_cli(["mix", out / "forest", "--out", tmp_path / "m", "--weights", "posterior",
                            "--domain", "code", "--device", "cpu"], capsys)
    assert code == 0, err
    mix = json.loads((tmp_path / "m" / "mix.json").read_text())
    weights = dict(zip(mix["experts"], mix["weights"]))
    assert weights["code"] > weights["animals"] and sum(weights.values()) == pytest.approx(1.0)
    assert mix["finetune"] == {"tokens": 0, "flops": 0, "steps": 0}
    code, _, err = run_cli(["mix", out / "forest", "--out", tmp_path / "n", "--weights", "posterior"], capsys)
    assert code == 2 and "--domain" in err and not (tmp_path / "n").exists()


def test_mix_refuses_gpt2_experts(corpus, tmp_path, capsys):
    """A GPT-2 forest: one-line error, exit 2, nothing written."""
    tok = tmp_path / "tok"
    train_tokenizer(Corpus(corpus), ["animals", "code"], 300, tok)
    model = build_model(ModelSpec(family="gpt2", layers=1, width=32, heads=2, context=32, vocab_size=300), 0)
    forest = None
    for d in ("animals", "code"):
        save_model(model, tmp_path / "experts" / d, tok)
        meta = {"name": d, "domain": d, "tokenizer_hash": tokenizer_hash(tok), "arch_hash": arch_hash(model.config)}
        (tmp_path / "experts" / d / "expert.json").write_text(json.dumps(meta))
        forest = forest or Forest.create(tmp_path / "forest", tok, meta["tokenizer_hash"], meta["arch_hash"])
        forest.merge(tmp_path / "experts" / d)
    code, _, err = run_cli(["mix", tmp_path / "forest", "--out", tmp_path / "moe"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "model.family: llama" in err and "gpt2" in err
    assert not (tmp_path / "moe").exists()


def test_btx_arm_with_gpt2_is_refused_before_training(corpus, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(corpus, tmp_path / "run", **{"arms.btx": True}))
    code, _, err = run_cli(["run", recipe, "--no-progress"], capsys)
    assert code == 2 and "arms.btx" in err and "model.family: llama" in err
    assert not (tmp_path / "run").exists()


def test_demix_stop_and_continue_equals_a_straight_run(corpus, tmp_path):
    """GPT-2 DEMix from a seed: stopping at step k and continuing is bit-identical to one run."""
    data = tiny_recipe(corpus, tmp_path / "base", **{"arms.demix": True})
    recipe = recipe_from_dict(data)
    base = tmp_path / "base"
    train_seed(recipe, base, full=False, progress=False)
    shutil.copytree(base, tmp_path / "straight")
    shutil.copytree(base, tmp_path / "split")
    straight = train_demix(recipe, tmp_path / "straight", progress=False)
    budget = plan_budget(recipe, 32)
    k = budget.seed_steps + 5  # not a checkpoint_every multiple: the stop writes its own checkpoint
    first = train_demix(recipe, tmp_path / "split", progress=False, stop_at_step=k)
    assert first["steps"] == k and not (tmp_path / "split" / "demix" / "demix.json").exists()
    second = train_demix(recipe, tmp_path / "split", progress=False)
    assert second["tokens"] == straight["tokens"] == (budget.total_steps - budget.seed_steps) * budget.batch_tokens
    assert second["flops"] == straight["flops"]
    a, b = load_file(tmp_path / "straight" / "demix" / "model.safetensors"), load_file(tmp_path / "split" / "demix" / "model.safetensors")
    assert a.keys() == b.keys() and any(".mlp.experts.1." in key for key in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    la = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight" / "demix" / "metrics.jsonl")}
    lb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split" / "demix" / "metrics.jsonl")}
    assert set(lb) == set(la) | {k} and all(la[s] == lb[s] for s in la)  # the stop logged step k too
    # A finished folder is returned as it is, and loads as a DEMix model.
    assert train_demix(recipe, tmp_path / "split", progress=False) == second
    model, domains = load_demix(tmp_path / "split" / "demix")
    assert domains == ["animals", "code"] and model.config.model_type == "gpt2"
