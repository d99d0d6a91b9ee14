"""BTX: llama experts mixed into a Mixtral MoE, router fine-tuning, HF export; tiny random models."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from safetensors.torch import load_file

from elmforest.mixtures.btx import (
    assemble_mixtral, finetune_router, llama_mlps, mix_experts, mixtral_config, moe_flops_per_token, router_parameters,
    router_spec, save_moe,
)
from elmforest.errors import ElmError
from elmforest.models.factory import flops_per_token
from elmforest.train.state import read_metrics

torch.set_num_threads(1)
V, H = 64, 32


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    cfg = LlamaConfig(**{**fields, **overrides})
    return LlamaForCausalLM(cfg).eval()


def tokens(B: int = 3, T: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_of(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def force_expert(moe: MixtralForCausalLM, i: int, monkeypatch) -> None:
    """Make every layer's router send every token to expert i alone (weight 1)."""
    n = moe.config.num_local_experts

    def route(h):
        N = h.reshape(-1, H).shape[0]
        return torch.zeros(N, n), torch.ones(N, 1), torch.full((N, 1), i)

    for layer in moe.model.layers:
        monkeypatch.setattr(layer.mlp.gate, "forward", route)


def test_each_expert_is_an_exact_copy_of_that_llama_mlp():
    experts = [llama(s) for s in (0, 1, 2)]
    moe = mix_experts(experts, top_k=1)
    assert isinstance(moe, MixtralForCausalLM) and moe.config.num_local_experts == 3
    assert moe.config.num_experts_per_tok == 1
    h = torch.randn(2, 7, H)
    h[..., 0] = h[..., 0].abs() + 0.1  # feature 0 > 0 on every token
    with torch.no_grad():
        for layer_idx, layer in enumerate(moe.model.layers):
            for i, expert in enumerate(experts):
                # Router forced through its real weights: logit_i = 50 * h_0 > 0 = every other logit.
                layer.mlp.gate.weight.zero_()
                layer.mlp.gate.weight[i, 0] = 50.0
                want = expert.model.layers[layer_idx].mlp(h)
                torch.testing.assert_close(layer.mlp(h), want, atol=1e-5, rtol=0)
                assert not torch.allclose(want, experts[(i + 1) % 3].model.layers[layer_idx].mlp(h), atol=1e-4)


def test_weighted_average_with_forced_routing_reproduces_each_expert(monkeypatch):
    experts = [llama(s) for s in (0, 1)]
    x = tokens()
    for i in (0, 1):
        moe = mix_experts(experts, weights=[float(i == 0), float(i == 1)], top_k=2)
        force_expert(moe, i, monkeypatch)
        torch.testing.assert_close(logits_of(moe, x), logits_of(experts[i], x), atol=1e-5, rtol=0)
    # Non-expert parameters are the weighted average.
    moe = mix_experts(experts, weights=[3.0, 1.0])
    key = "model.layers.1.self_attn.q_proj.weight"
    want = 0.75 * experts[0].state_dict()[key] + 0.25 * experts[1].state_dict()[key]
    torch.testing.assert_close(moe.state_dict()[key], want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_row_i_routes_to_expert_i(top_k):
    """assemble_mixtral puts routers[l][i] in front of expert i's MLP: with row i alone pointing at
    feature 0 (> 0 on every token) and the other rows away from it, layer l's MoE block is expert
    i's MLP (top_k 2: expert i with weight ~1, the runner-up ~0), for every i and every layer."""
    experts = [llama(s) for s in (0, 1, 2)]
    n, layers = 3, 2
    config = mixtral_config(experts[0].config, n, top_k)
    shared = {k: v for k, v in experts[0].state_dict().items() if ".mlp." not in k}
    mlps = [llama_mlps(e.state_dict(), layers) for e in experts]
    h = torch.randn(2, 7, H)
    h[..., 0] = h[..., 0].abs() + 0.5
    for i in range(n):
        routers = []
        for _ in range(layers):
            rows = torch.zeros(n, H)
            rows[:, 0] = -torch.arange(1.0, n + 1) * 20  # every other row: far below
            rows[i, 0] = 60.0
            routers.append(rows)
        moe = assemble_mixtral(config, shared, mlps, routers)
        with torch.no_grad():
            for layer in range(layers):
                torch.testing.assert_close(moe.model.layers[layer].mlp.gate.weight, routers[layer])
                want = experts[i].model.layers[layer].mlp(h)
                torch.testing.assert_close(moe.model.layers[layer].mlp(h), want, atol=1e-4, rtol=0)
                other = experts[(i + 1) % n].model.layers[layer].mlp(h)
                assert not torch.allclose(want, other, atol=1e-3)


def test_identical_experts_reproduce_the_llama_model():
    base = llama(0)
    experts = [copy.deepcopy(base) for _ in range(3)]
    moe = mix_experts(experts, top_k=2, seed=7)
    x = tokens()
    torch.testing.assert_close(logits_of(moe, x), logits_of(base, x), atol=1e-5, rtol=0)
    routers = router_parameters(moe)
    assert len(routers) == 2 and all(r.shape == (3, H) for r in routers)
    assert 0 < float(routers[0].detach().std()) < 0.05  # small random
    assert torch.equal(mix_experts(experts, seed=7).state_dict()["model.layers.0.mlp.gate.weight"], routers[0])
    assert not torch.equal(mix_experts(experts, seed=8).state_dict()["model.layers.0.mlp.gate.weight"], routers[0])


def test_export_loads_with_auto_model(tmp_path):
    moe = mix_experts([llama(0), llama(1)], top_k=2)
    x = tokens()
    save_moe(moe, tmp_path / "btx")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "btx")
    assert isinstance(loaded, MixtralForCausalLM)
    assert list((tmp_path / "btx").glob("*.safetensors"))
    torch.testing.assert_close(logits_of(loaded.eval(), x), logits_of(moe, x), atol=1e-6, rtol=0)
    with pytest.raises(ElmError, match="already exists"):
        save_moe(moe, tmp_path / "btx")


