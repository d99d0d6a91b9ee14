"""Anchored experts merged into one opt-out mixture-of-experts (FlexOlmo), and opting a domain out.

    merge_anchored      the seed + its anchored experts -> one Mixtral: the seed's attention,
                        embeddings and norms (every anchored expert froze them; checked bit for bit),
                        n + 1 experts per layer (0: the seed's MLP, j: domain j's copy), router rows
                        [r_seed; r_1; ...; r_n], top-k routing. No joint training.
    build_anchored_moe  the study's arm: RUN/seed + RUN/anchored_experts/* -> RUN/anchored_moe.
    opt_out             the mixture without one domain's expert and router row (one expert fewer).
    opt_out_study       that domain's perplexity before and after, and every other domain's
                        (the format of `grow.removal_study`, printed by `grow.removal_table`).
    tune_router         optional: only the router rows train, on a small domain-balanced sample
                        (FlexOlmo's "RT" variant), into RUN/anchored_moe_router_tuned; its tokens
                        and FLOPs are reported apart from the arm's.

Router rows (`router_rows`): "trained" (the default, FlexOlmo's: the merged router concatenates the
rows as the experts' training left them; each was trained against the same frozen seed row, so
their scales agree) or "embeddings" (the domain embeddings those rows started from, untrained:
`router_init.safetensors`). The seed's row is the same in both (it never trained).

Top-k: FlexOlmo trains each expert with both of its two experts active and routes each token to 4
experts after the merge (its 8-expert model: 37B parameters, 20B active = ~3B shared + 4 x 4.3B
feed-forward experts; its released merge script also routes top-4). Default here: min(4, n + 1).
Mixtral's router renormalises the top-k probabilities to sum 1 (FlexOlmo's released Hugging Face
config does not, `norm_topk_prob: false`); the layout is Mixtral because the seed is a Llama (the
OLMoE and FlexOlmo layouts add query/key norms a Llama does not have).

On disk: a Hugging Face Mixtral folder (config.json, model.safetensors with its checksum, the
tokenizer files) and anchored_moe.json, written last: {"format", "experts": ["seed", d_1, ...] (the
router rows' order), "domains", "router_rows", "top_k", "seed", "anchored_experts", "params",
"flops_per_token_forward", "train": {"seed_tokens", "seed_flops", "experts": {d: {...}}, "tokens",
"flops"}, "opted_out": [...], "router_tuning": null or {...}}.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, MixtralForCausalLM

from elmforest.train.budget import resolve_device
from elmforest import __version__, storage
from elmforest.mixtures import btx
from elmforest.btm.seed import SEED_JSON, model_context, seed_dir
from elmforest.mixtures.anchored import ANCHORED_DIR, ROUTER_INIT, check_llama, read_anchored
from elmforest.models.checkpoint import WEIGHTS_NAME, save_weights, verify_weights, write_safetensors
from elmforest.config import Recipe
from elmforest.data.corpus import Corpus
from elmforest.errors import ElmError, require
from elmforest.combine.evaluate import perplexity
from elmforest.combine.forest import read_json
from elmforest.models.factory import copy_tokenizer_files, load_model
from elmforest.data.sampler import BalancedSampler
from elmforest.combine.scoring import domain_windows
from elmforest.data.tokenizer import tokenizer_hash
from elmforest.data.tokens import token_array
from elmforest.train import trackers

MOE_DIR = "anchored_moe"
TUNED_DIR = "anchored_moe_router_tuned"
MOE_JSON = "anchored_moe.json"  # written last: the folder is complete
MOE_FORMAT = "elmforest-anchored-moe/1"
ROUTER_ROWS = ("trained", "embeddings")
FLEXOLMO_TOP_K = 4
Log = Callable[[str], Any]


def _check_frozen(state: dict[str, torch.Tensor], seed: dict[str, torch.Tensor], seed_rows: torch.Tensor, layers: int, where: Path) -> None:
    """An anchored expert's frozen tensors must be the seed's, bit for bit (what makes the merge exact)."""
    for key, value in state.items():
        if ".mlp." not in key and (key not in seed or not torch.equal(value, seed[key])):
            raise ElmError(f"{key} differs from the seed's; an anchored expert must keep it frozen", where)
    seed_mlps = btx.llama_mlps(seed, layers)
    for i, (gate_up, down) in enumerate(btx.mixtral_mlps(state, layers, 0)):
        want_gate_up, want_down = seed_mlps[i]
        require(torch.equal(gate_up, want_gate_up) and torch.equal(down, want_down), f"layer {i}: expert 0 is not the seed's MLP", where)
        row = state[f"model.layers.{i}.mlp.gate.weight"][0]
        require(torch.equal(row, seed_rows[i]), f"layer {i}: router row 0 is not the seed's (frozen) row", where)


def _moe_meta(moe: MixtralForCausalLM, context: int) -> dict[str, Any]:
    return {
        "params": sum(p.numel() for p in moe.parameters()),
        "flops_per_token_forward": btx.moe_flops_per_token(moe, context)["moe"],  # Kaplan's convention, top-k experts
    }


def merge_anchored(
    seed_dir: str | Path,
    expert_dirs: list[str | Path],
    out: str | Path,
    *,
    router_rows: str = "trained",
    top_k: int | None = None,
) -> dict[str, Any]:
    """Merge a llama seed and its trained anchored experts into one Mixtral folder `out` (must not
    exist), written atomically; returns anchored_moe.json's contents. top_k None: min(4, n + 1)."""
    seed_dir, out = Path(seed_dir), Path(out)
    require(not out.exists(), "already exists; choose a new folder for the merged mixture", out)
    require(router_rows in ROUTER_ROWS, f"router rows must be one of {', '.join(ROUTER_ROWS)}, got {router_rows!r}")
    require(len(expert_dirs) >= 1, "merging needs at least one anchored expert")
    seed = load_model(seed_dir)
    check_llama(seed, seed_dir)
    seed_state = seed.state_dict()
    layers = seed.config.num_hidden_layers
    n = len(expert_dirs)
    k = min(FLEXOLMO_TOP_K, n + 1) if top_k is None else top_k
    require(1 <= k <= n + 1, f"top_k must lie in [1, {n + 1}] for {n + 1} experts, got {k}")
    metas, mlps, rows = [], [btx.llama_mlps(seed_state, layers)], []
    seed_rows = None
    for d in map(Path, expert_dirs):
        meta = read_anchored(d)
        verify_weights(d / WEIGHTS_NAME)
        state = load_file(str(d / WEIGHTS_NAME))
        init = load_file(str(d / ROUTER_INIT))
        if seed_rows is None:
            seed_rows = init["seed"]
        require(torch.equal(init["seed"], seed_rows), "anchored on another seed row than the first expert", d)
        _check_frozen(state, seed_state, seed_rows, layers, d)
        mlps.append(btx.mixtral_mlps(state, layers, 1))
        if router_rows == "trained":
            rows.append([state[f"model.layers.{i}.mlp.gate.weight"][1] for i in range(layers)])
        else:
            rows.append(list(init["domain"]))
        metas.append(meta)
    domains = [m["domain"] for m in metas]
    require(len(set(domains)) == n, f"two anchored experts share a domain: {domains}")
    routers = [torch.stack([seed_rows[i], *(r[i] for r in rows)]) for i in range(layers)]
    moe = btx.assemble_mixtral(btx.mixtral_config(seed.config, n + 1, k), seed_state, mlps, routers)
    seed_meta = read_json(seed_dir / SEED_JSON, "seed.json")
    experts = {m["domain"]: {"tokens": m["tokens"], "flops": m["flops"], "flops_measured": m["flops_measured"]} for m in metas}
    meta = {
        "format": MOE_FORMAT,
        "experts": ["seed", *domains],
        "domains": domains,
        "router_rows": router_rows,
        "top_k": k,
        "seed": str(seed_dir.resolve()),
        "anchored_experts": [str(Path(d).resolve()) for d in expert_dirs],
        **_moe_meta(moe, seed.config.max_position_embeddings),
        "train": {
            "seed_tokens": seed_meta["tokens"],
            "seed_flops": seed_meta["flops"],
            "experts": experts,
            "tokens": seed_meta["tokens"] + sum(e["tokens"] for e in experts.values()),
            "flops": seed_meta["flops"] + sum(e["flops"] for e in experts.values()),
        },
        "opted_out": [],
        "router_tuning": None,
        "tokenizer_hash": tokenizer_hash(seed_dir),
        "elmforest_version": __version__,
    }
    with storage.atomic_dir(out) as tmp:
        save_weights(moe, tmp)
        copy_tokenizer_files(seed_dir, tmp)
        storage.write_json(tmp / MOE_JSON, meta)
    return meta


