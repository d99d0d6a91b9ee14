"""lm-evaluation-harness on forests (`elmforest.combine.harness`, `elmforest lm-eval`).

The tiny two-expert forest of test_combine_cli (2-layer width-32 GPT-2s, context 32, one on
digit strings, one on words); tasks are YAML files over JSONL files written here (no hub).
Every expected number is computed in the test from the experts' own forward passes.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import test_combine_cli
from cli_runner import run_cli
from elmforest.combine import generate as generate_module
from elmforest.combine.ensemble import Ensemble
from elmforest.combine.logprobs import expert_logprobs
from elmforest.combine.prior import updating_logprobs
from elmforest.combine.evaluate import eval_windows
from elmforest.combine.forest import Forest
from elmforest.combine.harness import ElmforestLM, local_task_yaml
from elmforest.data.tokenizer import load_tokenizer
from elmforest.models.factory import load_model

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

built = test_combine_cli.built  # the session's tiny forest: (root, corpus, forest)
CONTEXT = test_combine_cli.CONTEXT

PAIRS = [  # (context, continuation): digits and words, each continuation a few tokens
    ("12 7 45 3", " 88 9"),
    ("the cat sat on", " a mat"),
    ("dog ran far", " 4 5"),
    ("3 14 15 92", " then came back"),
    ("home and then", " came"),
]


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def one_expert_forest(built, tmp_path_factory):
    """A forest holding only the `nums` expert of the two-expert forest."""
    root, _corpus, forest = built
    two = Forest(forest)
    meta = two.expert_meta("nums")
    one = Forest.create(tmp_path_factory.mktemp("one") / "forest", two.tokenizer_dir, meta["tokenizer_hash"], meta["arch_hash"])
    one.merge(two.expert_dir("nums"))
    return one.path


def _experts(forest) -> tuple[list, object]:
    f = Forest(forest)
    return [load_model(f.expert_dir(n)).eval() for n in f.names], load_tokenizer(f.tokenizer_dir)


def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:t]) for t = 1..len-1 -> [len-1, V] (a plain forward pass, float64)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def _split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n = len(tok.encode(context, add_special_tokens=False))
    return whole[:n], whole[n:]


# --- one expert = lm-eval's hf model on that expert's folder --------------------------------


def _write_tasks(folder, long_text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    mc = folder / "mc.jsonl"
    rows = [{"context": "5 17 42", "choices": ["8 13", "the cat", "home"], "label": 0},
            {"context": "the dog ran", "choices": ["4", "away from home", "far"], "label": 1},
            {"context": "came back and", "choices": ["99 1", "then the", "sat on a mat"], "label": 2}]
    mc.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ppl = folder / "ppl.jsonl"
    ppl.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "the cat sat on a mat 7 8"}) + "\n", encoding="utf-8")
    (folder / "tiny_mc.yaml").write_text(local_task_yaml("tiny_mc", mc, "multiple_choice", ["acc"]), encoding="utf-8")
    (folder / "tiny_ppl.yaml").write_text(local_task_yaml("tiny_ppl", ppl, "loglikelihood_rolling", ["word_perplexity"]),
                                          encoding="utf-8")


def _samples(out_dir, task: str) -> list[dict]:
    [path] = list(out_dir.rglob(f"samples_{task}_*.jsonl"))
    return sorted((json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()), key=lambda s: s["doc_id"])


LONG = " ".join(["12 7 45 3 the cat sat on a mat while dog ran far away 88 9 60"] * 6)


def test_one_expert_forest_gives_the_hf_models_loglikelihoods(built, one_expert_forest, tmp_path, capsys):
    """`elmforest lm-eval` on a one-expert forest == lm-eval's `hf` model on that expert's folder,
    sample by sample (multiple choice and rolling), through task YAMLs over local JSONL files."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _write_tasks(tmp_path / "tasks", LONG)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["lm-eval", one_expert_forest, "--tasks", "tiny_mc,tiny_ppl", "--include_path",
                                 tmp_path / "tasks", "--output_path", out, "--log_samples", "--batch_size", "2",
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    [results_file] = list(out.rglob("results_*.json"))
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "elmforest"
    assert results["config"]["elmforest_members"] == ["nums"]

    expert = Forest(one_expert_forest).expert_dir("nums")
    hf = simple_evaluate(model="hf", model_args={"pretrained": str(expert), "dtype": "float32"}, tasks=["tiny_mc", "tiny_ppl"],
                         device="cpu", batch_size=1, log_samples=True,
                         task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    for task in ("tiny_mc", "tiny_ppl"):
        ours = _samples(out, task)
        theirs = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        assert len(ours) == len(theirs) == (3 if task == "tiny_mc" else 2)
        for a, b in zip(ours, theirs):
            ll_a = [float(r[0][0]) if task == "tiny_mc" else float(r[0]) for r in a["resps"]]
            ll_b = [float(r[0][0]) if task == "tiny_mc" else float(r[0]) for r in b["resps"]]
            # per request to 1e-5; a rolling document's total sums ~200 float32 terms in `hf`: 1e-7 relative
            assert ll_a == pytest.approx(ll_b, abs=1e-5, rel=1e-7)
            if task == "tiny_mc":
                assert [r[0][1] for r in a["resps"]] == [str(r[0][1]) if isinstance(r[0][1], bool) else r[0][1] for r in b["resps"]]
    assert results["results"]["tiny_mc"]["acc,none"] == hf["results"]["tiny_mc"]["acc,none"]
    assert results["results"]["tiny_ppl"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["tiny_ppl"]["word_perplexity,none"], rel=1e-5)


# --- two experts: the mixture, computed here ------------------------------------------------


def test_uniform_prior_is_the_equal_mixture(built):
    _root, _corpus, forest = built
    models, tok = _experts(forest)
    lm = ElmforestLM(pretrained=str(forest), prior="uniform", batch_size=3, device="cpu")
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    for (context, continuation), (ll, greedy) in zip(PAIRS, got):
        ctx, cont = _split(tok, context, continuation)
        ids = ctx + cont
        p = [_full_logprobs(m, ids).exp() for m in models]  # [len-1, V] each
        mix = (0.5 * p[0] + 0.5 * p[1]).log()[len(ctx) - 1 :]  # rows predicting the continuation
        want = float(mix.gather(-1, torch.tensor(cont)[:, None]).sum())
        assert ll == pytest.approx(want, abs=1e-5)
        assert greedy == bool((mix.argmax(-1) == torch.tensor(cont)).all())


def test_flat_prior_with_the_full_prefix_posterior(built):
    """w_j(t) ∝ prod_{s<t} p_j(x_s | x_<s) from a 1/2-1/2 prior, fresh for every request."""
    _root, _corpus, forest = built
    models, tok = _experts(forest)
    lm = ElmforestLM(pretrained=str(forest), prior="flat", posterior="full_prefix", batch_size=2, device="cpu")
    for _ in range(2):  # a flat prior does not move between calls
        got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
        for (context, continuation), (ll, _greedy) in zip(PAIRS, got):
            ctx, cont = _split(tok, context, continuation)
            ids = ctx + cont
            full = [_full_logprobs(m, ids) for m in models]
            want = 0.0
            for t in range(len(ctx), len(ids)):
                evidence = torch.tensor([sum(float(full[j][s - 1, ids[s]]) for s in range(1, t)) for j in range(2)])
                w = torch.softmax(evidence, dim=0)  # the flat prior cancels
                want += math.log(float(sum(w[j] * full[j][t - 1, ids[t]].exp() for j in range(2))))
            assert ll == pytest.approx(want, abs=1e-5)


def test_cached_prior_with_the_one_step_posterior(built):
    """w_j(t) ∝ prior_j p_j(x_{t-1} | x_<t-1) (the prior alone at the first predicted token),
    p(x_t) = sum_j w_j(t) p_j(x_t | x_<t), over the whole sequence read, summed over the continuation."""
    _root, _corpus, forest = built
    models, tok = _experts(forest)
    lm = ElmforestLM(pretrained=str(forest), prior="cached:nums", posterior="one_step", batch_size=2, device="cpu")
    prior = lm.target.prior
    assert lm.target.names == ["nums", "words"] and prior[0] > 0.8  # the digits expert leads on digits
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    for (context, continuation), (ll, greedy) in zip(PAIRS, got):
        ctx, cont = _split(tok, context, continuation)
        ids = ctx + cont
        full = [_full_logprobs(m, ids) for m in models]  # [n, V]: row t-1 predicts ids[t]
        want, all_greedy = 0.0, True
        for t in range(1, len(ids)):
            if t == 1:
                w = prior.clone()
            else:
                w = torch.stack([prior[j] * full[j][t - 2, ids[t - 1]].exp() for j in range(2)])
                w = w / w.sum()
            dist = sum(w[j] * full[j][t - 1].exp() for j in range(2))  # [V]
            if t >= len(ctx):
                want += math.log(float(dist[ids[t]]))
                all_greedy &= int(dist.argmax()) == ids[t]
        assert ll == pytest.approx(want, abs=1e-5)
        assert greedy == all_greedy
    # single-token continuations equal to the mixture's argmax are greedy
    ctx = tok.encode("12 7 45 3", add_special_tokens=False)
    full = [_full_logprobs(m, ctx + [0]) for m in models]
    w = torch.stack([prior[j] * full[j][-2, ctx[-1]].exp() for j in range(2)])
    best = int(sum((w[j] / w.sum()) * full[j][-1].exp() for j in range(2)).argmax())
    [(ll, greedy)] = lm._loglikelihood_tokens([(None, ctx, [best])])
    assert greedy is True


def test_a_saved_prior_with_top_k_runs_only_its_best_expert(built, tmp_path):
    """load_prior + top_k 1: only `words` loads and runs, so the mixture is that expert alone:
    the same numbers as the `words` expert folder as a target."""
    _root, _corpus, forest = built
    saved = tmp_path / "prior.json"
    saved.write_text(json.dumps({"domain": "words", "experts": {"nums": 0.25, "words": 0.75}, "posterior": "one_step"}))
    top1 = ElmforestLM(pretrained=str(forest), load_prior=str(saved), top_k=1, device="cpu")
    assert top1.target.names == ["words"] and len(top1.target.models) == 1
    single = ElmforestLM(pretrained=str(Forest(forest).expert_dir("words")), device="cpu")
    assert single.target.kind == "model"
    reqs = _requests("loglikelihood", PAIRS)
    assert top1.loglikelihood(reqs) == single.loglikelihood(reqs)
    both = ElmforestLM(pretrained=str(forest), load_prior=str(saved), device="cpu")
    assert both.target.prior.tolist() == pytest.approx([0.25, 0.75])
    assert [ll for ll, _ in both.loglikelihood(reqs)] != [ll for ll, _ in single.loglikelihood(reqs)]


def test_updating_prior_equals_the_studys_updating_walk(built):
    """Equal-length sequences scored in order: the moving average over groups of 4 sequences
    is `prior.updating_logprobs` on the same windows (the study's `--prior updating`)."""
    root, corpus, forest = built
    models, tok = _experts(forest)
    text = " ".join(test_combine_cli._docs("nums", 6, random.Random(5)) +
                    test_combine_cli._docs("words", 6, random.Random(6)))
    windows = eval_windows(tok.encode(text, add_special_tokens=False), CONTEXT)[:10]  # [10, 33]
    lm = ElmforestLM(pretrained=str(forest), prior="updating", batch_size=3, device="cpu")
    assert lm.target.prior_batch == 4 and lm.target.alpha == 0.3
    got = lm._loglikelihood_tokens([(None, w[:1].tolist(), w[1:].tolist()) for w in windows])
    table = expert_logprobs(models, windows)  # [2, 10, 32]: the one log-prob path
    want = updating_logprobs(table, batch_size=4, alpha=0.3, posterior="one_step").double().sum(dim=1)
    assert [ll for ll, _ in got] == pytest.approx(want.tolist(), abs=1e-4)
    # the walk moved: the prior after 10 windows (3 groups, 2 closed) is not uniform any more
    assert abs(float(lm.walk.prior[0]) - 0.5) > 0.01


def test_rolling_loglikelihood_is_the_studys_window_grid(built):
    """`loglikelihood_rolling` on a long text == the study's scoring of [EOS] + text: the window
    grid of `evaluate.eval_windows` (context + 1 tokens, stride context, each token predicted once,
    the posterior restarting per window) scored by `Ensemble`, plus the tail the grid drops scored
    in the window of the last context + 1 tokens (only its not yet predicted tokens)."""
    _root, _corpus, forest = built
    models, tok = _experts(forest)
    lm = ElmforestLM(pretrained=str(forest), prior="cached:words", batch_size=4, device="cpu")
    ens = Ensemble(models, lm.target.prior, "one_step")
    for text in (LONG, LONG + " 5 the end", "the cat 7"):
        array = [tok.eos_token_id] + tok.encode(text, add_special_tokens=False)
        assert len(array) > 3 * CONTEXT or text == "the cat 7"
        want = 0.0
        grid = (len(array) - 1) // CONTEXT
        if grid:
            want += float(ens.logprobs(eval_windows(array, CONTEXT)).double().sum())
        tail = len(array) - 1 - grid * CONTEXT
        if tail:
            last = torch.tensor([array[-(CONTEXT + 1) :]]) if grid else torch.tensor([array])
            want += float(ens.logprobs(last)[0, -tail:].double().sum())
        [got] = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
        assert got == pytest.approx(want, abs=1e-4)


# --- generation -----------------------------------------------------------------------------


def test_generate_until_stops_at_its_until_string(built, monkeypatch):
    _root, _corpus, forest = built
    models, tok = _experts(forest)
    lm = ElmforestLM(pretrained=str(forest), prior="uniform", device="cpu")
    prompt = "the cat sat on"
    ids = tok.encode(prompt, add_special_tokens=False)
    full = generate_module.generate(models, None, ids, 20, greedy=True, posterior="uniform")  # no stop, no EOS
    pieces = [tok.decode(full[:n], skip_special_tokens=True) for n in range(len(full) + 1)]
    until = tok.decode(full[3:4])  # the 4th generated token's text
    stop_at = next(n for n in range(1, len(full) + 1) if until in pieces[n])  # where the text first holds it
    lengths = []
    real = generate_module.generate

    def spy(*args, **kwargs):
        new = real(*args, **kwargs)
        lengths.append(len(new))
        return new

    monkeypatch.setattr(generate_module, "generate", spy)
    [text, capped] = lm.generate_until(_requests("generate_until", [
        (prompt, {"until": [until], "max_gen_toks": 20}),
        (prompt, {"until": ["never appears"], "max_gen_toks": 5}),
    ]))
    assert lengths == [stop_at, 5]  # generation itself stopped, not just the text
    assert text == pieces[len(full)].split(until)[0] and until not in text
    assert capped == pieces[5]


def test_lm_eval_refuses_bad_targets_and_priors_in_one_line(built, tmp_path, capsys):
    _root, _corpus, forest = built
    _write_tasks(tmp_path / "tasks", LONG)
    base = ["--tasks", "tiny_mc", "--include_path", tmp_path / "tasks", "--device", "cpu"]
    for argv, words in (
        (["lm-eval", tmp_path, *base], "neither a forest"),
        (["lm-eval", forest, "--prior", "cached", *base], "cached:DOMAIN"),
        (["lm-eval", forest, "--prior", "uniform", "--top-k", "1", *base], "top_k needs a cached prior"),
        (["lm-eval", forest, "--prior", "cached:nums", "--load-prior", tmp_path / "p.json", *base], "drop prior"),
        (["lm-eval", Forest(forest).expert_dir("nums"), "--prior", "cached:nums", *base], "for forests"),
    ):
        code, _out, err = run_cli(argv, capsys)
        assert code == 2 and words in err, err
        assert len(err.strip().splitlines()) == 1


def test_without_lm_eval_the_command_says_how_to_install_it(built, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, _out, err = run_cli(["lm-eval", built[2], "--tasks", "tiny_mc"], capsys)
    assert code == 2 and "pip install 'elmforest[lm-eval]'" in err and len(err.strip().splitlines()) == 1