def test_rejects_gpt2_and_mismatched_experts():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=H, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ElmError, match="llama-family"):
        mix_experts([gpt2, gpt2])
    with pytest.raises(ElmError, match="intermediate_size"):
        mix_experts([llama(0), llama(1, intermediate_size=64)])
    with pytest.raises(ElmError, match="mlp_bias"):
        mix_experts([llama(0, mlp_bias=True)] * 2)
    with pytest.raises(ElmError, match="weights"):
        mix_experts([llama(0), llama(1)], weights=[1.0])
    with pytest.raises(ElmError, match="top_k"):
        mix_experts([llama(0), llama(1)], top_k=3)


def counting(B: int, T: int, seed: int) -> torch.Tensor:
    """A learnable task: each row counts up by one (mod V) from a random start."""
    start = torch.randint(0, V, (B, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(T)) % V


def _good_and_bad_experts() -> list[LlamaForCausalLM]:
    """Expert 0 learned the counting task; expert 1 is expert 0 with scrambled, amplified MLPs."""
    good = llama(0)
    opt = torch.optim.AdamW(good.parameters(), lr=1e-2)
    good.train()
    for step in range(30):
        batch = counting(8, 17, seed=100 + step)
        loss = good(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    good.eval()
    bad = copy.deepcopy(good)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in bad.model.layers:
            for p in layer.mlp.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return [good, bad]


def _ce(moe, batch) -> float:
    with torch.no_grad():
        logits = moe(input_ids=batch[:, :-1]).logits
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))


class CountingSampler:
    """Batch i: `rows` windows of the counting task, a pure function of (seed, i) like elmforest's samplers."""

    def __init__(self, seed: int = 100, rows: int = 4, block: int = 16):
        self.seed, self.rows, self.block, self.batches = seed, rows, block, 0

    def next_batch(self) -> torch.Tensor:
        self.batches += 1
        return counting(self.rows, self.block + 1, seed=self.seed + self.batches - 1)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.batches = state["batches"]