def read_moe(moe_dir: str | Path) -> dict[str, Any]:
    """anchored_moe.json of a finished merged mixture (ElmError naming the folder otherwise)."""
    path = Path(moe_dir) / MOE_JSON
    require(path.is_file(), "not a merged anchored mixture (no anchored_moe.json)", moe_dir)
    meta = read_json(path, MOE_JSON)
    require(meta.get("format") == MOE_FORMAT, f"field 'format' must be {MOE_FORMAT!r}", path)
    return meta


def build_anchored_moe(
    recipe: Recipe, run_dir: Path, log: Log = print, *, router_rows: str = "trained", top_k: int | None = None
) -> Path:
    """The study's arm: RUN/seed and RUN/anchored_experts/<each train domain> merged into
    RUN/anchored_moe (see `merge_anchored`); a finished folder is kept as it is."""
    run_dir = Path(run_dir)
    out = run_dir / MOE_DIR
    if (out / MOE_JSON).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)  # not ours to keep: a complete merge always holds anchored_moe.json
    dirs = [run_dir / ANCHORED_DIR / d for d in recipe.train_domains]
    meta = merge_anchored(seed_dir(run_dir), dirs, out, router_rows=router_rows, top_k=top_k)
    log(f"anchored mixture: {out} ({len(meta['experts'])} experts, top-{meta['top_k']}, {router_rows} router rows)")
    return out


