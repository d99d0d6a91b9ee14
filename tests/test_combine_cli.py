"""`elmforest ensemble / average / eval / generate` on a tiny two-expert forest built in-test.

The forest: a corpus of two very different synthetic domains (digit strings vs. lowercase
words), a 300-token BPE tokenizer, and one 2-layer width-32 GPT-2 per domain trained for a few
dozen AdamW steps on its own domain, merged into a forest the way `elmforest merge` does.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from cli_runner import run_cli as run
from elmforest.combine.averaging import average_state_dicts
from elmforest.data.corpus import Corpus, DomainSource, write_corpus
from elmforest.combine.forest import Forest
from elmforest.models.factory import arch_hash, load_model, save_model
from elmforest.combine.scoring import domain_windows, model_scores
from elmforest.data.tokenizer import tokenizer_hash, train_tokenizer
from elmforest.data.tokens import token_array

CONTEXT = 32
WORDS = "the cat sat on a mat while dog ran far away from home and then came back".split()


def _docs(kind: str, n: int, rng: random.Random) -> list[str]:
    if kind == "nums":
        return [" ".join(str(rng.randint(0, 99)) for _ in range(rng.randint(20, 40))) for _ in range(n)]
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(n)]


def _train_expert(array, vocab: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_inner=128, vocab_size=vocab, n_positions=CONTEXT,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.from_numpy(array.astype("int64"))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(40):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (16,), generator=gen)
        batch = torch.stack([data[s : s + CONTEXT + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(
            model(batch[:, :-1]).logits.reshape(-1, vocab), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """(root, corpus path, forest path) of the tiny two-expert forest."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("combine")
    rng = random.Random(0)
    corpus_dir = root / "corpus"
    write_corpus(corpus_dir, [DomainSource("nums", _docs("nums", 400, rng)), DomainSource("words", _docs("words", 400, rng))])
    corpus = Corpus(corpus_dir)
    tok = train_tokenizer(corpus, ["nums", "words"], 300, root / "tokenizer")
    vocab = len(json.loads((tok / "tokenizer.json").read_text())["model"]["vocab"])
    forest = None
    for i, domain in enumerate(("nums", "words")):
        model = _train_expert(token_array(corpus, tok, domain, "train"), vocab, seed=i)
        folder = root / "trained" / domain
        save_model(model, folder, tok)
        meta = {
            "name": domain, "domain": domain, "parents": "seed", "seed_checkpoint": str(root / "no-seed"),
            "tokenizer_hash": tokenizer_hash(tok), "arch_hash": arch_hash(model.config),
            "recipe": {"corpus": str(corpus_dir)},
        }
        (folder / "expert.json").write_text(json.dumps(meta))
        if forest is None:
            forest = Forest.create(root / "forest", tok, meta["tokenizer_hash"], meta["arch_hash"])
        forest.merge(folder)
    return root, corpus_dir, root / "forest"


def run_ok(argv, capsys) -> str:
    code, out, err = run(argv, capsys)
    assert code == 0, err
    return out


def run_json(argv, path, capsys) -> dict:
    run_ok([*argv, "--json", path], capsys)
    return json.loads(path.read_text())


