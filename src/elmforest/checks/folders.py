"""The rules of each kind of elmforest folder, as `elmforest check` applies them (`elmforest.checks.check`).

Each `check_<kind>(c, path)` validates one folder through and through and reports every problem
to the `Collector` `c` (one line each, naming the file) instead of stopping at the first:

    corpus         manifest.json        every split file parses; documents/bytes match the manifest
    tokenizer      tokenizer.json       loads; its hash equals the one recorded when it was trained
    model          config.json + model.safetensors
                                        weights checksum; tensor names/shapes match config.json
    expert         expert.json          the model; expert.json's fields; its hashes = the folder's own; job.json
    training run   train.json/job.json  status parses; job.json's every field (`btm.jobs`); weights and
                                        train_state.pt (when present) load
    dense run      dense.json           a training run; dense.json's counts and tokenizer hash agree
    seed           seed.json            a model; seed.json's step = train_state.pt's; hashes = the folder's
    forest         forest.json          every expert present and valid, hashes equal everywhere

An adapter expert (expert.json names its base by hash) and an adapter forest (forest.json's
base_sha256, FOREST/base) are checked against their base by `elmforest.checks.adapters`. The
mixtures inside one model (a DEMix folder, a BTX Mixtral folder) have their own rules in
`elmforest.checks.mixtures`. Heavy imports (torch, transformers) happen inside the checks that need
them, so checking a corpus stays quick.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from elmforest.checks.adapters import check_adapter_base, check_adapter_expert
from elmforest.checks.problems import Collector, child_dirs

# A DEMix weight name: layer i's domain-j MLP, e.g. `transformer.h.0.mlp.experts.2.c_fc.weight`.
DEMIX_TENSOR = re.compile(r"\.mlp\.experts\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# Corpus and tokenizer


def check_corpus(c: Collector, path: Path) -> None:
    """The manifest opens, every split file parses and its counts equal the manifest's."""
    from elmforest.data.corpus import SPLITS, Corpus

    corpus = c.attempt(path, lambda: Corpus(path))
    if corpus is None:
        return
    mpath = path / "manifest.json"
    for domain in corpus.domains:
        entry = corpus.manifest["domains"][domain]
        splits = entry.get("splits") if isinstance(entry, dict) else None
        if not isinstance(splits, dict):
            c.add(mpath, f"domains.{domain}.splits is missing or not a mapping")
            continue
        for split in SPLITS:
            file = path / domain / f"{split}.jsonl"
            if not file.is_file():
                c.add(file, "split file is missing")
                continue
            counted = {"documents": 0, "bytes": 0}

            def count(domain: str = domain, split: str = split, counted: dict = counted) -> None:
                for text in corpus.texts(domain, split):
                    counted["documents"] += 1
                    counted["bytes"] += len(text.encode("utf-8"))

            if not c.succeeds(file, count):
                continue
            stats = splits.get(split)
            if not isinstance(stats, dict):
                c.add(mpath, f"domains.{domain}.splits.{split} is missing")
                continue
            for key in ("documents", "bytes"):
                if key in stats and stats[key] != counted[key]:
                    c.add(file, f"holds {counted[key]} {key}, manifest.json says {stats[key]}")


def check_tokenizer(c: Collector, path: Path) -> str | None:
    """The tokenizer loads and its hash equals the one recorded at training; returns the hash."""
    from elmforest.data.tokenizer import TRAINING_FILE, load_tokenizer, tokenizer_hash

    if c.attempt(path, lambda: load_tokenizer(path)) is None:
        return None
    digest = tokenizer_hash(path)
    if (path / TRAINING_FILE).is_file():
        info = c.read_json(path / TRAINING_FILE, TRAINING_FILE)
        recorded = (info or {}).get("tokenizer_hash")
        if recorded is not None and recorded != digest:
            c.add(path / "tokenizer.json", f"tokenizer hash {digest} differs from {recorded} recorded in {TRAINING_FILE}")
    return digest


def tokenizer_files_hash(c: Collector, path: Path) -> str | None:
    """The hash of the tokenizer files a model folder carries (checked), None when it has none."""
    if not (path / "tokenizer.json").is_file():
        return None
    return check_tokenizer(c, path)


def recorded_hash(c: Collector, jpath: Path, recorded: Any, actual: str | None, what: str) -> None:
    """A hash recorded in `jpath` must equal the one the folder's files have (when both are known)."""
    if actual is not None and recorded != actual:
        c.add(jpath, f"{what} {recorded} differs from the folder's own {actual}")