def opt_out(moe_dir: str | Path, domain: str, out: str | Path) -> dict[str, Any]:
    """Write `out` (must not exist, atomically): the mixture in `moe_dir` without `domain`'s expert
    and router row. Every other tensor is copied unchanged; top_k becomes min(top_k, experts left).
    Returns the new anchored_moe.json's contents."""
    moe_dir, out = Path(moe_dir), Path(out)
    require(not out.exists(), "already exists; choose a new folder for the opted-out mixture", out)
    meta = read_moe(moe_dir)
    require(domain in meta["domains"], f"no expert of domain {domain!r} in the mixture (has: {', '.join(meta['domains'])})", moe_dir)
    drop = meta["experts"].index(domain)
    n = len(meta["experts"])
    keep = [i for i in range(n) if i != drop]
    verify_weights(moe_dir / WEIGHTS_NAME)
    tensors = load_file(str(moe_dir / WEIGHTS_NAME))
    per_expert = (".mlp.gate.weight", ".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")  # leading dim: the experts
    kept = {key: (t[keep].contiguous() if key.endswith(per_expert) else t) for key, t in tensors.items()}
    config = AutoConfig.from_pretrained(moe_dir, local_files_only=True)
    config.num_local_experts = n - 1
    config.num_experts_per_tok = min(config.num_experts_per_tok, n - 1)
    with torch.device("meta"):  # counts only
        shape = MixtralForCausalLM(config)
    new = {
        **meta,
        "experts": [e for i, e in enumerate(meta["experts"]) if i != drop],
        "domains": [d for d in meta["domains"] if d != domain],
        "top_k": config.num_experts_per_tok,
        **_moe_meta(shape, config.max_position_embeddings),
        "opted_out": [*meta.get("opted_out", []), domain],
        "opted_out_from": str(moe_dir.resolve()),
    }
    with storage.atomic_dir(out) as tmp:
        write_safetensors(kept, tmp / WEIGHTS_NAME)
        storage.write_text(tmp / "config.json", config.to_json_string())
        copy_tokenizer_files(moe_dir, tmp)
        storage.write_json(tmp / MOE_JSON, new)
    return new


def opt_out_study(
    recipe: Recipe, run_dir: Path, domain: str, moe_dir: Path | None = None, log: Log = print
) -> dict[str, Any]:
    """Opt `domain` out of the merged mixture (default RUN/anchored_moe) into RUN/<moe>_optout_<domain>/
    and compare test perplexity before and after on that domain, the other mixture domains and the
    novel domains (the recipe's eval windows). Written to RUN/<moe>_optout_<domain>.json and returned,
    in `grow.removal_study`'s format (`grow.removal_table` prints it)."""
    from elmforest.combine.evaluate import geo_mean

    run_dir = Path(run_dir)
    moe_dir = Path(moe_dir) if moe_dir is not None else run_dir / MOE_DIR
    meta = read_moe(moe_dir)
    require(domain in meta["domains"], f"no expert of domain {domain!r} in the mixture (has: {', '.join(meta['domains'])})", moe_dir)
    name = f"{moe_dir.name}_optout_{domain}"
    after_dir = run_dir / name
    if after_dir.exists():
        shutil.rmtree(after_dir)  # derived from moe_dir: rebuilt every time
    opt_out(moe_dir, domain, after_dir)
    corpus = Corpus(recipe.corpus)
    tok = run_dir / "tokenizer"
    context = model_context(recipe, tok)
    kept = [d for d in meta["domains"] if d != domain and d in corpus.domains]
    novel = [d for d in recipe.novel_domains if d not in meta["domains"]]
    device = resolve_device(recipe.optim.device)
    models = {"before": load_model(moe_dir).to(device), "after": load_model(after_dir).to(device)}
    table: dict[str, dict[str, float]] = {"before": {}, "after": {}}
    for d in [domain, *kept, *novel]:
        log(f"opt out {domain}: evaluating {d}")
        test = domain_windows(corpus, tok, d, "test", context, recipe.eval.max_tokens_per_domain, recipe.eval.window_seed)
        for when, model in models.items():
            table[when][d] = perplexity(model, test, recipe.eval.batch_size)["ppl"]
    result = {
        "removed": domain,
        "experts_removed": [domain],
        "moe": str(moe_dir),
        "moe_after": str(after_dir),
        "method": f"anchored mixture, top-{meta['top_k']} of {len(meta['experts'])} experts, {meta['router_rows']} router rows",
        "domains": {"removed": domain, "kept": kept, "novel": novel},
        "ppl": table,
        "novel_mean_before": geo_mean([table["before"][d] for d in novel]),
    }
    storage.write_json(run_dir / f"{name}.json", result)
    return result


