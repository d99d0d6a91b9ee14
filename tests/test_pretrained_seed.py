"""A study that starts from an existing Hugging Face causal LM (`model.path`) with its own tokenizer.

The folders are written here by `save_pretrained`: a GPT-2 with a tokenizer trained by
elmforest's tokenizer module (end-of-text id 0) and a Llama with a tokenizer built directly with
`tokenizers` (<unk> <s> </s> = 0 1 2, so end-of-text is id 2) whose embedding table is padded
past the tokenizer's ids, as released models often are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from elmforest.checks.check import check_recipe
from elmforest.cli import main
from elmforest.errors import ElmError
from elmforest.study.recipe import recipe_from_dict
from elmforest.data.corpus import Corpus
from elmforest.btm.seed import initial_model, model_context, prepare_tokenizer
from elmforest.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer
from tinydata import make_corpus, tiny_recipe, write_recipe

GPT2_CONTEXT, LLAMA_CONTEXT, LLAMA_ROWS = 32, 64, 384


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("pretrained") / "corpus", docs=120)


def _llama_tokenizer(corpus: Path, out: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    c = Corpus(corpus)
    tok.train_from_iterator((t for d in c.domains for t in c.texts(d, "train")), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.save_pretrained(str(out))
    return wrapped


def pretrained_folder(family: str, corpus: Path, out: Path) -> Path:
    """A tiny causal LM and its tokenizer saved side by side by `save_pretrained`."""
    torch.manual_seed(0)
    if family == "gpt2":
        tok_dir = train_tokenizer(Corpus(corpus), ["animals", "code"], 300, out.parent / f"{out.name}-tokenizer")
        tok = load_tokenizer(tok_dir)
        config = GPT2Config(vocab_size=len(tok), n_positions=GPT2_CONTEXT, n_embd=32, n_layer=2, n_head=2,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(config)
    else:
        tok = _llama_tokenizer(corpus, out)
        config = LlamaConfig(vocab_size=LLAMA_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=LLAMA_CONTEXT,
                             tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _recipe(corpus: Path, folder: Path, out: Path, **model) -> dict:
    recipe = tiny_recipe(corpus, out, **{
        "budget.total_tokens": 2048, "budget.seed_fraction": 0.0, "optim.eval_every": 0,
        "arms.dense": False, "arms.random_split": False,
    })
    recipe["model"] = {"path": str(folder), **model}
    return recipe


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_study_starts_from_the_folder_with_its_tokenizer(corpus, tmp_path, family):
    folder = pretrained_folder(family, corpus, tmp_path / family)
    # Llama: train on 32-token windows of a model with 64 positions (model.context shortens it).
    extra = {"context": 32} if family == "llama" else {}
    out = tmp_path / "run"
    main(["run", str(write_recipe(tmp_path / "r.yaml", _recipe(corpus, folder, out, **extra))), "--no-progress"])

    # The folder's tokenizer was copied, not trained.
    assert tokenizer_hash(out / "tokenizer") == tokenizer_hash(folder)
    assert not (out / "tokenizer" / "elmforest_tokenizer.json").exists()
    eos = load_tokenizer(folder).eos_token_id
    assert eos == (0 if family == "gpt2" else 2)
    cache = corpus / ".cache" / "tokens" / tokenizer_hash(folder) / "animals" / "train.json"
    assert json.loads(cache.read_text())["eos_id"] == eos  # documents separated by the folder's end-of-text

    # seed_fraction 0: the seed is the folder's weights, bit for bit.
    start, seed = load_file(str(folder / "model.safetensors")), load_file(str(out / "seed" / "model.safetensors"))
    assert start.keys() == seed.keys() and all(torch.equal(start[k], seed[k]) for k in start)

    src = json.loads((folder / "config.json").read_text())
    for domain in ("animals", "code"):
        expert = out / "forest" / domain
        config = json.loads((expert / "config.json").read_text())
        assert config["vocab_size"] == src["vocab_size"] == (LLAMA_ROWS if family == "llama" else 300)
        for key in ("n_positions", "max_position_embeddings"):
            assert config.get(key) == src.get(key)
        assert config["eos_token_id"] == eos  # the Llama folder had none: filled from its tokenizer
        assert config["architectures"] == src["architectures"]
        job = json.loads((out / "experts" / domain / "job.json").read_text())
        assert job["context"] == 32  # the windows: the GPT-2's 32 positions, the Llama's model.context
        weights = load_file(str(expert / "model.safetensors"))
        assert not torch.equal(weights[next(k for k in weights if "embed" in k or "wte" in k)],
                               start[next(k for k in start if "embed" in k or "wte" in k)])  # it trained
    results = json.loads((out / "results.json").read_text())
    # scored on the study's windows, the experts improved on their starting point (the folder)
    assert 1.0 < results["btm_ensemble_cached"]["train"]["animals"] < results["seed"]["train"]["animals"]


def _run_fails(recipe: dict, tmp_path: Path, capsys) -> str:
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    capsys.readouterr()  # drop what building the folders printed
    with pytest.raises(SystemExit) as e:
        main(["run", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    return err[0]


def test_clear_errors_for_unusable_folders(corpus, tmp_path, capsys):
    folder = pretrained_folder("gpt2", corpus, tmp_path / "gpt2")
    bare = tmp_path / "bare"
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)).save_pretrained(str(bare))
    msg = _run_fails(_recipe(corpus, bare, tmp_path / "r1"), tmp_path, capsys)
    assert "no tokenizer" in msg and "bare" in msg

    small = tmp_path / "small"  # 256 embedding rows for a 300-id tokenizer
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)).save_pretrained(str(small))
    load_tokenizer(folder).save_pretrained(str(small))
    msg = _run_fails(_recipe(corpus, small, tmp_path / "r2"), tmp_path, capsys)
    assert "300 token ids" in msg and "256 rows" in msg

    msg = _run_fails(_recipe(corpus, folder, tmp_path / "r3", context=64), tmp_path, capsys)
    assert "model.context=64 exceeds the model folder's 32 positions" in msg

    msg = _run_fails(_recipe(corpus, folder, tmp_path / "r4", width=64), tmp_path, capsys)
    assert "model.path: cannot be combined with model.width" in msg


def test_a_bf16_folder_starts_in_float32_with_its_tokenizers_ids(corpus, tmp_path):
    folder = pretrained_folder("llama", corpus, tmp_path / "llama")
    bf16 = LlamaForCausalLM.from_pretrained(str(folder)).to(torch.bfloat16)
    bf16.save_pretrained(str(tmp_path / "bf16"))
    load_tokenizer(folder).save_pretrained(str(tmp_path / "bf16"))
    recipe = recipe_from_dict(_recipe(corpus, tmp_path / "bf16", tmp_path / "run", context=16))
    tok = prepare_tokenizer(recipe, tmp_path / "run")
    model = initial_model(recipe, tok)
    assert model_context(recipe, tok) == 16
    assert next(model.parameters()).dtype == torch.float32
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"].float())
    assert (model.config.bos_token_id, model.config.eos_token_id) == (1, 2)
    assert model.generation_config.eos_token_id == 2


def test_the_recipe_check_plans_the_budget_on_model_context(corpus, tmp_path):
    """A folder with 64 positions trained on 16-token windows: 96-token steps divide into 16 x 2
    domains but not into 64 x 2, so a check that read the folder's positions instead of
    `model.context` would refuse the recipe that `run` trains (the SmolLM2 recipe's 128 of 8,192)."""
    folder = pretrained_folder("llama", corpus, tmp_path / "llama")
    recipe = _recipe(corpus, folder, tmp_path / "run", context=16)
    recipe["budget"].update(total_tokens=960, batch_tokens=96)
    check_recipe(recipe_from_dict(recipe), "r.yaml")  # no error
    recipe["model"]["context"] = 20  # 96 is not a multiple of 20 x 2
    with pytest.raises(ElmError, match=r"batch_tokens=96 must be a multiple of context x train domains = 20 x 2"):
        check_recipe(recipe_from_dict(recipe), "r.yaml")
