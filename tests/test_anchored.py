"""Anchored experts (FlexOlmo) on a tiny llama seed: what trains and what stays frozen, the merged
opt-out mixture, opting a domain out, router tuning, counted against derived FLOPs, resumption.

One module-scoped run: a tiny llama seed (2 train domains, 1 novel, context 32) and
`elmforest anchored RUN --router-tokens 512` on it.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from cli_runner import run_cli
from elmforest.train.budget import plan_budget
from elmforest.btm.experts import expert_job
from elmforest.btm.jobs import AnchoredJob, read_job
from elmforest.btm.seed import train_seed
from elmforest.mixtures.anchored import (
    ANCHORED_DIR, ROUTER_INIT, TRAIN_DIR, anchor, anchored_job, branch_anchored, check_llama, domain_embeddings,
    router_input_means,
)
from elmforest.mixtures.anchored_flops import anchored_training_flops, measured_step_flops, step_flops_per_token
from elmforest.mixtures.anchored_moe import MOE_DIR, TUNED_DIR, merge_anchored, opt_out
from elmforest.mixtures.btx import moe_flops_per_token
from elmforest.models.checkpoint import write_safetensors
from elmforest.cli import main
from elmforest.study.recipe import recipe_from_dict
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError
from elmforest.models.factory import flops_per_token, load_model
from elmforest.data.sampler import DomainSampler
from elmforest.combine.scoring import domain_windows
from elmforest.data.tokens import token_array
from elmforest.train.loop import lr_at, train
from elmforest.train.state import read_metrics
from tinydata import make_corpus, tiny_recipe, write_recipe

torch.set_num_threads(1)
DOMAINS = ("animals", "code")
ROUTER_TOKENS = 512


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(recipe, RUN): the seed trained, then `elmforest anchored RUN --router-tokens 512`."""
    root = tmp_path_factory.mktemp("anchored")
    corpus = make_corpus(root / "corpus")
    data = tiny_recipe(corpus, root / "run", **{"model.family": "llama", "arms.random_split": False})
    recipe = recipe_from_dict(data)
    out = root / "run"
    train_seed(recipe, out, progress=False)
    write_recipe(out / "recipe.yaml", data)
    main(["anchored", str(out), "--router-tokens", str(ROUTER_TOKENS), "--embed-windows", "8"])
    return recipe, out


def _seed(out):
    return load_model(out / "seed").eval()


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _test_windows(recipe, out, domain, n=4):
    return domain_windows(Corpus(recipe.corpus), out / "tokenizer", domain, "test", 32, n * 32 + 1)


def test_anchored_expert_trains_only_the_copy_and_its_router_row(run):
    recipe, out = run
    seed = _seed(out).state_dict()
    for d in DOMAINS:
        folder = out / ANCHORED_DIR / d
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, MixtralForCausalLM)
        assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
        state = model.state_dict()
        init = load_file(folder / ROUTER_INIT)
        for key, value in state.items():  # attention, embeddings, norms, lm_head: the seed's, bit for bit
            if ".mlp." not in key:
                assert torch.equal(value, seed[key]), key
        for layer in range(2):
            p = f"model.layers.{layer}.mlp."
            gate_up, down = state[p + "experts.gate_up_proj"], state[p + "experts.down_proj"]
            seed_gate_up = torch.cat([seed[p + "gate_proj.weight"], seed[p + "up_proj.weight"]])
            assert torch.equal(gate_up[0], seed_gate_up) and torch.equal(down[0], seed[p + "down_proj.weight"])
            assert not torch.allclose(gate_up[1], seed_gate_up, atol=1e-4)  # the copy trained
            assert not torch.allclose(down[1], seed[p + "down_proj.weight"], atol=1e-4)
            rows = state[p + "gate.weight"]
            assert torch.equal(rows[0], init["seed"][layer])  # the seed's row: frozen
            assert not torch.allclose(rows[1], init["domain"][layer], atol=1e-5)  # the domain's row: trained
        meta = json.loads((folder / "anchored.json").read_text())
        assert meta["domain"] == d and meta["experts"] == ["seed", d] and meta["top_k"] == 2
        budget = plan_budget(recipe, 32)
        assert meta["steps"] == budget.total_steps - budget.seed_steps
        assert meta["tokens"] == meta["steps"] * budget.expert_batch_tokens  # the BTM experts' budget


