"""`elmforest check` rules for the mixtures inside one model: a DEMix folder and a BTX folder.

    DEMix   demix.json + demix_run.json (RUN/demix, `mixtures.train_demix`)
            config.json is the *dense* base model's; model.safetensors holds every layer's MLP
            once per domain (`...mlp.experts.<j>...`, `demix.save_demix`), so the tensors must be
            the dense config's with each MLP tensor repeated for j = 0..n-1, n = demix.json's
            n_domains; demix_run.json's params = that model's parameter count. While training
            (no demix.json yet) it is a training run whose weights have that DEMix layout.
    BTX     mix.json (RUN/btx, `elmforest mix`)
            a Mixtral folder written by `save_pretrained` (stored per-expert w1/w2/w3, loaded into
            fused tensors), so it is checked by loading it: no missing or unused tensor, the
            config's experts and top-k are mix.json's, mix.json's params the model's count, its
            averaging weights a distribution, its tokenizer hash the folder's tokenizer files'.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from elmforest.checks.folders import (
    check_model,
    check_training,
    meta_model,
    recorded_hash,
    tokenizer_files_hash,
)
from elmforest.checks.problems import Collector


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _names(value: Any, n: int | None = None) -> bool:
    """A list of strings (of length n when given)."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value) and (n is None or len(value) == n)


def check_demix(c: Collector, path: Path, domains: list[str] | None = None) -> None:
    """A DEMix folder, finished (demix.json) or mid-training; `domains`: the recipe's train domains
    when the folder is a run's RUN/demix (demix.json must list them, in order)."""
    from elmforest.mixtures.demix import DEMIX_FORMAT
    from elmforest.models.factory import param_count

    jpath, rpath = path / "demix.json", path / "demix_run.json"
    meta = c.read_json(jpath, "demix.json") if jpath.is_file() else None
    n: int | None = None
    if meta is not None:
        if meta.get("format") != DEMIX_FORMAT:
            c.add(jpath, f"field 'format' is {meta.get('format')!r}; expected {DEMIX_FORMAT!r}")
        if not _positive_int(meta.get("n_domains")):
            c.add(jpath, f"field 'n_domains' must be a positive integer, got {meta.get('n_domains')!r}")
        else:
            n = meta["n_domains"]
            if not _names(meta.get("domains"), n):
                c.add(jpath, f"field 'domains' must list {n} domain names")
            elif domains is not None and meta["domains"] != list(domains):
                c.add(jpath, f"domains {meta['domains']} differ from the recipe's train_domains {list(domains)}")
    elif rpath.is_file():
        c.add(path, "demix_run.json without demix.json (demix.json is written first)")
    if n is None and domains is not None:
        n = len(domains)
    info, config = check_training(c, path, n)  # n None: as many domains as the weights name
    if meta is not None and (info or {}).get("status") == "running":
        c.add(path / "train.json", "status is running, but demix.json says training finished")
    if config is not None and meta is not None and meta.get("model_type") != config.model_type:
        c.add(jpath, f"model_type {meta.get('model_type')!r} differs from config.json's {config.model_type!r}")
    if not rpath.is_file():
        return
    run = c.read_json(rpath, "demix_run.json")
    if run is None:
        return
    c.counts(rpath, run, ("steps", "start_step", "tokens", "flops", "seed_tokens", "seed_flops", "params"))
    if meta is not None and run.get("domains") != meta.get("domains"):
        c.add(rpath, f"domains {run.get('domains')} differ from demix.json's {meta.get('domains')}")
    if config is not None and n is not None and "params" in run:
        expected = param_count(meta_model(config, n))
        if run["params"] != expected:
            c.add(rpath, f"params {run['params']} differs from the {expected} of a DEMix model of {n} domains")


def check_btx(c: Collector, path: Path, forest_names: list[str] | None = None) -> None:
    """A BTX folder (a Mixtral MoE with mix.json); `forest_names`: the experts of the forest it was
    built from when known (a run's RUN/forest), which mix.json must list, in order."""
    from elmforest.mixtures.stages import MIX_FORMAT
    from elmforest.models.factory import param_count

    jpath = path / "mix.json"
    meta = c.read_json(jpath, "mix.json")
    config = check_model(c, path)  # a Mixtral config: loaded with from_pretrained
    if meta is None:
        return
    if meta.get("format") != MIX_FORMAT:
        c.add(jpath, f"field 'format' is {meta.get('format')!r}; expected {MIX_FORMAT!r}")
    experts = meta.get("experts")
    n = len(experts) if _names(experts) and experts else None
    if n is None:
        c.add(jpath, "field 'experts' must be a non-empty list of expert names")
    else:
        if not _names(meta.get("domains"), n):
            c.add(jpath, f"field 'domains' must list {n} domain names, one per expert")
        weights = meta.get("weights")
        if not (isinstance(weights, list) and len(weights) == n
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
                and math.isclose(sum(weights), 1.0, abs_tol=1e-6)):
            c.add(jpath, f"field 'weights' must be {n} non-negative numbers summing to 1, got {weights!r}")
        if not (_positive_int(meta.get("top_k")) and meta["top_k"] <= n):
            c.add(jpath, f"field 'top_k' must be an integer in [1, {n}], got {meta.get('top_k')!r}")
        if forest_names is not None and experts != forest_names:
            c.add(jpath, f"experts {experts} differ from the forest's {forest_names}")
    c.counts(jpath, meta, ("params",))
    finetune = meta.get("finetune")
    if not isinstance(finetune, dict):
        c.add(jpath, "field 'finetune' must be a mapping (tokens, flops, steps)")
    else:
        c.counts(jpath, finetune, ("tokens", "flops", "steps"))
    if config is not None:
        if config.model_type != "mixtral":
            c.add(path / "config.json", f"model_type is {config.model_type!r}; a BTX folder holds a 'mixtral' model")
        else:
            if n is not None and config.num_local_experts != n:
                c.add(jpath, f"lists {n} experts, config.json's num_local_experts is {config.num_local_experts}")
            if config.num_experts_per_tok != meta.get("top_k"):
                c.add(jpath, f"top_k {meta.get('top_k')} differs from config.json's num_experts_per_tok "
                             f"{config.num_experts_per_tok}")
            expected = param_count(meta_model(config))
            if "params" in meta and meta["params"] != expected:
                c.add(jpath, f"params {meta['params']} differs from config.json's model ({expected})")
    recorded_hash(c, jpath, meta.get("tokenizer_hash"), tokenizer_files_hash(c, path), "tokenizer_hash")