def test_finetune_router_only_moves_routers_and_lowers_loss(tmp_path):
    moe = mix_experts(_good_and_bad_experts(), top_k=2)
    probe = counting(4, 17, seed=0)
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    ce_before = _ce(moe, probe)
    metrics = finetune_router(moe, CountingSampler(), router_spec(25, 0.05), tmp_path / "ft", context=16)
    after = moe.state_dict()
    for key, value in before.items():
        if key.endswith(".mlp.gate.weight"):
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    assert _ce(moe, probe) < ce_before - 0.5
    assert metrics["loss_last"] < metrics["loss_first"] and len(metrics["losses"]) == 25
    assert metrics["steps"] == 25 and metrics["tokens"] == 25 * 4 * 16 and not metrics["train_all"]
    assert metrics["trained_params"] == 2 * 2 * H  # two layers' [2, H] routers
    per_token = moe_flops_per_token(moe, 16)
    # top-2 MLPs + router cost more than one expert, whose cost is the dense models' convention
    assert per_token["moe"] - per_token["dense_expert"] == 2 * 2 * (3 * H * 48 + 2 * H)
    assert 3 * per_token["dense_expert"] == flops_per_token(llama(0).config, 16)
    assert metrics["flops"] == pytest.approx(2 * per_token["moe"] * metrics["tokens"])
    assert all(p.requires_grad for p in moe.parameters()) and not moe.training  # state restored
    # The folder is the fine-tuned Mixtral (what from_pretrained loads) beside the loop's checkpoint.
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()
    x = tokens()
    torch.testing.assert_close(logits_of(loaded, x), logits_of(moe, x), atol=1e-6, rtol=0)
    assert (tmp_path / "ft" / "train_state.pt").is_file()


def test_finetune_adds_the_load_balancing_loss_to_the_gradient(tmp_path):
    """One step's router update follows the gradient of CE + coef * Mixtral's aux loss, computed
    here by hand; AdamW's first step (no clipping) is -lr * g / (|g| + eps), i.e. -lr * sign(g)."""
    experts = _good_and_bad_experts() + [llama(5)]
    batch = CountingSampler().next_batch()
    coef, lr = 0.5, 1e-3
    grads = {}
    for c in (coef, 0.0):
        ref = mix_experts(experts, top_k=2).train()
        out = ref(input_ids=batch[:, :-1], output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
        (ce + c * out.aux_loss).backward()
        grads[c] = {n: p.grad for n, p in ref.named_parameters() if n.endswith(".mlp.gate.weight")}
    # The aux term flips the sign of some router gradients, so the check below can tell them apart.
    assert any(not torch.equal(grads[coef][n].sign(), grads[0.0][n].sign()) for n in grads[coef])
    spec = router_spec(1, lr)
    spec.grad_clip = 0.0
    moe = mix_experts(experts, top_k=2)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    finetune_router(moe, CountingSampler(), spec, tmp_path / "ft", context=16, aux_loss_coef=coef)
    for name, g in grads[coef].items():
        step = moe.state_dict()[name] - before[name]
        torch.testing.assert_close(step, -lr * g / (g.abs() + 1e-8), atol=2e-6, rtol=0)


def _switch_loss_by_hand(moe, batch, coef):
    """CE + coef * n * sum_i f_i * P_i of one forward, the router logits recomputed from each gate's
    input: P_i the mean router probability of expert i, f_i the fraction of tokens with i among their
    top-k, both over every layer's tokens pooled (Switch Transformer's load balancing, top-k form).
    Returns (ce, aux, router gradients by name)."""
    inputs = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: inputs.append((m, a[0]))) for layer in moe.model.layers]
    out = moe(input_ids=batch[:, :-1])
    for h in hooks:
        h.remove()
    n, k = moe.config.num_local_experts, moe.config.num_experts_per_tok
    logits = torch.cat([h.reshape(-1, H) @ gate.weight.T for gate, h in inputs])  # [layers * tokens, n]
    probs = logits.float().softmax(-1)
    chosen = torch.zeros_like(probs).scatter_(1, probs.topk(k, dim=-1).indices, 1.0)  # 1 where i is in the top-k
    aux = n * (chosen.mean(0) * probs.mean(0)).sum()
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
    (ce + coef * aux).backward()
    return ce, aux, {name: p.grad.clone() for name, p in moe.named_parameters() if name.endswith(".mlp.gate.weight")}