def test_anchored_expert_is_the_trained_mixture_and_follows_its_schedule(run):
    recipe, out = run
    folder = out / ANCHORED_DIR / "code"
    init = load_file(folder / ROUTER_INIT)
    trained = anchor(_seed(out), init["seed"], init["domain"])
    trained.load_state_dict(load_file(folder / "train" / "model.safetensors"), strict=False)  # tied alias absent
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    x = _test_windows(recipe, out, "code")[:, :-1]
    torch.testing.assert_close(_logits(exported, x), _logits(trained.eval(), x), atol=1e-5, rtol=0)
    # A fresh schedule: warm-up to where the seed's schedule stood, then linear decay to the
    # BTM experts' final learning rate; worked out here from the recipe.
    budget = plan_budget(recipe, 32)
    o, T, S, W = recipe.optim, budget.total_steps, budget.seed_steps, budget.warmup_steps
    peak = o.lr * (1 - (1 - o.final_lr_fraction) * (S - W) / (T - W))
    steps, warm = T - S, min(W, T - S - 1)
    final = o.lr * o.final_lr_fraction
    for row in read_metrics(folder / "train" / "metrics.jsonl"):
        s = row["step"] - 1  # the update logged as step k used lr_at(k - 1)
        want = peak * (s + 1) / warm if s < warm else peak + (final - peak) * (s - warm) / (steps - warm)
        assert row["lr"] == pytest.approx(want, rel=1e-9), row
    assert json.loads((folder / "train" / "train.json").read_text())["spec"]["weight_decay"] == o.weight_decay


