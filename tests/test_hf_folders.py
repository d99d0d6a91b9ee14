"""Every model folder elmforest writes is a complete Hugging Face folder.

`architectures` (what mergekit and other tools dispatch on), `dtype`, `transformers_version`,
bos/eos ids taken from the tokenizer, and a generation_config.json with them, as
`save_pretrained` writes; and generation, ours and Hugging Face's, stops at end-of-text.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from elmforest.combine.averaging import average_folders
from elmforest.cli import main
from elmforest.combine.generate import generate
from elmforest.models.factory import ModelSpec, arch_hash, build_model, hf_config, load_model, save_model
from elmforest.data.tokenizer import EOS, load_tokenizer
from tinydata import make_corpus, tiny_recipe, write_recipe


def _eos_id_in_vocabulary(tokenizer_dir) -> int:
    """The end-of-text id read straight from tokenizer.json (not through elmforest or transformers)."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return next(t["id"] for t in data["added_tokens"] if t["content"] == EOS)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_folders")
    corpus = make_corpus(root / "corpus", docs=120)
    out = root / "run"
    recipe = tiny_recipe(corpus, out, **{"budget.total_tokens": 2048, "optim.eval_every": 0})
    path = write_recipe(root / "recipe.yaml", recipe)
    main(["seed", str(path)])
    for d in ("animals", "code"):
        main(["branch", str(path), "--domain", d])
        main(["train", str(out / "experts" / d)])
    average_folders([out / "experts" / "animals", out / "experts" / "code"], [0.5, 0.5], "weighted", out / "average")
    return out


@pytest.mark.parametrize("folder", ["seed", "experts/animals", "average"])
def test_folders_carry_architectures_dtype_and_the_tokenizers_ids(run, folder):
    eos = _eos_id_in_vocabulary(run / "tokenizer")
    path = run / folder
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["dtype"] == "float32"
    assert config["transformers_version"]
    assert config["eos_token_id"] == eos and config["bos_token_id"] == eos  # ours: bos = eos = <|endoftext|>
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos and generation["bos_token_id"] == eos
    loaded = AutoConfig.from_pretrained(path)
    assert loaded.architectures == ["GPT2LMHeadModel"] and loaded.eos_token_id == eos
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.generation_config.eos_token_id == eos
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_token_ids_do_not_change_the_arch_hash(run):
    """Forests written before the ids were recorded keep their arch_hash: ids are not architecture."""
    meta = json.loads((run / "experts" / "animals" / "expert.json").read_text())
    spec = ModelSpec("gpt2", 2, 32, 2, 32, load_model(run / "experts" / "animals").config.vocab_size)
    without_ids = arch_hash(hf_config(spec))
    with_ids = arch_hash(hf_config(ModelSpec(**{**spec.__dict__, "bos_token_id": 0, "eos_token_id": 0})))
    assert meta["arch_hash"] == without_ids == with_ids


def _forced_model(vocab: int, eos: int, other: int, eos_logit: float, other_logit: float) -> GPT2LMHeadModel:
    """A GPT-2 whose next-token logits are the same at every position: `eos_logit` for `eos`,
    `other_logit` for `other`, 0 elsewhere. ln_f's gain is 0 and its bias the first unit vector,
    so the final hidden state is e_0 whatever the input; the untied lm_head's first column is
    then the logits."""
    config = hf_config(ModelSpec("gpt2", 1, 16, 2, 32, vocab, tie_embeddings=False, bos_token_id=eos, eos_token_id=eos))
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0] = eos_logit
        model.lm_head.weight[other, 0] = other_logit
    return model.eval()


def test_generation_stops_at_end_of_text(run, tmp_path):
    tok = load_tokenizer(run / "tokenizer")
    eos, other, vocab = tok.eos_token_id, 7, len(tok)
    prompt = tok.encode("the cat sat", add_special_tokens=False)
    # Sampling with p(eos) = p(other) ~ 1/2: each sample ends at its first end-of-text token.
    model = _forced_model(vocab, eos, other, 30.0, 30.0)
    lengths = set()
    for seed in range(12):
        new = generate(model, tok, prompt, 10, seed=seed)
        assert set(new) <= {eos, other}
        if eos in new:
            assert new.index(eos) == len(new) - 1  # nothing emitted past it
        else:
            assert len(new) == 10
        lengths.add(len(new))
    assert len(lengths) > 1 and min(lengths) < 10  # it stopped early, and not always at once

    # Greedy, through a folder written by elmforest: ours and Hugging Face's `generate` (which
    # reads eos from generation_config.json) both stop after one token.
    save_model(_forced_model(vocab, eos, other, 30.0, 20.0), tmp_path / "forced", tokenizer_dir=run / "tokenizer")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "forced").eval()
    assert generate([loaded, loaded], tok, prompt, 10, greedy=True) == [eos]
    hf = loaded.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    assert hf[0, len(prompt):].tolist() == [eos]


def test_a_folder_without_ids_is_still_written_complete(tmp_path):
    """A model built without a tokenizer (ids None) still gets architectures and dtype."""
    model = build_model(ModelSpec("llama", 1, 16, 2, 16, 64), 0)
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] is None
    # and a model in bf16 records that dtype
    save_model(build_model(ModelSpec("gpt2", 1, 16, 2, 16, 64), 0).to(torch.bfloat16), tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b").dtype == torch.bfloat16


def test_hf_config_ids_come_from_the_spec_only():
    """GPT2Config's own default ids (50256, GPT-2's vocabulary) must not leak into our configs."""
    assert GPT2Config().eos_token_id == 50256
    assert hf_config(ModelSpec("gpt2", 1, 16, 2, 16, 64)).eos_token_id is None