@trackers.tracked
def tune_router(
    recipe: Recipe,
    run_dir: Path,
    tokens: int,
    log: Log = print,
    *,
    moe_dir: Path | None = None,
    out: Path | None = None,
    stop_at_step: int | None = None,
) -> dict[str, Any]:
    """Optional router tuning (FlexOlmo's "RT"): only the router rows of RUN/anchored_moe (or
    `moe_dir`) train, for `tokens` tokens (rounded up to whole steps) of domain-balanced batches of
    the mixture's domains' train splits, the recipe's batch size and constant peak learning rate,
    no load-balancing loss (FlexOlmo's RT weight is 0), through the one training loop into `out`
    (default RUN/anchored_moe_router_tuned; resumable). Returns its anchored_moe.json's contents,
    whose "router_tuning" holds the extra tokens and FLOPs (2 x the mixture's forward per token:
    activation gradients through the frozen experts, weight gradients for the rows only)."""
    run_dir = Path(run_dir)
    moe_dir = Path(moe_dir) if moe_dir is not None else run_dir / MOE_DIR
    out = Path(out) if out is not None else run_dir / TUNED_DIR
    if (out / MOE_JSON).is_file():
        return read_json(out / MOE_JSON, MOE_JSON)
    require(tokens > 0, f"router tuning needs tokens > 0, got {tokens}")
    if out.exists() and not (out / "train.json").is_file():
        shutil.rmtree(out)  # interrupted before its training began
    base = read_moe(moe_dir)
    tok = run_dir / "tokenizer"
    corpus = Corpus(recipe.corpus)
    domains = list(base["domains"])
    corpus.require(domains, "the mixture's domains (router tuning samples their train splits)")
    context = model_context(recipe, tok)
    blocks_per_domain = max(1, recipe.budget.batch_tokens // (context * len(domains)))
    per_step = blocks_per_domain * len(domains) * context
    steps = math.ceil(tokens / per_step)
    sampler = BalancedSampler({d: token_array(corpus, tok, d, "train") for d in domains}, context, blocks_per_domain, seed=recipe.optim.seed)
    device = resolve_device(recipe.optim.device)
    spec = btx.router_spec(steps, recipe.optim.lr, device=device, threads=recipe.optim.threads)
    log(f"anchored mixture: tuning the router rows for {steps} steps of {per_step} tokens")
    moe = load_model(moe_dir)
    info = btx.finetune_router(moe, sampler, spec, out, context=context, aux_loss_coef=0.0, stop_at_step=stop_at_step)
    tuning = {
        "tokens": info["tokens"],
        "flops": info["flops"],
        "steps": info["steps"],
        "trained": "router rows (model.layers.*.mlp.gate.weight), experts and everything else frozen",
        "trained_params": info["trained_params"],
        "lr": recipe.optim.lr,
        "batch_tokens": per_step,
        "domains": domains,
        "loss_first": info["loss_first"],
        "loss_last": info["loss_last"],
    }
    if info["steps"] < steps:
        return {**base, "router_tuning": {**tuning, "stopped": True}}
    copy_tokenizer_files(moe_dir, out, overwrite=False)
    meta = {**base, "router_tuning": tuning, "tuned_from": str(moe_dir.resolve())}
    storage.write_json(out / MOE_JSON, meta)
    return meta