def test_anchored_training_resumes_bit_identically(run, tmp_path):
    """Branch the same expert again with the job record an earlier version wrote (no `runner`:
    anchored by its anchored-only fields), stop at step 5, continue with `elmforest train`: the
    result equals the finished one's."""
    recipe, out = run
    done = out / ANCHORED_DIR / "animals"
    job = read_job(done)
    assert isinstance(job, AnchoredJob) and job.runner == "elmforest.mixtures.anchored:train_anchored_expert"
    init = load_file(done / ROUTER_INIT)
    again = branch_anchored(tmp_path / "animals", job, init["seed"], init["domain"])
    old = {k: v for k, v in json.loads((again / "job.json").read_text()).items() if k != "runner"}
    (again / "job.json").write_text(json.dumps(old))  # the record as written before runners were recorded
    model = anchor(_seed(out), init["seed"], init["domain"])
    sampler = DomainSampler(
        token_array(Corpus(job.corpus), out / "tokenizer", "animals", "train"), 32, job.batch_blocks,
        job.sampler_seed, name="animals",
    )
    per_token = lambda block: step_flops_per_token(model.config, block, anchored=True, convention="kaplan")  # noqa: E731
    train(model, sampler, job.spec, again / TRAIN_DIR, stop_at_step=5, progress=False, flops_per_token=per_token)  # stopped early
    main(["train", str(again)])  # dispatched on the inferred runner; continues from step 5's checkpoint
    meta = json.loads((again / "anchored.json").read_text())
    first = json.loads((done / "anchored.json").read_text())
    assert meta["tokens"] == first["tokens"] and meta["flops"] == first["flops"]
    assert read_metrics(again / TRAIN_DIR / "metrics.jsonl")[-1]["flops"] == first["flops"]
    a, b = load_file(done / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [(r["step"], r["loss"]) for r in read_metrics(done / "train" / "metrics.jsonl")]
    lb = [(r["step"], r["loss"]) for r in read_metrics(again / "train" / "metrics.jsonl")]
    assert set(la) <= set(lb)  # the same losses at every logged step (the stop logged step 5 too)
    assert json.loads((again / "job.json").read_text()) == old  # the record is never rewritten


def test_anchored_job_on_two_ranks_has_one_writer(run, tmp_path):
    """`train_anchored_expert` on 2 gloo ranks: every file in the expert folder is written (created,
    renamed into place or removed) by rank 0 alone, only rank 0 counts FLOPs, both ranks return
    the same record, and it is the single-process run's (tokens, FLOPs; weights to DDP's rounding)."""
    import _ddp_jobs

    from elmforest.train import distributed

    recipe, out = run
    done = out / ANCHORED_DIR / "code"
    init = load_file(done / ROUTER_INIT)
    folder = branch_anchored(tmp_path / "code", read_job(done), init["seed"], init["domain"])
    ranks = distributed.run_procs(_ddp_jobs.anchored_with_audit, str(folder), procs=2, rank_threads=1)
    (r0, writes0, counted0, meta0), (r1, writes1, counted1, meta1) = ranks
    assert (r0, r1) == (0, 1)
    assert writes1 == [] and counted1 == 0  # rank 1 trained, and wrote and counted nothing
    written = {w.split(" ", 1)[1] for w in writes0}
    assert {"anchored.json", "model.safetensors", "config.json", "train/train_state.pt", "train/model.safetensors"} <= written
    assert counted0 == 1
    assert meta0 == meta1 == json.loads((folder / "anchored.json").read_text())
    first = json.loads((done / "anchored.json").read_text())
    assert (meta0["tokens"], meta0["flops"], meta0["steps"]) == (first["tokens"], first["flops"], first["steps"])
    a, b = load_file(done / "model.safetensors"), load_file(folder / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-3, msg=k)  # see tests/test_distributed.py


def test_metrics_count_the_anchored_flops_of_anchored_json(run):
    """Every FLOPs figure of an anchored run agrees: train/metrics.jsonl's last row and train.json
    hold anchored.json's flops (the anchored model's training FLOPs per token, backward through the
    frozen parts, Kaplan's convention), not the dense formula on the seed's config; the router-tuned
    mixture's metrics.jsonl holds its router_tuning flops."""
    recipe, out = run
    config = _seed(out).config
    for d in DOMAINS:
        folder = out / ANCHORED_DIR / d
        meta = json.loads((folder / "anchored.json").read_text())
        rows = read_metrics(folder / TRAIN_DIR / "metrics.jsonl")
        per_token = step_flops_per_token(config, 32, anchored=True, convention="kaplan")
        assert rows[-1]["tokens"] == meta["tokens"] and rows[-1]["flops"] == meta["flops"] == per_token * meta["tokens"]
        assert json.loads((folder / TRAIN_DIR / "train.json").read_text())["result"]["flops"] == meta["flops"]
        assert [r["flops"] for r in rows] == [per_token * r["tokens"] for r in rows]
        assert meta["flops"] != flops_per_token(config, 32) * meta["tokens"]  # what the loop counted before
    tuning = json.loads((out / TUNED_DIR / "anchored_moe.json").read_text())["router_tuning"]
    rows = read_metrics(out / TUNED_DIR / "metrics.jsonl")
    assert rows[-1]["tokens"] == tuning["tokens"] and rows[-1]["flops"] == tuning["flops"]
    assert tuning["flops"] != flops_per_token(AutoModelForCausalLM.from_pretrained(out / MOE_DIR).config, 32) * tuning["tokens"]


def test_router_rows_start_from_unit_domain_embeddings(run):
    recipe, out = run
    seed = _seed(out)
    windows = {d: _test_windows(recipe, out, d) for d in DOMAINS}
    seed_rows, rows = domain_embeddings(seed, windows)
    # By hand: the post-attention RMSNorm output of layer 1, averaged over every input position.
    captured = []
    handle = seed.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        seed(input_ids=windows["code"][:, :-1])
    handle.remove()
    mean = captured[0].double().mean(dim=(0, 1))
    torch.testing.assert_close(router_input_means(seed, windows["code"])[1], mean)
    torch.testing.assert_close(rows["code"][1], (mean / mean.norm()).float())
    pooled = (router_input_means(seed, windows["code"]) + router_input_means(seed, windows["animals"])) / 2
    torch.testing.assert_close(seed_rows, (pooled / pooled.norm(dim=-1, keepdim=True)).float())
    assert torch.allclose(seed_rows.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(rows["code"], rows["animals"], atol=1e-3)


def test_merged_mixture_holds_every_expert_and_scores(run):
    recipe, out = run
    moe = AutoModelForCausalLM.from_pretrained(out / MOE_DIR).eval()
    assert isinstance(moe, MixtralForCausalLM)
    assert moe.config.num_local_experts == 3 and moe.config.num_experts_per_tok == 3  # min(4, n + 1)
    meta = json.loads((out / MOE_DIR / "anchored_moe.json").read_text())
    assert meta["experts"] == ["seed", *DOMAINS] and meta["router_rows"] == "trained" and meta["top_k"] == 3
    state = moe.state_dict()
    for j, d in enumerate(DOMAINS, start=1):
        expert = load_file(out / ANCHORED_DIR / d / "model.safetensors")
        for layer in range(2):
            p = f"model.layers.{layer}.mlp."
            assert torch.equal(state[p + "experts.gate_up_proj"][j], expert[p + "experts.gate_up_proj"][1])
            assert torch.equal(state[p + "experts.down_proj"][j], expert[p + "experts.down_proj"][1])
            assert torch.equal(state[p + "gate.weight"][j], expert[p + "gate.weight"][1])  # the trained row
            assert torch.equal(state[p + "gate.weight"][0], expert[p + "gate.weight"][0])
    seed_meta = json.loads((out / "seed" / "seed.json").read_text())
    experts = {d: json.loads((out / ANCHORED_DIR / d / "anchored.json").read_text()) for d in DOMAINS}
    assert meta["train"]["flops"] == seed_meta["flops"] + sum(e["flops"] for e in experts.values())
    assert meta["train"]["tokens"] == seed_meta["tokens"] + sum(e["tokens"] for e in experts.values())
    for d in (*DOMAINS, "numbers"):
        with torch.no_grad():
            logits = _logits(moe, _test_windows(recipe, out, d)[:, :-1])
        assert torch.isfinite(logits).all()


def test_merge_with_embedding_rows_and_refusals(run, tmp_path):
    _, out = run
    dirs = [out / ANCHORED_DIR / d for d in DOMAINS]
    meta = merge_anchored(out / "seed", dirs, tmp_path / "emb", router_rows="embeddings", top_k=2)
    assert meta["router_rows"] == "embeddings" and meta["top_k"] == 2
    rows = load_file(tmp_path / "emb" / "model.safetensors")["model.layers.1.mlp.gate.weight"]
    init = [load_file(d / ROUTER_INIT) for d in dirs]
    assert torch.equal(rows, torch.stack([init[0]["seed"][1], init[0]["domain"][1], init[1]["domain"][1]]))
    with pytest.raises(ElmError, match="already exists"):
        merge_anchored(out / "seed", dirs, tmp_path / "emb")
    with pytest.raises(ElmError, match="top_k"):
        merge_anchored(out / "seed", dirs, tmp_path / "k", top_k=4)
    # An expert whose frozen attention moved cannot join: the merge would not be exact.
    bad = tmp_path / "bad"
    shutil.copytree(dirs[0], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] += 1e-3
    write_safetensors(tensors, bad / "model.safetensors")
    with pytest.raises(ElmError, match="q_proj.*frozen"):
        merge_anchored(out / "seed", [bad, dirs[1]], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_opt_out_drops_one_expert_and_keeps_the_rest(run, tmp_path):
    recipe, out = run
    meta = opt_out(out / MOE_DIR, "animals", tmp_path / "no_animals")
    assert meta["experts"] == ["seed", "code"] and meta["opted_out"] == ["animals"] and meta["top_k"] == 2
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "no_animals").eval()
    assert after.config.num_local_experts == 2
    a, b = load_file(out / MOE_DIR / "model.safetensors"), load_file(tmp_path / "no_animals" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(("gate.weight", "gate_up_proj", "down_proj")) and ".mlp." in key:
            assert torch.equal(b[key], a[key][[0, 2]]), key  # the seed's and code's experts and rows, unchanged
        else:
            assert torch.equal(b[key], a[key]), key
    # Opting every domain out leaves the seed's expert alone: exactly the seed.
    opt_out(tmp_path / "no_animals", "code", tmp_path / "seed_only")
    only = AutoModelForCausalLM.from_pretrained(tmp_path / "seed_only").eval()
    assert only.config.num_local_experts == 1 and only.config.num_experts_per_tok == 1
    x = _test_windows(recipe, out, "numbers")[:, :-1]
    torch.testing.assert_close(_logits(only, x), _logits(_seed(out), x), atol=1e-5, rtol=0)
    with pytest.raises(ElmError, match="no expert of domain 'animals'"):
        opt_out(tmp_path / "no_animals", "animals", tmp_path / "again")


def test_opt_out_command_reports_before_and_after(run, capsys):
    _, out = run
    code, stdout, err = run_cli(["opt-out", out, "--domain", "code"], capsys)
    assert code == 0, err
    assert "removed" in stdout and "novel" in stdout
    result = json.loads((out / f"{MOE_DIR}_optout_code.json").read_text())
    before, after = result["ppl"]["before"], result["ppl"]["after"]
    assert set(before) == {"code", "animals", "numbers"} and all(math.isfinite(v) and v > 1 for v in after.values())
    rise = math.log(after["code"] / before["code"])
    assert rise > 0.02  # the code expert's data leaves the model
    assert abs(math.log(after["animals"] / before["animals"])) < rise
    code, _, err = run_cli(["opt-out", out, "--domain", "legal"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "legal" in err
    assert not (out / f"{MOE_DIR}_optout_legal").exists()
    assert AutoModelForCausalLM.from_pretrained(out / f"{MOE_DIR}_optout_code").config.num_local_experts == 2


def test_router_tuning_moves_only_the_router_rows(run):
    _, out = run
    meta = json.loads((out / TUNED_DIR / "anchored_moe.json").read_text())
    tuning = meta["router_tuning"]
    assert tuning["tokens"] >= ROUTER_TOKENS and tuning["steps"] == 2  # 256-token steps
    base = AutoModelForCausalLM.from_pretrained(out / MOE_DIR)
    tuned = AutoModelForCausalLM.from_pretrained(out / TUNED_DIR)
    a, b = base.state_dict(), tuned.state_dict()
    for key in a:
        if key.endswith(".mlp.gate.weight"):
            assert not torch.equal(a[key], b[key]), key
        else:
            assert torch.equal(a[key], b[key]), key
    assert tuning["trained_params"] == 2 * 3 * base.config.hidden_size
    assert tuning["flops"] == 2 * moe_flops_per_token(base, 32)["moe"] * tuning["tokens"]
    assert meta["train"] == json.loads((out / MOE_DIR / "anchored_moe.json").read_text())["train"]  # reported apart


@pytest.mark.parametrize("layers,kv_heads,tied", [(1, 4, True), (2, 4, True), (3, 2, False)])
def test_counted_training_flops_match_the_formula(layers, kv_heads, tied):
    """FlopCounterMode on one real step equals the derived per-token FLOPs within 0.5% (exactly, in
    fact), for the anchored expert and for a BTM expert; the Kaplan convention matches models'."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=32, tie_word_embeddings=tied,
    )
    seed = LlamaForCausalLM(cfg)
    batch = torch.randint(0, 96, (3, 21))
    from elmforest.mixtures.anchored import zero_anchored

    fl = anchored_training_flops(seed, zero_anchored(seed), batch)
    for who in ("anchored", "btm_expert"):
        assert fl["measured"][who] == pytest.approx(fl["analytic"][who], rel=5e-3)
    assert fl["kaplan"]["btm_expert"] == flops_per_token(cfg, 20)
    assert fl["anchored_over_btm"] == pytest.approx(fl["measured"]["anchored"] / fl["measured"]["btm_expert"])
    # The BTM expert by hand: 3 x (every weight matmul + logits) + 3 x full T x T attention.
    a, m = 4 * 32 * 32 - 2 * 32 * (4 - kv_heads) * 8, 3 * 32 * 48
    assert fl["analytic"]["btm_expert"] == 3 * (2 * layers * (a + m) + 2 * 32 * 96) + 3 * layers * 4 * 20 * 32
    assert all(p.requires_grad for p in seed.parameters())  # the seed was left as it was


def test_anchored_step_skips_what_needs_no_gradient():
    """Counted directly: the same 2-expert mixture with every tensor trainable costs 3 x its forward;
    anchored (only the copies and their rows train) its backward is far less than 2 x the forward."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=32)
    rows = torch.zeros(2, 32)
    model = anchor(LlamaForCausalLM(cfg), rows, rows)
    batch = torch.randint(0, 64, (2, 17))
    anchored = measured_step_flops(model, batch)
    model.set_attn_implementation("eager")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=batch[:, :-1], use_cache=False)
    forward = counter.get_total_flops()
    assert anchored == step_flops_per_token(cfg, 16, anchored=True) * 2 * 16
    assert forward < anchored < 2 * forward
    model.requires_grad_(True)
    assert measured_step_flops(model, batch) == 3 * forward


def test_gpt2_seed_and_missing_runs_are_refused(tmp_path, capsys):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ElmError, match="llama-family.*model.family: llama"):
        check_llama(gpt2, "seed")
    code, _, err = run_cli(["anchored", tmp_path / "nothing"], capsys)
    assert code == 2 and "recipe.yaml" in err and len(err.strip().splitlines()) == 1


def test_job_uses_the_btm_experts_batches(run):
    """The anchored expert of a domain draws the BTM expert's very batches (same sampler seed and shape)."""
    recipe, out = run
    btm = expert_job(recipe, out, "code", {"kind": "domain", "domain": "code"})
    job = anchored_job(recipe, out, "code", 8)
    for key in ("sampler_seed", "batch_blocks", "context", "data"):
        assert getattr(job, key) == getattr(btm, key)
    assert job.spec.total_steps == btm.spec.total_steps - btm.start_step and job.start_step == 0
    assert job.spec.lr == pytest.approx(lr_at(btm.start_step, btm.spec))
    assert job.runner == "elmforest.mixtures.anchored:train_anchored_expert" and job.embed_windows == 8