def test_finetune_step_gradient_is_ce_plus_the_load_balancing_loss_by_hand(tmp_path):
    """The loop's gradient on the routers in one fine-tune step equals d(CE + coef * aux)/d(router),
    aux computed by hand; the logged loss is the CE alone."""
    experts = _good_and_bad_experts() + [llama(5)]
    coef = 0.5
    batch = CountingSampler().next_batch()
    ce, aux, want = _switch_loss_by_hand(mix_experts(experts, top_k=2).train(), batch, coef)
    _, _, ce_only = _switch_loss_by_hand(mix_experts(experts, top_k=2).train(), batch, 0.0)
    assert 2.0 < aux.item() < 3.0  # 3 experts, top-2: balanced routing gives n * n * (k/n) * (1/n) = k = 2
    moe = mix_experts(experts, top_k=2)
    seen = {}
    for name, p in moe.named_parameters():
        if name.endswith(".mlp.gate.weight"):
            p.register_hook(lambda g, name=name: seen.setdefault(name, g.clone()))
    finetune_router(moe, CountingSampler(), router_spec(1, 1e-3), tmp_path / "ft", context=16, aux_loss_coef=coef)
    assert seen.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(seen[name], g, atol=1e-7, rtol=1e-5)
        assert (g - ce_only[name]).abs().max() > 1e-4  # the aux term is visible in the gradient
    assert read_metrics(tmp_path / "ft" / "metrics.jsonl")[0]["loss"] == round(ce.item(), 6)


def test_finetune_metrics_count_the_moe_flops_not_the_dense_formula(tmp_path):
    """metrics.jsonl's flops (and so its MFU) are the fine-tune's own figure: 2 (routers) or 3
    (everything) x the MoE's forward per token, not the dense formula on the Mixtral's config,
    which counts all n expert MLPs on every token."""
    for train_all, passes in ((False, 2), (True, 3)):
        moe = mix_experts([llama(0), llama(1), llama(2)], top_k=2)
        out = tmp_path / f"ft{passes}"
        info = finetune_router(moe, CountingSampler(rows=2), router_spec(3, 1e-3), out, context=16, train_all=train_all)
        rows = read_metrics(out / "metrics.jsonl")
        tokens = 3 * 2 * 16
        assert info["tokens"] == rows[-1]["tokens"] == tokens
        assert rows[-1]["flops"] == info["flops"] == passes * moe_flops_per_token(moe, 16)["moe"] * tokens
        assert json.loads((out / "train.json").read_text())["result"]["flops"] == info["flops"]
        assert rows[-1]["flops"] != flops_per_token(moe.config, 16) * tokens
        assert [r["flops"] for r in rows] == [passes * moe_flops_per_token(moe, 16)["moe"] * 2 * 16 * s for s in (1, 2, 3)]


def test_finetune_train_all_moves_everything(tmp_path):
    moe = mix_experts(_good_and_bad_experts(), top_k=2)
    before = moe.state_dict()["model.embed_tokens.weight"].clone()
    metrics = finetune_router(
        moe, CountingSampler(rows=2, block=8), router_spec(2, 1e-3), tmp_path / "ft", context=8, train_all=True,
        aux_loss_coef=0.0,
    )
    assert not torch.equal(moe.state_dict()["model.embed_tokens.weight"], before)
    assert metrics["trained_params"] == sum(p.numel() for p in moe.parameters())
    assert metrics["flops"] == pytest.approx(3 * moe_flops_per_token(moe, 8)["moe"] * metrics["tokens"])


def test_finetune_stopped_midway_continues_bit_identically(tmp_path):
    """Stop the router fine-tune at step 4 (checkpoints every 3), rebuild the mixture from scratch
    and rerun: weights, AdamW state and logged losses equal an uninterrupted run's."""
    experts = _good_and_bad_experts() + [llama(5)]
    spec = router_spec(9, 0.02, checkpoint_every=3)
    straight = finetune_router(mix_experts(experts, top_k=2), CountingSampler(), spec, tmp_path / "a", context=16)
    first = finetune_router(mix_experts(experts, top_k=2), CountingSampler(), spec, tmp_path / "b", context=16, stop_at_step=4)
    assert first["steps"] == 4
    again = mix_experts(experts, top_k=2)  # a fresh process would rebuild the same initial mixture
    second = finetune_router(again, CountingSampler(), spec, tmp_path / "b", context=16)
    assert second["steps"] == straight["steps"] == 9 and second["tokens"] == straight["tokens"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], mix_experts(experts, top_k=2).state_dict()[k]) for k in a)  # it trained
    ta = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)["optimizer"]["state"]
    tb = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(ta[i]["exp_avg_sq"], tb[i]["exp_avg_sq"]) for i in ta)
    la = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    assert la == [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == straight["losses"]
    assert json.loads((tmp_path / "b" / "train.json").read_text())["status"] == "done"
