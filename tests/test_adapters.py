"""Adapter experts: LoRA (PEFT) on a frozen base, trained by the one loop, averaged exactly, ensembled,
and PEFT's own combinations (cat, Arrow). Tiny llama / GPT-2 bases (2 layers, width 32) saved to disk;
every expected number is computed in the test from the saved tensors or from the layer shapes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, AutoTokenizer

from _resume_child import PatternSampler
from test_flops import _shapes
from tinydata import make_corpus
from elmforest.combine.adapters import arrow_model, average_adapter_folders, cat_model
from elmforest.combine.averaging import AverageOptions
from elmforest.combine.ensemble import Ensemble
from elmforest.combine.evaluate import token_logprobs
from elmforest.combine.logprobs import expert_logprobs
from elmforest.data.corpus import Corpus
from elmforest.data.tokenizer import train_tokenizer
from elmforest.errors import ElmError
from elmforest.models.adapters import (
    AdapterConfig,
    adapter_flops_per_token,
    attach,
    base_sha256,
    load_adapter_model,
    save_adapter,
)
from elmforest.models.checkpoint import TRAIN_STATE_NAME, load_train_state, stored_sha256, weights_sha256, weights_state_dict
from elmforest.models.factory import ModelSpec, build_model, load_model, save_model
from elmforest.train.loop import train
from elmforest.train.spec import TrainSpec

L, D, HEADS, CONTEXT, VOCAB, R, ALPHA = 2, 32, 2, 32, 300, 4, 8.0
CFG = AdapterConfig(r=R, alpha=ALPHA)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_corpus(root / "corpus", docs=40)
    return train_tokenizer(Corpus(root / "corpus"), ["animals", "code"], VOCAB, root / "tok")


def _base(family: str, folder, tokenizer_dir):
    if not (folder / "model.safetensors").is_file():
        save_model(build_model(ModelSpec(family, L, D, HEADS, CONTEXT, VOCAB), 0), folder, tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, tokenizer_dir):
    return _base("llama", tmp_path_factory.mktemp("llama") / "base", tokenizer_dir)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory, tokenizer_dir):
    return _base("gpt2", tmp_path_factory.mktemp("gpt2") / "base", tokenizer_dir)


def _windows(n: int = 3, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t + 1), generator=torch.Generator().manual_seed(seed))


def _random_adapter(base_dir, folder, seed: int):
    """An adapter with random A and B (a fresh one has B = 0, a zero update), saved to `folder`."""
    model = attach(load_model(base_dir), CFG, seed=seed)
    generator = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def llama_adapters(llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_adapters")
    return [_random_adapter(llama_base, root / f"a{i}", i) for i in range(3)]


def _logits(model, windows):
    model.eval()
    with torch.no_grad():
        return model(windows[:, :-1]).logits


# --- config, attach, save, load ------------------------------------------------------------------


def test_attach_freezes_the_base_and_adapts_the_family_projections(llama_base, gpt2_base):
    assert AdapterConfig().model_dump() == {"adapter": "lora", "r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": None}
    assert CFG.targets_for("llama") == LLAMA_TARGETS and CFG.targets_for("gpt2") == ["c_attn", "c_proj", "c_fc"]
    with pytest.raises(ElmError, match="experts.target_modules: required for model type 'mistral'"):
        CFG.targets_for("mistral")
    with pytest.raises(ValueError):
        AdapterConfig(r=0)

    base = load_model(llama_base)
    windows = _windows()
    before = _logits(base, windows)
    model = attach(base, CFG, seed=1)
    inner = 8 * math.ceil(D / 3)
    per_layer = 4 * R * (D + D) + 2 * R * (D + inner) + R * (inner + D)  # q k v o; gate up; down
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == L * per_layer and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * L
    assert torch.equal(_logits(model, windows), before)  # B starts at zero: the base exactly

    gpt2 = attach(load_model(gpt2_base), CFG, seed=1)  # c_proj matches the attention and the MLP output
    per_layer = R * (D + 3 * D) + R * (D + D) + R * (D + 4 * D) + R * (4 * D + D)
    assert sum(p.numel() for p in gpt2.parameters() if p.requires_grad) == L * per_layer
    with pytest.raises(ElmError, match="experts.target_modules"):
        attach(load_model(llama_base), AdapterConfig(target_modules=["no_such_proj"]))


def test_saved_adapter_loads_with_peft_and_names_its_base(llama_base, tmp_path):
    folder = _random_adapter(llama_base, tmp_path / "adapter", seed=3)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA and sorted(config["target_modules"]) == sorted(LLAMA_TARGETS)
    windows = _windows()
    peft_model = PeftModel.from_pretrained(load_model(llama_base), str(folder))  # PEFT's own loader
    ours = load_adapter_model(llama_base, folder)
    reference = _random_adapter(llama_base, tmp_path / "again", seed=3)  # the same adapter, built again
    assert torch.equal(load_file(folder / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                       load_file(reference / "adapter_model.safetensors")["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert torch.equal(_logits(peft_model, windows), _logits(ours, windows))
    assert not torch.allclose(_logits(ours, windows), _logits(load_model(llama_base), windows))

    # the base is named by the checksum its weights file carries, which is the digest of its tensors
    base_tensors = load_file(llama_base / "model.safetensors")
    assert base_sha256(llama_base) == stored_sha256(llama_base / "model.safetensors") == weights_sha256(base_tensors)
    plain = tmp_path / "plain"  # written by save_pretrained (no checksum in the file): the same digest
    load_model(llama_base).save_pretrained(plain)
    assert stored_sha256(plain / "model.safetensors") is None and base_sha256(plain) == base_sha256(llama_base)

    (folder / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(ElmError, match="corrupt"):
        load_adapter_model(llama_base, folder)


# --- training through the one loop ---------------------------------------------------------------

SPEC = TrainSpec(lr=5e-3, total_steps=4, micro_batches=2, log_every=1, checkpoint_every=2, warmup_steps=1)


def _adapter_run(base_dir, out, stop_at_step=None):
    model = attach(load_model(base_dir), CFG, seed=7)
    result = train(model, PatternSampler(0, rows=4, block=16), SPEC, out, stop_at_step=stop_at_step, progress=False)
    return model, result


def test_an_adapter_trains_in_the_loop_with_a_frozen_base(llama_base, tmp_path):
    base_before = weights_state_dict(load_model(llama_base))
    model, result = _adapter_run(llama_base, tmp_path / "run")
    run = tmp_path / "run"
    # the base tensors did not move; every adapter tensor did (B left zero)
    merged_names = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for name, t in base_before.items():
        assert torch.equal(merged_names[name], t), name
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # the run folder is an adapter folder PEFT loads, not a model folder
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    assert not (run / "model.safetensors").exists() and not (run / "config.json").exists()
    reloaded = PeftModel.from_pretrained(load_model(llama_base), str(run))
    windows = _windows()
    assert torch.equal(_logits(reloaded, windows), _logits(model, windows))
    info = json.loads((run / "train.json").read_text())
    assert info["status"] == "done" and info["weights_sha256"] == stored_sha256(run / "adapter_model.safetensors")
    state = load_train_state(run / TRAIN_STATE_NAME)
    assert set(state["model"]) == set(load_file(run / "adapter_model.safetensors"))  # the adapter only
    assert all("lora_" in k for k in state["model"])
    # the default FLOPs of a PeftModel are the frozen-base count
    assert result["tokens"] == 4 * 2 * 4 * 16
    assert result["flops"] == result["tokens"] * adapter_flops_per_token(model, 16)
    # a finished run hands back its stored result and adapter
    again, repeat = _adapter_run(llama_base, run)
    assert repeat == result and torch.equal(_logits(again, windows), _logits(model, windows))


def test_an_adapter_run_resumes_bit_identically(llama_base, tmp_path):
    straight, result = _adapter_run(llama_base, tmp_path / "straight")
    _adapter_run(llama_base, tmp_path / "split", stop_at_step=2)
    assert json.loads((tmp_path / "split" / "train.json").read_text())["status"] == "stopped"
    resumed, resumed_result = _adapter_run(llama_base, tmp_path / "split")  # a fresh model, the base rebuilt
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_result["final_loss"] == result["final_loss"] and resumed_result["tokens"] == result["tokens"]
    assert resumed_result["flops"] == result["flops"]


def _counted_adapter_flops(family: str, s: int) -> tuple[int, int]:
    """(FlopCounterMode's count, the Kaplan-convention count) per token from the layer shapes."""
    n_mm, n = _shapes(family, L, D)
    if family == "llama":
        inner = 8 * math.ceil(D / 3)
        shapes = [(D, D)] * 4 + [(D, inner)] * 2 + [(inner, D)]  # (d_in, d_out): q k v o, gate up, down
        first, first_in = 3 * D * D, 3 * D  # block 0's q, k, v read the frozen embeddings
    else:
        shapes = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)]  # c_attn, attn c_proj, c_fc, mlp c_proj
        first, first_in = 3 * D * D, D  # block 0's c_attn
    n_a = L * sum(R * (i + o) for i, o in shapes)
    a0 = R * first_in  # the A matrices on those projections
    # forward 2(N_mm + N_a) + 4Lsd + 2dV; backward: input gradients of every linear but block 0's
    # first projections and of every adapter matrix but their A's, adapter weight gradients 2N_a,
    # attention 8Lsd, the lm_head's input gradient 2dV (its weight is frozen)
    counter = 4 * n_mm + 6 * n_a - 2 * first - 2 * a0 + 12 * L * s * D + 4 * D * VOCAB
    kaplan = 4 * n + 6 * n_a + 6 * L * s * D - 2 * (first + a0)
    return counter, kaplan


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_adapter_flops_against_the_counter(family, llama_base, gpt2_base, tmp_path):
    base_dir = llama_base if family == "llama" else gpt2_base
    model = attach(load_model(base_dir), CFG, seed=0)
    s, tokens = 16, 2 * 4 * 16
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):  # attention as bmm's the counter sees
        result = train(model, PatternSampler(0, rows=4, block=s), TrainSpec(total_steps=1, micro_batches=2), tmp_path / "run",
                       progress=False)
    expected_counter, expected_kaplan = _counted_adapter_flops(family, s)
    counted = sum(counter.get_flop_counts()[type(model).__name__].values())
    assert counted == tokens * expected_counter
    n_mm, n = _shapes(family, L, D)
    assert adapter_flops_per_token(model, s) == expected_kaplan
    assert result["flops"] == tokens * expected_kaplan
    # the two conventions differ by the logits matmul, half the attention square and the biases/gains
    assert expected_kaplan == expected_counter - 4 * D * VOCAB - 6 * L * s * D + 4 * (n - n_mm)