# ---------------------------------------------------------------------------------------------
# Weights against config.json


def load_config(c: Collector, path: Path) -> Any:
    """The folder's config.json as a transformers config, or None (problem recorded)."""
    from transformers import AutoConfig

    cpath = path / "config.json"
    raw = c.read_json(cpath, "config.json")
    if raw is None:
        return None
    try:
        return AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as e:
        c.add(cpath, f"not a Hugging Face model config ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
        return None


def meta_model(config: Any, n_domains: int | None = None) -> Any:
    """The model `config` describes, on the meta device (no memory); a DEMix model of n domains
    (every layer's MLP copied n times, `elmforest.mixtures.demix.to_demix`) when `n_domains` is given."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if n_domains is not None:
            from elmforest.mixtures.demix import to_demix

            to_demix(model, n_domains)
    return model


def expected_tensors(model: Any) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes `model` saves (tied aliases dropped, as `checkpoint.weights_state_dict`)."""
    unique = {name for name, _ in model.named_parameters()}  # tied tensors appear once
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    aliases = every - unique
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in aliases}


def _header_shapes(wpath: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header alone (no checksum; see weight_shapes)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(wpath), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return {}  # verify_weights names the problem


def weight_shapes(c: Collector, wpath: Path) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor in a safetensors file whose checksum holds; None when it does not."""
    from elmforest.models.checkpoint import verify_weights

    if not c.succeeds(wpath, lambda: verify_weights(wpath)):
        return None
    return _header_shapes(wpath)


def demix_domains_in(found: dict[str, tuple[int, ...]]) -> int | None:
    """n when the tensor names are a DEMix model's (domain MLPs 0..n-1), else None."""
    indices = {int(m.group(1)) for k in found if (m := DEMIX_TENSOR.search(k))}
    return max(indices) + 1 if indices else None


def compare_tensors(
    c: Collector, wpath: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], against: str
) -> bool:
    """The file's tensors are exactly `expected` (names and shapes); else one problem naming the first difference."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or extra or wrong:
        what = (f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {extra[0]!r}" if extra
                else f"tensor {wrong[0]!r} has shape {found[wrong[0]]}, {against} implies {expected[wrong[0]]}")
        c.add(wpath, f"weights do not match {against} ({what})")
    return not (missing or extra or wrong)


def check_loading(c: Collector, path: Path) -> Any:
    """Load the folder with `from_pretrained` (how elmforest loads it) and report tensors it lacks
    or does not use; for formats whose file names differ from the module's (a Mixtral saved by
    `save_pretrained` stores per-expert w1/w2/w3, the module fuses them). Returns the model or None."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    wpath = path / "model.safetensors"
    bar_was_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report would list what the problem line says
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "conversion" in detail.lower():  # transformers could not fuse the stored tensors
            detail = "a stored tensor is missing or misshapen, so the weights do not convert into config.json's model"
        c.add(wpath, f"cannot load the model ({detail})")
        return None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar_was_on:
            hf_logging.enable_progress_bar()
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(map(str, info.get(kind) or []))
        if names:
            c.add(wpath, f"weights do not match config.json ({kind.replace('_', ' ')[:-1]} {names[0]!r})")
            return None
    return model


def check_model(c: Collector, path: Path, n_domains: int | None = None) -> Any:
    """config.json parses and the weights match their checksum and the architecture; returns the
    config (None when it does not parse). `n_domains`: the weights are a DEMix model's."""
    config = load_config(c, path)
    if config is None:
        return None
    wpath = path / "model.safetensors"
    if not wpath.is_file():
        c.add(path, "model folder has no model.safetensors")
        return config
    found = weight_shapes(c, wpath)
    if found is None:
        return config
    if config.model_type == "mixtral" and n_domains is None:
        check_loading(c, path)  # saved by save_pretrained: stored names differ from the module's
    else:
        against = "config.json" if n_domains is None else f"config.json as a DEMix model of {n_domains} domains"
        compare_tensors(c, wpath, expected_tensors(meta_model(config, n_domains)), found, against)
    return config


def check_train_state(c: Collector, path: Path) -> dict[str, Any] | None:
    from elmforest.models.checkpoint import load_train_state

    return c.attempt(path, lambda: load_train_state(path))


def check_model_folder(c: Collector, path: Path) -> None:
    """A plain model folder (an average, a fine-tuned copy): the model, and its train state if any."""
    check_model(c, path)
    if (path / "train_state.pt").is_file():
        check_train_state(c, path / "train_state.pt")


