"""Parameter averaging: the method registry, validation, and the streaming folder driver."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from elmforest.combine.averaging import (
    AVERAGING_METHODS,
    AverageOptions,
    average_folders,
    average_state_dicts,
    make_plan,
)
from elmforest.errors import ElmError
from elmforest.combine.evaluate import token_logprobs

VOCAB = 64
METHODS_WITH_WEIGHTS = {"argmax", "posterior", "weighted"}
SEEDED = {"task_arithmetic", "ties"}


def tiny_model(seed: int, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0, initializer_range=0.2,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Three experts and a seed saved with save_pretrained (safetensors, tied embeddings)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("forest")
    paths = {}
    for name, seed in (("seed", 0), ("news", 1), ("code", 2), ("legal", 3)):
        tiny_model(seed).save_pretrained(root / name)
        paths[name] = root / name
    (root / "news" / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    return paths


def files(folders, names):
    return [load_file(folders[n] / "model.safetensors") for n in names]


def args_for(method, n):
    """Weights for n experts if the method takes any, else None."""
    if method not in METHODS_WITH_WEIGHTS:
        return None
    return [0.5, 0.3, 0.2] if n == 3 else [1.0 / n] * n


def test_registry_has_the_methods():
    assert set(AVERAGING_METHODS) == {"uniform", "argmax", "posterior", "weighted", "task_arithmetic", "ties"}


@pytest.mark.parametrize("method", ["uniform", "weighted", "posterior", "argmax"])
def test_one_expert_is_unchanged(folders, method, tmp_path):
    (sd,) = files(folders, ["news"])
    out = average_state_dicts([sd], args_for(method, 1), method)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    folder = average_folders([folders["news"]], args_for(method, 1), method, tmp_path / "avg")
    on_disk = load_file(folder / "model.safetensors")
    assert all(torch.equal(on_disk[k], sd[k]) for k in sd)


def test_uniform_of_two_is_mean(folders):
    a, b = files(folders, ["news", "code"])
    out = average_state_dicts([a, b], None, "uniform")
    for k in a:
        torch.testing.assert_close(out[k], (a[k] + b[k]) / 2, atol=1e-7, rtol=0)
        assert out[k].dtype == a[k].dtype


def test_weighted_and_argmax_arithmetic(folders):
    a, b, c = files(folders, ["news", "code", "legal"])
    out = average_state_dicts([a, b, c], [0.5, 0.3, 0.2], "weighted")
    k = "transformer.h.0.mlp.c_fc.weight"
    torch.testing.assert_close(out[k], 0.5 * a[k] + 0.3 * b[k] + 0.2 * c[k], atol=1e-6, rtol=0)
    picked = average_state_dicts([a, b, c], [0.2, 0.5, 0.3], "argmax")
    assert all(torch.equal(picked[k], b[k]) for k in b)
    assert make_plan("argmax", ["a", "b", "c"], [0.2, 0.5, 0.3], AverageOptions(), False).use == (1,)


def test_posterior_average_is_the_weighted_mean_by_hand(folders, tmp_path):
    """Every tensor of a posterior average is sum_i w_i theta_i (not the uniform mean), in memory and on disk."""
    names = ["news", "code", "legal"]
    a, b, c = files(folders, names)
    w = [0.7, 0.2, 0.1]
    out = average_state_dicts([a, b, c], w, "posterior", names=names)
    written = average_folders([folders[n] for n in names], dict(zip(names, w)), "posterior", tmp_path / "avg")
    from safetensors.torch import load_file

    on_disk = load_file(written / "model.safetensors")
    for k in a:
        want = 0.7 * a[k].double() + 0.2 * b[k].double() + 0.1 * c[k].double()
        torch.testing.assert_close(out[k].double(), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(on_disk[k].double(), want, atol=1e-6, rtol=0)
    k = "transformer.h.0.mlp.c_fc.weight"
    assert not torch.allclose(out[k], (a[k] + b[k] + c[k]) / 3, atol=1e-4)  # the weights matter here


def test_task_arithmetic(folders):
    s, a, b = files(folders, ["seed", "news", "code"])
    default = average_state_dicts([a, b], None, "task_arithmetic", seed=s)
    uniform = average_state_dicts([a, b], None, "uniform")
    for k in a:  # scale 1/n: the seed cancels and this is the uniform average
        torch.testing.assert_close(default[k], uniform[k], atol=1e-6, rtol=0)
    full = average_state_dicts([a, b], None, "task_arithmetic", seed=s, options=AverageOptions(scale=1.0))
    for k in a:
        torch.testing.assert_close(full[k], a[k] + b[k] - s[k], atol=1e-6, rtol=0)


def test_ties_by_hand():
    seed = {"w": torch.zeros(4)}
    e1 = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}
    e2 = {"w": torch.tensor([-2.0, -1.0, 0.1, 4.0])}
    # density 0.5 keeps 2 of 4 entries: e1 -> [3, 0, 0, 2], e2 -> [-2, 0, 0, 4]
    # elected signs: sum [1, 0, 0, 6] -> [+, 0, 0, +]; disjoint means: [3, 0, 0, (2+4)/2]
    out = average_state_dicts([e1, e2], None, "ties", seed=seed, options=AverageOptions(density=0.5))
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 0.0, 0.0, 3.0]))
    shifted = average_state_dicts(
        [{"w": e1["w"] + 1}, {"w": e2["w"] + 1}], None, "ties", seed={"w": torch.ones(4)},
        options=AverageOptions(density=0.5, scale=0.5),
    )
    torch.testing.assert_close(shifted["w"], torch.tensor([2.5, 1.0, 1.0, 2.5]))


@pytest.mark.parametrize("method", sorted(AVERAGING_METHODS))
def test_order_invariance(folders, method):
    s, a, b, c = files(folders, ["seed", "news", "code", "legal"])
    weights = [0.5, 0.3, 0.2] if method in {"posterior", "weighted"} else ([0.2, 0.5, 0.3] if method == "argmax" else None)
    seed = s if method in SEEDED else None
    one = average_state_dicts([a, b, c], weights, method, seed=seed)
    perm = [2, 0, 1]
    two = average_state_dicts([[a, b, c][i] for i in perm], [weights[i] for i in perm] if weights else None, method, seed=seed)
    for k in a:
        torch.testing.assert_close(one[k], two[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", sorted(AVERAGING_METHODS))
def test_streaming_matches_in_memory(folders, method, tmp_path):
    names = ["news", "code", "legal"]
    weights = args_for(method, 3)
    seed_dir = folders["seed"] if method in SEEDED else None
    out = average_folders([folders[n] for n in names], weights, method, tmp_path / "avg", seed_dir=seed_dir)
    on_disk = load_file(out / "model.safetensors")
    in_memory = average_state_dicts(files(folders, names), weights, method, seed=load_file(folders["seed"] / "model.safetensors") if seed_dir else None)
    assert set(on_disk) == set(in_memory)
    for k in in_memory:
        assert torch.equal(on_disk[k], in_memory[k]), k
    record = json.loads((out / "average.json").read_text())
    assert record["method"] == method and record["experts"] == names
    assert record["weights"] == (None if method in SEEDED else pytest.approx(make_plan(method, names, weights, AverageOptions(), True).weights))


def test_output_loads_and_scores_like_in_memory_average(folders, tmp_path):
    names = ["news", "code", "legal"]
    weights = {"news": 0.6, "legal": 0.4}  # a mapping: "code" gets weight 0
    out = average_folders([folders[n] for n in names], weights, "posterior", tmp_path / "avg")
    assert (out / "config.json").read_text() == (folders["news"] / "config.json").read_text()
    assert (out / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    assert json.loads((out / "average.json").read_text())["weights"] == [0.6, 0.0, 0.4]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()

    experts = [AutoModelForCausalLM.from_pretrained(folders[n]) for n in names]
    merged_sd = average_state_dicts([m.state_dict() for m in experts], [0.6, 0.0, 0.4], "posterior", names=names)
    reference = tiny_model(99)
    reference.load_state_dict(merged_sd)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(token_logprobs(loaded, tokens), token_logprobs(reference.eval(), tokens), atol=1e-6, rtol=0)
    # and it is a new model, not one of the experts
    assert (token_logprobs(loaded, tokens) - token_logprobs(experts[0], tokens)).abs().max() > 1e-3


def test_weight_validation(folders, tmp_path):
    sds = files(folders, ["news", "code"])
    with pytest.raises(ElmError, match="negative"):
        average_state_dicts(sds, [1.2, -0.2], "weighted")
    with pytest.raises(ElmError, match=r"sum to 0\.9.*normalise=True"):
        average_state_dicts(sds, [0.6, 0.3], "weighted")
    rescaled = average_state_dicts(sds, [0.6, 0.3], "weighted", options=AverageOptions(normalise=True))
    exact = average_state_dicts(sds, [2 / 3, 1 / 3], "weighted")
    k = "transformer.wte.weight"
    torch.testing.assert_close(rescaled[k], exact[k])
    with pytest.raises(ElmError, match="2 weights for 3 experts"):
        average_state_dicts(files(folders, ["news", "code", "legal"]), [0.5, 0.5], "posterior")
    with pytest.raises(ElmError, match="unknown expert name.*'medical'"):
        average_folders([folders["news"], folders["code"]], {"news": 0.5, "medical": 0.5}, "posterior", tmp_path / "a")
    with pytest.raises(ElmError, match="takes no weights"):
        average_state_dicts(sds, [0.5, 0.5], "uniform")
    with pytest.raises(ElmError, match="needs weights"):
        average_state_dicts(sds, None, "posterior")
    with pytest.raises(ElmError, match="unknown averaging method 'mean'"):
        average_state_dicts(sds, None, "mean")
    with pytest.raises(ElmError, match="needs the seed"):
        average_state_dicts(sds, None, "ties")
    with pytest.raises(ElmError, match="density"):
        average_state_dicts(sds, None, "ties", seed=sds[0], options=AverageOptions(density=0.0))
    assert not (tmp_path / "a").exists()


def test_mismatched_tensors_are_named(folders, tmp_path):
    a, b = files(folders, ["news", "code"])
    b_missing = {k: v for k, v in b.items() if k != "transformer.h.1.ln_2.bias"}
    with pytest.raises(ElmError, match=r"'transformer\.h\.1\.ln_2\.bias'.*missing from expert1"):
        average_state_dicts([a, b_missing], None, "uniform")
    b_shape = dict(b, **{"transformer.wpe.weight": torch.zeros(16, 32)})
    with pytest.raises(ElmError, match=r"'transformer\.wpe\.weight' has shape \(32, 32\).*\(16, 32\)"):
        average_state_dicts([a, b_shape], None, "uniform")
    wide = tmp_path / "wide"
    tiny_model(5, n_embd=64).save_pretrained(wide)
    with pytest.raises(ElmError, match=r"tensor 'transformer\.\S+' has shape"):
        average_folders([folders["news"], wide], None, "uniform", tmp_path / "out")
    with pytest.raises(ElmError, match="already exists"):
        average_folders([folders["news"]], None, "uniform", folders["code"])
    with pytest.raises(ElmError, match="no model.safetensors"):
        average_folders([tmp_path], None, "uniform", tmp_path / "out2")