def test_ensemble_prior_leans_on_the_matching_expert_and_round_trips(built, tmp_path, capsys):
    root, _corpus, forest = built
    saved = tmp_path / "prior.json"
    first = run_json(["ensemble", forest, "--domain", "nums", "--device", "cpu", "--save-prior", saved], tmp_path / "a.json", capsys)
    assert first["prior"]["experts"]["nums"] > 0.8
    assert first["experts_run"] == ["nums", "words"]
    assert 1.0 < first["ppl"] < 300 and first["tokens"] > 0
    record = json.loads(saved.read_text())
    assert set(record) >= {"domain", "experts", "posterior", "batches", "windows"}
    assert record["domain"] == "nums" and record["batches"] == -(-record["windows"] // 4)
    assert record["experts"] == first["prior"]["experts"]

    out = run_ok(["ensemble", forest, "--domain", "nums", "--device", "cpu", "--load-prior", saved], capsys)
    assert "nums" in out and f"{first['ppl']:.4f}" in out
    again = run_json(["ensemble", forest, "--domain", "nums", "--device", "cpu", "--load-prior", saved], tmp_path / "b.json", capsys)
    assert again["ppl"] == first["ppl"]

    words = run_json(["ensemble", forest, "--domain", "words", "--device", "cpu"], tmp_path / "w.json", capsys)
    assert words["prior"]["experts"]["words"] > 0.8


def test_top1_ensemble_equals_that_experts_eval(built, tmp_path, capsys):
    _root, corpus, forest = built
    top1 = run_json(["ensemble", forest, "--domain", "words", "--top-k", "1", "--device", "cpu"], tmp_path / "t.json", capsys)
    assert top1["experts_run"] == ["words"]
    single = run_json(
        ["eval", forest / "words", "--corpus", corpus, "--domains", "words", "--device", "cpu"], tmp_path / "e.json", capsys
    )
    assert single["kind"] == "model"
    assert single["domains"]["words"]["ppl"] == top1["ppl"]
    assert single["domains"]["words"]["tokens"] == top1["tokens"]


def test_uniform_average_loads_and_matches_in_memory_average(built, tmp_path, capsys):
    _root, corpus, forest = built
    out = tmp_path / "avg"
    printed = run_ok(["average", forest, "--method", "uniform", "--out", out], capsys)
    assert "0.5000" in printed
    hf = AutoModelForCausalLM.from_pretrained(out)  # a plain Hugging Face folder
    assert (out / "tokenizer.json").is_file() and (out / "average.json").is_file()
    result = run_json(["eval", out, "--corpus", corpus, "--domains", "nums,words", "--device", "cpu"], tmp_path / "e.json", capsys)

    experts = [load_model(forest / n) for n in ("nums", "words")]
    merged = average_state_dicts([m.state_dict() for m in experts], method="uniform")
    experts[0].load_state_dict(merged)
    for d in ("nums", "words"):
        windows = domain_windows(Corpus(corpus), forest / "tokenizer", d, "test", CONTEXT, 20000)
        assert result["domains"][d]["ppl"] == model_scores(experts[0], windows)["ppl"]
        assert result["domains"][d]["ppl"] == model_scores(hf, windows)["ppl"]


def test_weighted_one_hot_average_is_that_expert(built, tmp_path, capsys):
    _root, corpus, forest = built
    out = tmp_path / "w"
    run_ok(["average", forest, "--method", "weighted", "--weights", "nums=1.0", "--out", out], capsys)
    avg = run_json(["eval", out, "--corpus", corpus, "--domains", "nums", "--device", "cpu"], tmp_path / "a.json", capsys)
    expert = run_json(["eval", forest / "nums", "--corpus", corpus, "--domains", "nums", "--device", "cpu"], tmp_path / "b.json", capsys)
    assert avg["domains"]["nums"] == expert["domains"]["nums"]
    # --normalise rescales weights that do not sum to 1
    run_ok(["average", forest, "--method", "weighted", "--weights", "nums=2,words=2", "--normalise", "--out", tmp_path / "n"], capsys)
    assert json.loads((tmp_path / "n" / "average.json").read_text())["weights"] == [0.5, 0.5]


def test_posterior_average_uses_the_cached_prior(built, tmp_path, capsys):
    _root, _corpus, forest = built
    out = tmp_path / "p"
    run_ok(["average", forest, "--method", "posterior", "--domain", "nums", "--device", "cpu", "--out", out], capsys)
    info = json.loads((out / "average.json").read_text())
    assert info["weights"][0] > 0.8 and info["prior"]["domain"] == "nums"
    assert abs(sum(info["weights"]) - 1) < 1e-9
    # the written tensors are the prior-weighted mean of the experts', worked out here
    from safetensors.torch import load_file

    names = json.loads((forest / "forest.json").read_text())["experts"]
    experts = [load_file(forest / e["path"] / "model.safetensors") for e in names]
    weights = [info["prior"]["experts"][e["name"]] for e in names]
    merged = load_file(out / "model.safetensors")
    for key in merged:
        want = sum(w * t[key].double() for w, t in zip(weights, experts))
        assert torch.allclose(merged[key].double(), want, atol=1e-6), key


def test_eval_forest_and_model_score_the_same_tokens(built, tmp_path, capsys):
    _root, corpus, forest = built
    args = ["--corpus", corpus, "--domains", "nums,words", "--max-tokens", "500", "--device", "cpu"]
    ens = run_json(["eval", forest, *args], tmp_path / "f.json", capsys)
    one = run_json(["eval", forest / "nums", *args], tmp_path / "m.json", capsys)
    assert ens["kind"] == "forest" and one["kind"] == "model"
    for d in ("nums", "words"):
        assert ens["domains"][d]["tokens"] == one["domains"][d]["tokens"] == (500 - 1) // CONTEXT * CONTEXT
    assert ens["prior"]["words"]["experts"]["words"] > 0.8
    # the matching expert ensemble beats the off-domain expert on words
    assert ens["domains"]["words"]["ppl"] < one["domains"]["words"]["ppl"]


def test_generate_greedy_cache_and_no_cache_agree(built, tmp_path, capsys):
    _root, _corpus, forest = built
    args = ["generate", forest, "--prompt", "12 47", "--greedy", "--max-new-tokens", "20", "--device", "cpu"]
    cached = run_ok(args, capsys)
    full = run_ok([*args, "--no-cache"], capsys)
    assert cached == full and cached.startswith("12 47") and len(cached.strip()) > len("12 47")
    single = run_ok(["generate", forest / "words", "--prompt", "the", "--max-new-tokens", "10", "--seed", "3", "--device", "cpu"], capsys)
    assert single.startswith("the")


def test_top_k_with_a_saved_prior_never_loads_the_other_experts(built, tmp_path, capsys):
    """Corrupt the words expert's weights: a top-1 ensemble on nums never opens them."""
    _root, _corpus, forest = built
    copy = tmp_path / "forest"
    shutil.copytree(forest, copy)
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"domain": "nums", "experts": {"nums": 0.9, "words": 0.1}}))
    (copy / "words" / "model.safetensors").write_bytes(b"not weights")
    top1 = run_json(["ensemble", copy, "--domain", "nums", "--load-prior", prior, "--top-k", "1", "--device", "cpu"],
                    tmp_path / "t.json", capsys)
    assert top1["experts_run"] == ["nums"]
    code, _out, err = run(["ensemble", copy, "--domain", "nums", "--load-prior", prior, "--device", "cpu"], capsys)
    assert code == 2 and "words/model.safetensors" in err


