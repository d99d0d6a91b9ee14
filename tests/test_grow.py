"""Growing a forest: prior-weighted branching, rounds that resume, removal, the c-BTM router."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from elmforest.combine.averaging import average_state_dicts
from elmforest.study.recipe import recipe_from_dict
from elmforest.data.corpus import DomainSource, write_corpus
from elmforest.errors import ElmError
from elmforest.combine.forest import Forest

WORDS = {
    "fruit": "apple banana cherry grape lemon mango melon orange papaya peach pear plum kiwi lime fig".split(),
    "motor": "engine piston gearbox clutch camshaft radiator exhaust turbo valve spark cylinder axle brake".split(),
    "ocean": "whale coral reef tide wave kelp shark dolphin current lagoon harbour anchor sailor".split(),
    "space": "planet comet orbit rocket galaxy nebula asteroid lunar solar quasar pulsar crater".split(),
    "music": "guitar violin melody chord rhythm tempo piano drum choir opera sonata flute".split(),
}


def documents(vocab: list[str], n: int, seed: int) -> list[str]:
    """n documents of 20-40 words from one vocabulary, with a repeated word order (learnable bigrams)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        start = int(rng.integers(len(vocab)))
        length = int(rng.integers(20, 41))
        # mostly the next word of the vocabulary list, sometimes a random one
        words = [vocab[(start + i) % len(vocab)] if rng.random() < 0.7 else str(rng.choice(vocab)) for i in range(length)]
        docs.append(" ".join(words) + ".")
    return docs


def tiny_recipe(corpus, out, **extra) -> dict:
    data = {
        "corpus": str(corpus),
        "train_domains": ["fruit", "motor", "ocean", "space"],
        "novel_domains": ["music"],
        "rounds": [{"domains": ["fruit", "motor", "ocean"]}, {"domains": ["space"]}],
        "tokenizer": {"vocab_size": 300, "sample_bytes_per_domain": 200_000},
        "model": {"size": "tiny", "context": 32},
        # B = 384 = 32 x 12: 4 windows per round-1 domain, 3 per domain in round 2's dense run
        "budget": {"total_tokens": 384 * 40, "seed_fraction": 0.5, "batch_tokens": 384},
        "optim": {"lr": 3e-3, "threads": 1, "log_every": 10, "checkpoint_every": 10, "warmup_fraction": 0.05},
        "eval": {"max_tokens_per_domain": 1200, "prior_sequences": 8, "prior_batch": 4, "batch_size": 8,
                 "valid_windows_per_domain": 4},
        "launcher": {"kind": "sequential", "threads_per_worker": 1, "retries": 0},
        "arms": {"dense": True, "random_split": False},
        "out": str(out),
    }
    data.update(extra)
    return data


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("grow") / "corpus"
    write_corpus(path, [DomainSource(d, documents(v, 500, i)) for i, (d, v) in enumerate(WORDS.items())])
    return path


@pytest.fixture(scope="module")
def round1(corpus, tmp_path_factory):
    """A rounds study stopped after round 1 (the 'interrupted' run)."""
    from elmforest.study.rounds import run_rounds

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("grow") / "run"
    recipe = recipe_from_dict(tiny_recipe(corpus, out))
    results = run_rounds(recipe, out, progress=False, log=lambda s: None, max_rounds=1)
    return recipe, out, results


def test_round1_is_a_forest_of_round1_domains(round1):
    recipe, out, results = round1
    assert [b["round"] for b in results["rounds"]] == [1]
    forest = Forest(out / "rounds" / "1" / "forest")
    assert forest.names == ["fruit", "motor", "ocean"]
    block = results["rounds"][0]
    # round 1 is compute-matched: seed + 3 experts at B/3 = the dense run's tokens
    assert block["compute"]["forest"]["tokens"] == block["compute"]["dense"]["tokens"] == 384 * 40
    assert set(block["methods"]["dense"]["train"]) == {"fruit", "motor", "ocean"}
    assert set(block["methods"]["forest_ensemble_cached"]["novel"]) == {"music"}