# --- exact averaging of adapters ------------------------------------------------------------------


def _expected_average(base_dir, adapter_dirs, weights, transpose=False):
    """W0 + sum_i w_i * (alpha/r) * B_i @ A_i, tensor by tensor, from the saved files."""
    out = {k: v.clone() for k, v in load_file(base_dir / "model.safetensors").items()}
    for w, folder in zip(weights, adapter_dirs):
        tensors = load_file(folder / "adapter_model.safetensors")
        for key in tensors:
            if key.endswith("lora_A.weight"):
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                delta = (ALPHA / R) * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
                out[f"{module}.weight"] += w * (delta.T if transpose else delta)
    return out


def test_averaged_adapters_are_the_exact_weighted_sum_of_deltas(llama_base, llama_adapters, tmp_path):
    weights = [0.5, 0.3, 0.2]
    out = average_adapter_folders(llama_base, llama_adapters, weights, "weighted", tmp_path / "avg")
    merged = load_file(out / "model.safetensors")
    expected = _expected_average(llama_base, llama_adapters, weights)
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=1e-6)
    changed = [k for k in expected if not torch.equal(expected[k], load_file(llama_base / "model.safetensors")[k])]
    assert len(changed) == 7 * L  # every adapted projection, nothing else
    record = json.loads((out / "average.json").read_text())
    assert record["weights"] == weights and record["base_sha256"] == base_sha256(llama_base)
    # a complete plain model folder
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).vocab_size == VOCAB
    assert type(plain).__name__ == "LlamaForCausalLM"

    # not PEFT's "linear" (A and B scaled separately: cross terms B_i A_j)
    peft_model = PeftModel.from_pretrained(load_model(llama_base), str(llama_adapters[0]), adapter_name="e0")
    for i in (1, 2):
        peft_model.load_adapter(str(llama_adapters[i]), adapter_name=f"e{i}")
    peft_model.add_weighted_adapter(["e0", "e1", "e2"], weights, "lin", combination_type="linear")
    peft_model.set_adapter("lin")
    windows = _windows()
    assert not torch.allclose(_logits(peft_model, windows), _logits(plain, windows), atol=1e-4)

    # task arithmetic on the deltas: W0 + lambda * sum_i D_i
    ta = average_adapter_folders(llama_base, llama_adapters, None, "task_arithmetic", tmp_path / "ta", AverageOptions(scale=0.7))
    expected = _expected_average(llama_base, llama_adapters, [0.7] * 3)
    for key, t in load_file(ta / "model.safetensors").items():
        torch.testing.assert_close(t, expected[key], rtol=0, atol=1e-6)
    with pytest.raises(ElmError, match="sum to"):
        average_adapter_folders(llama_base, llama_adapters, [0.5, 0.5, 0.5], "weighted", tmp_path / "bad")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_adapter_at_weight_one_is_the_merged_adapter(family, llama_base, gpt2_base, tmp_path):
    base_dir = llama_base if family == "llama" else gpt2_base
    adapter = _random_adapter(base_dir, tmp_path / "a", seed=5)
    out = average_adapter_folders(base_dir, [adapter], [1.0], "weighted", tmp_path / "avg")
    windows = _windows()
    merged = PeftModel.from_pretrained(load_model(base_dir), str(adapter)).merge_and_unload()  # PEFT's own merge
    torch.testing.assert_close(_logits(load_model(out), windows), _logits(merged, windows), rtol=0, atol=1e-5)
    if family == "gpt2":  # Conv1D stores W as [d_in, d_out]: the delta is transposed
        expected = _expected_average(base_dir, [adapter], [1.0], transpose=True)
        for key, t in load_file(out / "model.safetensors").items():
            torch.testing.assert_close(t, expected[key], rtol=0, atol=1e-6)