def test_average_copies_the_forest_tokenizer_when_experts_lack_it(built, tmp_path, capsys):
    _root, _corpus, forest = built
    copy = tmp_path / "forest"
    shutil.copytree(forest, copy)
    for name in ("nums", "words"):
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (copy / name / f).unlink()
    out = tmp_path / "avg"
    run_ok(["average", copy, "--method", "argmax", "--load-prior", _prior_file(tmp_path), "--out", out], capsys)
    assert (out / "tokenizer.json").read_bytes() == (forest / "tokenizer" / "tokenizer.json").read_bytes()
    info = json.loads((out / "average.json").read_text())
    assert info["weights"] == [0.0, 1.0] and info["forest"] == str(copy)


def _prior_file(tmp_path):
    path = tmp_path / "prior.json"
    path.write_text(json.dumps({"domain": "words", "experts": {"nums": 0.3, "words": 0.7}}))
    return path


def _broken_copy(forest, tmp_path, edit):
    copy = tmp_path / "forest"
    shutil.copytree(forest, copy)
    edit(copy)
    return copy


def _bad_forest_json(copy):
    (copy / "forest.json").write_text("{not json")


def _bad_arch(copy):
    meta = json.loads((copy / "words" / "expert.json").read_text())
    meta["arch_hash"] = "0" * 16
    (copy / "words" / "expert.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "case, expect",
    [
        ("unknown_domain", "'nope'"),
        ("unknown_weight_name", "'bogus'"),
        ("negative_weight", "negative"),
        ("weights_not_summing", "sum to 0.7"),
        ("malformed_forest_json", "forest.json"),
        ("mismatched_arch", "words/expert.json"),
        ("model_without_weights", "model.safetensors"),
        ("prior_file_unknown_expert", "'ghost'"),
    ],
)
def test_bad_input_exits_2_with_one_line(built, tmp_path, capsys, case, expect):
    _root, corpus, forest = built
    avg = ["average", forest, "--method", "weighted", "--out", tmp_path / "out", "--weights"]
    if case == "unknown_domain":
        argv = ["ensemble", forest, "--domain", "nope", "--device", "cpu"]
    elif case == "unknown_weight_name":
        argv = [*avg, "nums=0.5,bogus=0.5"]
    elif case == "negative_weight":
        argv = [*avg, "nums=-0.5,words=1.5"]
    elif case == "weights_not_summing":
        argv = [*avg, "nums=0.5,words=0.2"]
    elif case == "malformed_forest_json":
        argv = ["ensemble", _broken_copy(forest, tmp_path, _bad_forest_json), "--domain", "nums"]
    elif case == "mismatched_arch":
        argv = ["ensemble", _broken_copy(forest, tmp_path, _bad_arch), "--domain", "nums"]
    elif case == "model_without_weights":
        model = tmp_path / "model"
        shutil.copytree(forest / "nums", model)
        (model / "model.safetensors").unlink()
        argv = ["eval", model, "--corpus", corpus, "--domains", "nums"]
    else:
        bad = tmp_path / "prior.json"
        bad.write_text(json.dumps({"domain": "nums", "experts": {"nums": 0.5, "ghost": 0.5}}))
        argv = ["ensemble", forest, "--domain", "nums", "--load-prior", bad]
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elmforest: error:"), err
    assert expect in lines[0]
    assert not (tmp_path / "out").exists()
