"""Model factory and checkpoints: sizes, deterministic init, FLOP formula, save/load, corruption."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from _resume_child import VOCAB, tiny_model_spec
from elmforest.models.checkpoint import (
    load_train_state,
    save_train_state,
    save_weights,
    verify_weights,
    weights_sha256,
    weights_state_dict,
)
from elmforest.config import ModelConfig
from elmforest.errors import ElmError
from elmforest.models.factory import (
    SIZES,
    ModelSpec,
    arch_hash,
    build_model,
    flops_per_token,
    hf_config,
    llama_intermediate_size,
    load_model,
    model_spec_dict,
    non_embedding_params,
    resolve_spec,
    save_model,
)

torch.set_num_threads(1)


def test_resolve_spec_named_sizes_and_overrides():
    assert resolve_spec(ModelConfig(size="tiny"), 100) == ModelSpec("gpt2", 2, 64, 2, 64, 100)
    assert resolve_spec(ModelConfig(size="demo"), 4096) == ModelSpec("gpt2", 4, 128, 4, 128, 4096)
    assert SIZES["125m"] == SIZES["gpt3-small"]
    big = resolve_spec(ModelConfig(size="350m"), 50000)
    assert (big.layers, big.width, big.heads, big.context) == (24, 1024, 16, 1024)
    over = resolve_spec(ModelConfig(size="demo", layers=6, family="llama", context=256), 512)
    assert (over.family, over.layers, over.width, over.heads, over.context) == ("llama", 6, 128, 4, 256)
    explicit = resolve_spec(ModelConfig(size=None, layers=1, width=32, heads=4, context=8), 300)
    assert explicit == ModelSpec("gpt2", 1, 32, 4, 8, 300)
    assert model_spec_dict(explicit)["vocab_size"] == 300


@pytest.mark.parametrize(
    "cfg, key",
    [
        (ModelConfig(size="huge"), "model.size"),
        (ModelConfig(size=None, layers=2, width=64, heads=2), "model.context"),
        (ModelConfig(size="tiny", width=100, heads=3), "model.width"),
    ],
)
def test_resolve_spec_errors_name_the_key(cfg, key):
    with pytest.raises(ElmError, match=key):
        resolve_spec(cfg, 100)


def test_build_model_is_deterministic_per_seed():
    spec = tiny_model_spec()
    a, b, c = build_model(spec, 1), build_model(spec, 1), build_model(spec, 2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["transformer.wte.weight"], sc["transformer.wte.weight"])
    assert a.lm_head.weight is a.transformer.wte.weight  # tied
    assert a.config.n_inner == 256 and a.config.resid_pdrop == 0 and a.config.attn_pdrop == 0


def test_llama_family_shapes():
    m = build_model(tiny_model_spec("llama"), 0)
    assert type(m).__name__ == "LlamaForCausalLM"
    assert m.config.intermediate_size == llama_intermediate_size(64) == 176  # 8/3*64 = 170.7 -> 176
    assert llama_intermediate_size(768) == 2048
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_non_embedding_params_and_flops_formula():
    spec = tiny_model_spec()
    m = build_model(spec, 0)
    L, d = spec.layers, spec.width
    # per block: ln_1 2d + c_attn (3d^2+3d) + attn c_proj (d^2+d) + ln_2 2d + c_fc (4d^2+4d) + c_proj (4d^2+d)
    n = L * (12 * d * d + 13 * d) + 2 * d  # + final LayerNorm
    assert non_embedding_params(m) == n == 100096
    assert flops_per_token(m.config) == 6 * n + 6 * L * spec.context * d
    assert flops_per_token(m.config, context=8) == 6 * n + 6 * L * 8 * d
    # GPT-3 Small: ~85M non-embedding parameters (12 * L * d^2 plus biases and norms)
    cfg = hf_config(resolve_spec(ModelConfig(size="125m"), 50257))
    fpt = flops_per_token(cfg)
    n125 = (fpt - 6 * 12 * 1024 * 768) // 6
    assert abs(n125 - 12 * 12 * 768**2) / (12 * 12 * 768**2) < 0.01


def test_arch_hash_tracks_architecture(tmp_path):
    a = build_model(tiny_model_spec(), 0)
    b = build_model(tiny_model_spec(), 5)
    wider = build_model(ModelSpec("gpt2", 2, 32, 2, 16, VOCAB), 0)
    llama = build_model(tiny_model_spec("llama"), 0)
    assert arch_hash(a.config) == arch_hash(b.config)
    assert len({arch_hash(a.config), arch_hash(wider.config), arch_hash(llama.config)}) == 3
    save_model(a, tmp_path / "m")
    assert arch_hash(load_model(tmp_path / "m").config) == arch_hash(a.config)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_folder_loads_with_from_pretrained_and_same_logits(tmp_path, family):
    model = build_model(tiny_model_spec(family), 3)
    digest = save_weights(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert verify_weights(tmp_path / "model.safetensors") == digest == weights_sha256(weights_state_dict(model))
    assert "lm_head.weight" not in weights_state_dict(model)  # the tied alias is stored once
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
        assert torch.equal(model(x).logits, load_model(tmp_path)(x).logits)


def test_save_model_copies_tokenizer_files(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"x": 1}')
    save_model(build_model(tiny_model_spec(), 0), tmp_path / "m", tokenizer_dir=tok)
    assert json.loads((tmp_path / "m" / "tokenizer.json").read_text()) == {"x": 1}


def test_corrupt_weights_are_detected(tmp_path):
    save_weights(build_model(tiny_model_spec(), 0), tmp_path)
    path = tmp_path / "model.safetensors"
    good = path.read_bytes()

    data = bytearray(good)
    data[-100] ^= 0x01  # one flipped bit inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ElmError, match="checksum mismatch") as err:
        verify_weights(path)
    assert "model.safetensors" in str(err.value)
    with pytest.raises(ElmError, match="checksum mismatch"):
        load_model(tmp_path)

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ElmError, match="truncated or not a safetensors file"):
        verify_weights(tmp_path)
    with pytest.raises(ElmError, match="truncated or not a safetensors file"):
        load_model(tmp_path)

    path.write_bytes(good)
    assert verify_weights(path) is not None
    (tmp_path / "config.json").unlink()
    with pytest.raises(ElmError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(ElmError, match="not found"):
        load_model(tmp_path / "nowhere")


def test_train_state_round_trip_weights_only(tmp_path):
    state = {
        "step": 3,
        "t": torch.arange(5),
        "nested": {"lst": [1, 2.5, "x", None], "tup": (0.9, 0.95), "flag": True},
    }
    save_train_state(tmp_path / "train_state.pt", state)
    back = load_train_state(tmp_path / "train_state.pt")
    assert back["step"] == 3 and torch.equal(back["t"], torch.arange(5))
    assert back["nested"] == state["nested"]
    (tmp_path / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(ElmError, match="train state corrupt"):
        load_train_state(tmp_path / "train_state.pt")
    with pytest.raises(ElmError, match="not found"):
        load_train_state(tmp_path / "missing.pt")