def test_grown_expert_starts_at_prior_weighted_average(round1, tmp_path):
    from elmforest.btm.growth import branch_grown_expert, choose_parents, expert_recipe, grow_expert

    recipe, out, _ = round1
    forest_dir = tmp_path / "forest"
    shutil.copytree(out / "rounds" / "1" / "forest", forest_dir)
    expert_dir = tmp_path / "space"
    branch_grown_expert(expert_recipe(recipe), out, forest_dir, "space", expert_dir, top_k=2, init="mixture")
    grow = json.loads((expert_dir / "grow.json").read_text())
    prior = grow["prior"]
    assert set(prior) == {"fruit", "motor", "ocean"}
    assert sum(prior.values()) == pytest.approx(1.0)
    top2 = sorted(prior, key=lambda n: -prior[n])[:2]
    weights = [prior[n] / (prior[top2[0]] + prior[top2[1]]) for n in top2]
    assert grow["parents"] == [{"name": n, "weight": pytest.approx(w)} for n, w in zip(top2, weights)]
    assert choose_parents(prior, 2, "nearest") == [{"name": top2[0], "weight": 1.0}]

    # the branched weights, before training, tensor by tensor
    forest = Forest(forest_dir)
    states = [load_file(str(forest.expert_dir(n) / "model.safetensors")) for n in top2]
    expected = average_state_dicts(states, weights, "weighted")
    got = load_file(str(expert_dir / "model.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    job = json.loads((expert_dir / "job.json").read_text())
    assert job["start_step"] == 0 and job["init_state"] is None  # fresh AdamW, own schedule
    assert job["spec"]["total_steps"] == 20  # total_steps - seed_steps of a round-1 expert

    meta = grow_expert(recipe, out, forest_dir, "space", top_k=2, init="mixture", expert_dir=expert_dir,
                       log=lambda s: None)
    assert meta["parents"] == grow["parents"]
    assert meta["steps"] == 20
    round1_meta = forest.expert_meta("fruit")
    assert meta["tokens"] == round1_meta["tokens"]  # the same budget as a round-1 expert
    assert Forest(forest_dir).names == ["fruit", "motor", "ocean", "space"]
    stored = json.loads((forest_dir / "space" / "expert.json").read_text())
    assert [p["name"] for p in stored["parents"]] == top2

    with pytest.raises(ElmError, match="already has an expert"):
        branch_grown_expert(expert_recipe(recipe), out, forest_dir, "space", tmp_path / "again")


def test_seed_init_copies_the_seed(round1, tmp_path):
    from elmforest.btm.growth import branch_grown_expert, expert_recipe

    recipe, out, _ = round1
    expert_dir = tmp_path / "space_seed"
    branch_grown_expert(expert_recipe(recipe), out, out / "rounds" / "1" / "forest", "space", expert_dir, init="seed")
    seed = load_file(str(out / "seed" / "model.safetensors"))
    got = load_file(str(expert_dir / "model.safetensors"))
    assert all(torch.equal(seed[k], got[k]) for k in seed)
    job = json.loads((expert_dir / "job.json").read_text())
    assert job["parents"] == "seed" and job["start_step"] == 0 and job["init_state"] is None


def test_removal_raises_the_removed_domains_perplexity(round1):
    from elmforest.study.removal import removal_study, removal_table

    recipe, out, _ = round1
    forest_dir = out / "rounds" / "1" / "forest"
    result = removal_study(recipe, out, "motor", forest_dir=forest_dir, log=lambda s: None)
    before, after = result["ppl"]["before"], result["ppl"]["after"]
    assert set(before) == {"motor", "fruit", "ocean", "music"}
    rise = math.log(after["motor"] / before["motor"])
    assert rise > 0.05
    for kept in ("fruit", "ocean"):
        assert abs(math.log(after[kept] / before[kept])) < rise  # the others barely move
    assert Forest(forest_dir).names == ["fruit", "motor", "ocean"]  # the original is untouched
    assert json.loads((out / "forget_motor.json").read_text())["removed"] == "motor"
    assert "removed" in removal_table(result)


def test_rounds_resume_without_retraining(round1):
    from elmforest.study.rounds import run_rounds

    recipe, out, _ = round1
    r1 = {d: (out / "experts" / d / "expert.json") for d in ("fruit", "motor", "ocean")}
    before = {d: (p.stat().st_mtime_ns, p.read_text()) for d, p in r1.items()}
    seed_before = (out / "seed" / "seed.json").stat().st_mtime_ns
    results = run_rounds(recipe, out, progress=False, log=lambda s: None)
    assert {d: (p.stat().st_mtime_ns, p.read_text()) for d, p in r1.items()} == before
    assert (out / "seed" / "seed.json").stat().st_mtime_ns == seed_before
    assert [b["round"] for b in results["rounds"]] == [1, 2]
    r2 = results["rounds"][1]
    assert Forest(out / "rounds" / "2" / "forest").names == ["fruit", "motor", "ocean", "space"]
    assert Forest(out / "rounds" / "2" / "forest_seedinit").names == ["fruit", "motor", "ocean", "space"]
    assert isinstance(r2["parents"]["space"], list) and len(r2["parents"]["space"]) == 2
    seed_copy = json.loads((out / "experts_seedinit" / "space" / "expert.json").read_text())
    assert seed_copy["parents"] == "seed"
    # compute: round 2 adds one round-1 expert's tokens; both forests cost the same; dense matches
    c1, c2 = results["rounds"][0]["compute"], r2["compute"]
    expert_tokens = json.loads((out / "experts" / "fruit" / "expert.json").read_text())["tokens"]
    assert c2["forest"]["tokens"] == c1["forest"]["tokens"] + expert_tokens
    assert c2["forest_seedinit"]["flops"] == c2["forest"]["flops"]
    assert c2["forest"]["tokens"] - 384 < c2["dense"]["tokens"] <= c2["forest"]["tokens"]
    assert set(r2["methods"]["dense"]["train"]) == {"fruit", "motor", "ocean", "space"}
    for m in ("forest_ensemble_cached", "forest_average_posterior", "forest_seedinit_ensemble_cached", "dense"):
        assert math.isfinite(r2["methods"][m]["train_mean"]) and math.isfinite(r2["methods"][m]["novel_mean"])
    report = (out / "report.md").read_text()
    assert "Round 2" in report and "forest_seedinit_ensemble_cached" in report
    # a third call does nothing new: every round is done
    mtime = (out / "rounds" / "2" / "round.json").stat().st_mtime_ns
    run_rounds(recipe, out, progress=False, log=lambda s: None)
    assert (out / "rounds" / "2" / "round.json").stat().st_mtime_ns == mtime


def test_cluster_router_ensemble(corpus, tmp_path):
    from elmforest.cbtm.cluster import ClusterModel, cluster_corpus
    from elmforest.cbtm.cluster_router import ClusterRouter
    from elmforest.data.corpus import Corpus
    from elmforest.study.compare import router_row, router_weights
    from elmforest.study.run import run_study

    torch.set_num_threads(1)
    clustered = tmp_path / "clusters"
    summary = cluster_corpus(Corpus(corpus), ["fruit", "motor", "ocean"], 3, clustered, seed=0, carry=["music"])
    assert summary["carried"] == ["music"]
    assert summary["adjusted_rand_index"] > 0.9  # disjoint vocabularies: clusters = domains
    assert Corpus(clustered).domains == ["cluster0", "cluster1", "cluster2", "music"]
    data = tiny_recipe(clustered, tmp_path / "run", rounds=[], train_domains=["cluster0", "cluster1", "cluster2"])
    data["budget"]["batch_tokens"] = 192
    data["budget"]["total_tokens"] = 192 * 40
    recipe = recipe_from_dict(data)
    results = run_study(recipe, tmp_path / "run", progress=False, log=lambda s: None)

    router = ClusterRouter(ClusterModel.load(clustered / "clusterer"))
    texts = ["apple banana cherry", "engine piston", "", "whale coral reef"]
    w = router_weights(router, [2, 0, 1], texts)  # experts in an arbitrary cluster order
    assert w.shape == (4, 3)
    torch.testing.assert_close(w.sum(1), torch.ones(4, dtype=torch.float64))
    row = router_row(recipe, tmp_path / "run", clustered / "clusterer", log=lambda s: None)["cbtm_ensemble_router"]
    assert set(row["train"]) == {"cluster0", "cluster1", "cluster2"} and set(row["novel"]) == {"music"}
    # routing by topic picks each cluster's own expert: better than mixing all uniformly
    assert row["train_mean"] < results["btm_ensemble_uniform"]["train_mean"]
    assert (tmp_path / "run" / "router.json").is_file()
    # the cache is keyed by the router's settings: top-1 routing is computed anew, not read back
    top1 = router_row(recipe, tmp_path / "run", clustered / "clusterer", log=lambda s: None, top_k=1)
    from elmforest.cbtm.cluster_router import DEFAULT_TEMPERATURE

    assert top1["top_k"] == 1 and top1["temperature"] == DEFAULT_TEMPERATURE
    assert top1["cbtm_ensemble_router"]["train"] != row["train"]
