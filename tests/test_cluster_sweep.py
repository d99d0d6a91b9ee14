"""The c-BTM cluster sweep as arms (`arms.cluster_counts`): for each k, k experts trained on k
clusters of the train documents at 1/k of the dense batch; rows cbtm_k<k>_{cached,router*} scored on
the study's test windows; the router's temperature chosen on validation windows, never test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from elmforest.cbtm.cluster import ClusterModel
from elmforest.cli import main
from elmforest.combine.forest import Forest
from elmforest.combine.scoring import prior_windows, split_windows
from elmforest.data.corpus import Corpus
from elmforest.data.tokenizer import load_tokenizer
from elmforest.data.tokens import token_array
from elmforest.models.factory import load_model
from tinydata import make_corpus, tiny_recipe, write_recipe

COUNTS = [2, 4]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    corpus = make_corpus(root / "corpus", domains=("animals", "code", "numbers", "legal"), docs=160)
    out = root / "run"
    data = tiny_recipe(corpus, out, train_domains=["animals", "code", "legal"])
    data["budget"]["batch_tokens"] = 384  # 12 windows of 32: 4 per domain, 6 / 3 per expert at k = 2 / 4
    data["arms"] = {"random_split": False, "cluster_counts": COUNTS, "dense_multiples": [2]}
    main(["run", str(write_recipe(root / "recipe.yaml", data)), "--no-progress"])
    return root, out, data, json.loads((out / "results.json").read_text())


def _logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits.double()
    return torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None])[..., 0]  # [N, T]


def _forest(out, k):
    f = Forest(out / "cbtm" / f"k{k}" / "forest")
    return f.names, [load_model(f.expert_dir(n)).eval() for n in f.names]


def _routing_texts(tok, corpus, domain, split, windows, context):
    array = token_array(corpus, tok, domain, split)
    tokenizer = load_tokenizer(tok)
    return [tokenizer.decode(array[max(0, s - context): s + 1].tolist()) for s in windows.starts.tolist()]


def _weights(clusterer: ClusterModel, names, texts, temperature, top_k):
    """softmax(-|z - c|^2 / T) over the forest's experts, top-k kept and renormalised: worked out here."""
    z = clusterer.transform(texts)
    c = clusterer.centres[[int(n.removeprefix("cluster")) for n in names]]
    d2 = ((z[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    w = np.exp(-(d2 - d2.min(1, keepdims=True)) / temperature)
    if top_k is not None:
        for row in w:
            row[np.argsort(-row, kind="stable")[top_k:]] = 0.0
    return w / w.sum(1, keepdims=True)


def _mixture_nll(lps, w) -> float:
    """Mean NLL of sum_j w_j p_j over all windows and tokens; lps [n, N, T], w [N, n]."""
    p = sum(torch.tensor(w[:, j])[:, None] * lps[j].exp() for j in range(len(lps)))
    return float(-p.log().mean())


def test_each_k_trains_k_experts_at_one_kth_of_the_batch(sweep):
    root, out, data, results = sweep
    dense_metrics = [json.loads(x) for x in (out / "dense" / "metrics.jsonl").read_text().splitlines()]
    seed = json.loads((out / "seed" / "seed.json").read_text())
    dense_steps = dense_metrics[-1]["step"] - seed["step"]
    for k in COUNTS:
        names, _ = _forest(out, k)
        assert names == [f"cluster{j}" for j in range(k)]
        for n in names:
            job = json.loads((out / "cbtm" / f"k{k}" / "experts" / n / "job.json").read_text())
            assert job["batch_blocks"] * 32 * k == data["budget"]["batch_tokens"]  # 1/k of the dense batch
            assert job["corpus"] == str((out / "cbtm" / f"k{k}" / "corpus").resolve())
            assert job["data"] == {"kind": "domain", "domain": n}
            meta = json.loads((out / "cbtm" / f"k{k}" / "experts" / n / "expert.json").read_text())
            assert meta["tokens"] == dense_steps * data["budget"]["batch_tokens"] // k
        record = json.loads((out / "cbtm" / f"k{k}" / "forest" / "arm.json").read_text())
        assert record["arm"] == f"cbtm_k{k}" and record["compute_matched"] is True
        assert record["tokens"] == results["budget"]["arms"]["dense"]["tokens"]  # seed + k x 1/k = dense's
        # every train document in exactly one cluster
        clustered = Corpus(out / "cbtm" / f"k{k}" / "corpus")
        source = Corpus(data["corpus"])
        assert sum(len(list(clustered.texts(n, "train"))) for n in names) == sum(
            len(list(source.texts(d, "train"))) for d in data["train_domains"])


def test_rows_named_per_k_with_intervals_costs_and_compute_to_match(sweep):
    _, out, _, results = sweep
    model_params = results["dense"]["inference_params"]
    for k in COUNTS:
        expect = {"cached": k, "router_top1": 1, "router": k, **({"router_top2": 2} if k > 2 else {})}
        entry = results["cluster_sweep"]["k"][str(k)]
        assert set(entry["rows"]) == set(expect)
        for inf, run in expect.items():
            row = results[f"cbtm_k{k}_{inf}"]
            lo, hi = row["train_mean_ci"]
            assert lo <= row["train_mean"] <= hi and set(row["novel"]) == {"numbers"}
            assert row["inference_params"] == model_params * run and entry["experts_per_token"][inf] == run
            assert row["train_flops"] == results["budget"]["arms"][f"cbtm_k{k}"]["flops"]
            assert entry["compute_to_match"][inf]["train"]["multiple"] is not None
        assert -1 <= entry["adjusted_rand_index"] <= 1
    report = (out / "report.md").read_text()
    assert "## Number of experts: c-BTM at several cluster counts" in report and "| 4 | router_top2 | 2 |" in report
    assert (out / "plots" / "cluster_sweep.png").stat().st_size > 1000


def test_temperature_is_chosen_on_validation_windows(sweep):
    """router.json's per-temperature NLLs equal the routed mixture's NLL on the train domains'
    validation windows (the cached prior's), worked out here; on the test windows they differ."""
    _, out, data, results = sweep
    corpus, tok, context = Corpus(data["corpus"]), out / "tokenizer", 32
    e = data["eval"]
    k = 4
    names, experts = _forest(out, k)
    clusterer = ClusterModel.load(out / "cbtm" / f"k{k}" / "corpus" / "clusterer")
    router = json.loads((out / "cbtm" / f"k{k}" / "router.json").read_text())

    def pooled(split):
        lps, texts = [], []
        for d in data["train_domains"]:
            if split == "valid":
                w = split_windows(corpus, tok, d, "valid", context, e["prior_sequences"] * context, 0)
                assert torch.equal(w.tokens, prior_windows(corpus, tok, d, context, e["prior_sequences"], 0))
            else:
                w = split_windows(corpus, tok, d, "test", context, e["max_tokens_per_domain"], 0)
            lps.append(torch.stack([_logprobs(m, w.tokens) for m in experts]))
            texts += _routing_texts(tok, corpus, d, split, w, context)
        return torch.cat(lps, 1), texts

    for split in ("valid", "test"):
        lps, texts = pooled(split)
        for suffix, top in (("router_top1", 1), ("router_top2", 2), ("router", None)):
            chosen = router["chosen"][suffix]
            nll = {t: _mixture_nll(lps, _weights(clusterer, names, texts, t, top)) for t in [0.01, 0.03, 0.1, 0.3, 1.0]}
            recorded = {float(t): v for t, v in chosen["valid_nll"].items()}
            if split == "valid":
                assert recorded == pytest.approx(nll, rel=1e-5)
                assert chosen["temperature"] == min(nll, key=nll.get)
            else:
                assert recorded != pytest.approx(nll, rel=1e-5)
    assert results["cluster_sweep"]["k"]["4"]["temperature"] == {s: c["temperature"] for s, c in router["chosen"].items()}


def test_router_rows_equal_the_mixture_worked_out_here(sweep):
    """A router row's NLL on one domain: each test window weighted by its context's distance to the
    centres (weights sum to 1), mixed in probability space, here from the experts and the clusterer."""
    _, out, data, _ = sweep
    corpus, tok, context = Corpus(data["corpus"]), out / "tokenizer", 32
    for k, suffix, top in ((4, "router_top2", 2), (2, "router_top1", 1)):
        names, experts = _forest(out, k)
        clusterer = ClusterModel.load(out / "cbtm" / f"k{k}" / "corpus" / "clusterer")
        t = json.loads((out / "cbtm" / f"k{k}" / "router.json").read_text())["chosen"][suffix]["temperature"]
        for d in ("code", "numbers"):
            w = split_windows(corpus, tok, d, "test", context, data["eval"]["max_tokens_per_domain"], 0)
            weights = _weights(clusterer, names, _routing_texts(tok, corpus, d, "test", w, context), t, top)
            assert np.allclose(weights.sum(1), 1.0) and ((weights > 0).sum(1) <= top).all()
            nll = _mixture_nll(torch.stack([_logprobs(m, w.tokens) for m in experts]), weights)
            scored = json.loads((out / "eval" / f"{d}.json").read_text())["nll"][f"cbtm_k{k}_{suffix}"]
            assert math.isclose(scored, nll, rel_tol=1e-4)


def test_rerun_skips_the_sweep_and_check_passes(sweep, capsys):
    root, out, data, results = sweep
    stamp = {p: p.stat().st_mtime_ns for p in (out / "cbtm").rglob("model.safetensors")}
    clusters = (out / "cbtm" / "k2" / "corpus" / "cluster.json").stat().st_mtime_ns
    main(["run", str(root / "recipe.yaml"), "--no-progress"])
    assert {p: p.stat().st_mtime_ns for p in (out / "cbtm").rglob("model.safetensors")} == stamp
    assert (out / "cbtm" / "k2" / "corpus" / "cluster.json").stat().st_mtime_ns == clusters
    assert json.loads((out / "results.json").read_text())["cbtm_k4_cached"] == results["cbtm_k4_cached"]
    code, stdout, stderr = run_cli(["check", out], capsys)
    assert code == 0, stdout + stderr


@pytest.mark.parametrize("counts, says", [([1, 2], "at least 2"), ([2, 2], "duplicate"), ([5], "multiple of k")])
def test_bad_cluster_counts_are_one_line_errors(tmp_path, capsys, counts, says):
    corpus = make_corpus(tmp_path / "corpus", docs=20)
    data = tiny_recipe(corpus, tmp_path / "run")
    data["arms"] = {"cluster_counts": counts}
    code, _, err = run_cli(["run", write_recipe(tmp_path / "r.yaml", data), "--no-progress"], capsys)
    assert code == 2 and says in err and "cluster_counts" in err and len(err.strip().splitlines()) == 1