# --- ensembles of adapter experts ----------------------------------------------------------------


def test_adapter_experts_go_through_the_ensemble_unchanged(llama_base, llama_adapters):
    windows = _windows(n=4, t=10, seed=1)
    expert = load_adapter_model(llama_base, llama_adapters[0])
    single = token_logprobs(expert, windows)
    loaders = [lambda: load_adapter_model(llama_base, llama_adapters[0])] * 2  # loaded when their turn comes
    lp = expert_logprobs(loaders, windows, batch_size=3)
    assert torch.equal(lp[0], single) and torch.equal(lp[1], single)
    twins = Ensemble([load_adapter_model(llama_base, llama_adapters[0]) for _ in range(2)], posterior="full_prefix")
    torch.testing.assert_close(twins(windows), single, rtol=0, atol=1e-5)
    # a one-expert adapter forest scores as base + adapter merged into plain weights
    merged = PeftModel.from_pretrained(load_model(llama_base), str(llama_adapters[0])).merge_and_unload()
    torch.testing.assert_close(Ensemble([expert])(windows), token_logprobs(merged, windows), rtol=0, atol=1e-5)
    # and three different adapters are three different experts
    three = expert_logprobs([load_adapter_model(llama_base, d) for d in llama_adapters], windows)
    assert not torch.allclose(three[0], three[1]) and not torch.allclose(three[1], three[2])