# ---------------------------------------------------------------------------------------------
# Experts, training runs, the seed and the dense run


def check_expert(c: Collector, path: Path, base: Path | None = None) -> dict[str, Any] | None:
    """expert.json fields, the model, and the hashes expert.json records equal the folder's own (an
    adapter expert: its PEFT files and its base, `base` inside a forest, `checks.adapters`)."""
    from elmforest.combine.forest import is_adapter_expert, read_expert
    from elmforest.models.factory import arch_hash

    jpath = path / "expert.json"
    meta = c.attempt(path, lambda: read_expert(path))
    if meta is None:
        # read_expert stops at the first issue; still check the weights when they are there
        if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
            check_model(c, path)
        return None
    c.counts(jpath, meta, ("tokens", "flops", "steps"))
    if is_adapter_expert(meta):
        check_adapter_expert(c, path, meta, base)
    else:
        config = check_model(c, path)
        arch = arch_hash(config) if config is not None else None
        if arch is not None and arch != meta["arch_hash"]:
            c.add(jpath, f"arch_hash {meta['arch_hash']} differs from config.json's {arch}")
        tok = tokenizer_files_hash(c, path)
        if tok is not None and tok != meta["tokenizer_hash"]:
            c.add(jpath, f"tokenizer_hash {meta['tokenizer_hash']} differs from the folder's tokenizer {tok}")
    if (path / "train_state.pt").is_file():
        check_train_state(c, path / "train_state.pt")
    check_job(c, path)
    return meta


def check_job(c: Collector, path: Path) -> None:
    """job.json, when the folder has one, validated field by field through the job's own typed
    record (`elmforest.btm.jobs`, what its runner reads): every problem, one line each."""
    from elmforest.btm.jobs import JOB_JSON, job_errors

    jpath = path / JOB_JSON
    if not jpath.is_file():
        return
    data = c.read_json(jpath, JOB_JSON)
    if data is not None:
        for problem in job_errors(data)[1]:
            c.add(jpath, problem)


def check_training(c: Collector, path: Path, n_domains: int | None = None) -> tuple[dict[str, Any] | None, Any]:
    """A training run or a branched expert: possibly mid-way, so only what exists must be sound.

    Weights named like a DEMix model's are checked as one (a DEMix run before demix.json is
    written); `n_domains` says how many domains they must have. Returns (train.json's contents,
    the config), each None when absent or broken."""
    info = None
    if (path / "train.json").is_file():
        info = c.read_json(path / "train.json", "train.json")
        if info is not None and info.get("status") not in ("running", "done", "stopped"):
            c.add(path / "train.json", f"field 'status' is {info.get('status')!r}; expected running, done or stopped")
    check_job(c, path)
    finished = info is not None and info.get("status") in ("done", "stopped")
    config = None
    if (path / "model.safetensors").is_file() or (path / "config.json").is_file() or finished:
        if not (path / "config.json").is_file():
            c.add(path, "model folder has no config.json")
        else:
            if n_domains is None and (path / "model.safetensors").is_file():
                n_domains = demix_domains_in(_header_shapes(path / "model.safetensors"))
            config = check_model(c, path, n_domains)
    if (path / "train_state.pt").is_file():
        check_train_state(c, path / "train_state.pt")
    elif finished:
        c.add(path / "train.json", "status is finished but train_state.pt is missing")
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_bytes().splitlines()
        for i, line in enumerate(lines[:-1], 1):  # the last line may be torn by a kill (harmless)
            try:
                json.loads(line)
            except ValueError:
                c.add(metrics, f"line {i}: not valid JSON")
                break
    return info, config


def check_dense(c: Collector, path: Path) -> None:
    """The dense run (RUN/dense): a training run; once finished, dense.json agrees with train.json."""
    info, _ = check_training(c, path)
    jpath = path / "dense.json"
    if not jpath.is_file():
        return  # still training (or only trained to the seed step)
    dense = c.read_json(jpath, "dense.json")
    if dense is None:
        return
    c.counts(jpath, dense, ("steps", "start_step", "tokens", "flops"))
    for key in ("steps", "tokens", "flops"):
        if key not in dense:
            c.add(jpath, f"field {key!r} is missing")
    result = (info or {}).get("result")
    if isinstance(result, dict) and result.get("steps") != dense.get("steps"):
        c.add(jpath, f"steps {dense.get('steps')} differs from train.json's {result.get('steps')}")
    recorded_hash(c, jpath, dense.get("tokenizer_hash"), tokenizer_files_hash(c, path), "tokenizer_hash")