# --- PEFT's cat merge and Arrow router -----------------------------------------------------------


def test_cat_merge(llama_base, llama_adapters, tmp_path):
    windows = _windows()
    first = _logits(load_adapter_model(llama_base, llama_adapters[0]), windows)
    torch.testing.assert_close(_logits(cat_model(llama_base, llama_adapters, [1.0, 0.0, 0.0]), windows), first, rtol=0, atol=1e-5)
    # uniform cat computes W0 + mean_i D_i: the uniform exact average, without materialising it
    uniform = average_adapter_folders(llama_base, llama_adapters, None, "uniform", tmp_path / "uniform")
    torch.testing.assert_close(_logits(cat_model(llama_base, llama_adapters), windows), _logits(load_model(uniform), windows),
                               rtol=0, atol=1e-5)


def test_arrow_routes_per_token(llama_base, llama_adapters):
    windows = _windows()
    # one adapter, top-1: every token routes to it with weight 1, so Arrow is that adapter
    alone = arrow_model(llama_base, llama_adapters[:1], top_k=1)
    torch.testing.assert_close(_logits(alone, windows), _logits(load_adapter_model(llama_base, llama_adapters[0]), windows),
                               rtol=0, atol=1e-5)
    arrow = arrow_model(llama_base, llama_adapters, top_k=2, temperature=1.0)
    routed = token_logprobs(arrow, windows)
    assert routed.shape == (3, 12) and torch.isfinite(routed).all()
    uniform = token_logprobs(cat_model(llama_base, llama_adapters), windows)
    assert not torch.allclose(routed, uniform, atol=1e-4)  # routing is not uniform mixing
    with pytest.raises(ElmError, match="top_k"):
        arrow_model(llama_base, llama_adapters, top_k=4)