def check_seed(c: Collector, path: Path) -> None:
    """The seed (RUN/seed): the dense run's snapshot at the seed step, with its AdamW state.

    seed.json's counts are integers, its step is train_state.pt's, and its hashes are those of the
    folder's tokenizer files and config.json (experts branched from it record the same hashes)."""
    from elmforest.models.factory import arch_hash

    jpath = path / "seed.json"
    seed = c.read_json(jpath, "seed.json")
    config = check_model(c, path)
    state = check_train_state(c, path / "train_state.pt")
    if seed is None:
        return
    c.counts(jpath, seed, ("step", "tokens", "flops"))
    for key in ("step", "tokens", "flops", "tokenizer_hash", "arch_hash"):
        if key not in seed:
            c.add(jpath, f"field {key!r} is missing")
    if state is not None and "step" in seed and state.get("step") != seed["step"]:
        c.add(jpath, f"step {seed['step']} differs from train_state.pt's {state.get('step')}")
    recorded_hash(c, jpath, seed.get("arch_hash"), arch_hash(config) if config is not None else None, "arch_hash")
    recorded_hash(c, jpath, seed.get("tokenizer_hash"), tokenizer_files_hash(c, path), "tokenizer_hash")


# ---------------------------------------------------------------------------------------------
# Forest


def check_forest(c: Collector, path: Path) -> None:
    """forest.json well formed, every listed expert present and valid, one tokenizer/architecture."""
    from elmforest.data.corpus import check_domain_name
    from elmforest.combine.forest import FORMAT

    jpath = path / "forest.json"
    data = c.read_json(jpath, "forest.json")
    if data is None:
        return
    if data.get("format") != FORMAT:
        c.add(jpath, f"field 'format' is {data.get('format')!r}; expected {FORMAT!r}")
    hashes = {}
    for key in ("tokenizer_hash", "arch_hash"):
        if not isinstance(data.get(key), str):
            c.add(jpath, f"field {key!r} is missing or not a string")
        else:
            hashes[key] = data[key]
    base = None
    if "base_sha256" in data:  # an adapter forest: its base, and every expert's hash of it
        base = check_adapter_base(c, path, data)
        hashes["base_sha256"] = data["base_sha256"]
    experts = data.get("experts")
    if not isinstance(experts, list):
        c.add(jpath, "field 'experts' must be a list")
        experts = []
    tok_dir = path / "tokenizer"
    if tok_dir.is_dir():
        tok = check_tokenizer(c, tok_dir)
        if tok is not None and "tokenizer_hash" in hashes and tok != hashes["tokenizer_hash"]:
            c.add(jpath, f"tokenizer_hash {hashes['tokenizer_hash']} differs from tokenizer/'s {tok}")
    else:
        c.add(path, "forest has no tokenizer/ folder")
    listed: set[str] = set()
    names: set[str] = set()
    for i, e in enumerate(experts):
        if not isinstance(e, dict) or not all(isinstance(e.get(k), str) for k in ("name", "domain", "path")):
            c.add(jpath, f"experts[{i}] must have string fields name, domain, path")
            continue
        if c.attempt(jpath, lambda e=e: check_domain_name(e["name"], jpath)) is None:
            continue
        if e["name"] in names:
            c.add(jpath, f"experts[{i}]: duplicate expert name {e['name']!r}")
        names.add(e["name"])
        rel = Path(e["path"])
        if rel.is_absolute() or ".." in rel.parts:
            c.add(jpath, f"experts[{i}].path {e['path']!r} escapes the forest folder")
            continue
        edir = path / rel
        listed.add(rel.parts[0] if rel.parts else "")
        if not edir.is_dir():
            c.add(jpath, f"experts[{i}] ({e['name']}) references a missing expert folder {e['path']!r}")
            continue
        meta = check_expert(c, edir, base)
        c.report.checked.append(f"expert {edir}")
        if meta is None:
            continue
        for key, value in hashes.items():
            if meta.get(key) != value:
                c.add(edir / "expert.json", f"{key} {meta.get(key)} differs from forest.json's {value}")
    for sub in child_dirs(path):
        if sub.name not in ("tokenizer", "base") and sub.name not in listed and any(
            (sub / w).exists() for w in ("model.safetensors", "adapter_model.safetensors")
        ):
            c.report.leftovers.append(sub)  # copied in by a merge killed before forest.json changed
