"""Parameter averaging: combine experts' weights into one model (BTM's "average").

Every method is a small function in `AVERAGING_METHODS`. It receives the expert names, the
user's weights (or None) and the `AverageOptions`, validates them, and returns a `MergePlan`:
which experts' tensors it needs and how to merge one tensor (all in float32). The drivers
apply the plan tensor by tensor:

    uniform           merged = (1/n) sum_i expert_i                       (known to be poor)
    argmax            merged = expert_{argmax w}        (w: a prior, e.g. the cached prior)
    posterior         merged = sum_i w_i expert_i       (w: a prior over experts)
    weighted          merged = sum_i w_i expert_i       (w: explicit weights)
    task_arithmetic   merged = seed + scale * sum_i (expert_i - seed)     (scale default 1/n)
    ties              merged = seed + scale * disjoint_mean(trim(expert_i - seed))  (TIES-merging)

Weights must be non-negative and sum to 1 (within 1e-6); weights that do not are refused unless
`normalise=True`, which divides them by their sum. Weights are a list in expert order or a
mapping {expert name: weight} (names missing from the mapping get weight 0).

`average_folders` streams: for each tensor name it loads that tensor from every expert that
is needed (safetensors `safe_open`), merges in float32 and casts back, so memory stays near
one model for the output plus one tensor per expert, not n models. Tied embeddings: a folder
written by `save_pretrained` omits `lm_head.weight`, an in-memory `state_dict()` holds it;
tensors are merged under the key set the inputs have, which must be the same for every input.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from elmforest import storage
from elmforest.models.checkpoint import write_safetensors
from elmforest.errors import ElmError, require

WEIGHTS_FILE = "model.safetensors"
# Copied from the first expert so the output folder is a complete Hugging Face model folder.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)
SUM_TOLERANCE = 1e-6

TensorMerge = Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor]
WeightsLike = Sequence[float] | Mapping[str, float] | torch.Tensor


@dataclass(frozen=True)
class AverageOptions:
    """Knobs some methods read; the others ignore them."""

    normalise: bool = False  # divide weights by their sum instead of refusing a sum != 1
    scale: float | None = None  # task_arithmetic (default 1/n) and ties (default 1.0): lambda
    density: float = 0.2  # ties: fraction of each task vector's entries kept, by magnitude


@dataclass(frozen=True)
class MergePlan:
    """What a method needs and does: merge(tensors of the experts in `use`, seed tensor)."""

    merge: TensorMerge  # float32 tensors of one name -> merged float32 tensor
    use: tuple[int, ...]  # indices of the experts whose tensors merge() receives, in order
    weights: list[float] | None  # effective weight per expert (average.json); None if not linear
    needs_seed: bool = False


# --- weights ------------------------------------------------------------------------------


def resolve_weights(weights: WeightsLike | None, names: Sequence[str]) -> torch.Tensor | None:
    """Weights as a float64 vector in expert order; a mapping is keyed by expert name."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ElmError(
                f"unknown expert name(s) {', '.join(map(repr, unknown))} in weights; "
                f"experts are {', '.join(names)}"
            )
        return torch.tensor([float(weights.get(n, 0.0)) for n in names], dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
    require(w.numel() == len(names), f"got {w.numel()} weights for {len(names)} experts ({', '.join(names)})")
    return w


def check_weights(
    weights: torch.Tensor | None, names: Sequence[str], method: str, normalise: bool
) -> torch.Tensor:
    """Validate a weight vector: finite, non-negative, summing to 1 (or rescaled if `normalise`)."""
    require(weights is not None, f"averaging method {method!r} needs weights (one per expert)")
    for name, w in zip(names, weights.tolist()):
        require(math.isfinite(w), f"weight for expert {name!r} is not finite ({w})")
        require(w >= 0, f"weight for expert {name!r} is negative ({w})")
    total = float(weights.sum())
    require(total > 0, "weights are all zero")
    if abs(total - 1.0) > SUM_TOLERANCE:
        require(normalise, f"weights sum to {total:.8g}, not 1; refusing (pass normalise=True to rescale them)")
        weights = weights / total
    return weights


def _refuse_weights(weights: torch.Tensor | None, method: str) -> None:
    require(weights is None, f"averaging method {method!r} takes no weights")


# --- methods ------------------------------------------------------------------------------


def _linear(weights: torch.Tensor) -> MergePlan:
    """merged = sum_i w_i expert_i, reading only experts with w_i > 0."""
    use = tuple(i for i, w in enumerate(weights.tolist()) if w > 0)
    coeffs = [float(weights[i]) for i in use]

    def merge(tensors: list[torch.Tensor], seed: torch.Tensor | None) -> torch.Tensor:
        acc = torch.zeros_like(tensors[0], dtype=torch.float32)
        for c, t in zip(coeffs, tensors):
            acc.add_(t, alpha=c)
        return acc

    return MergePlan(merge=merge, use=use, weights=weights.tolist())


def uniform(names: Sequence[str], weights: torch.Tensor | None, options: AverageOptions) -> MergePlan:
    """The plain mean of all experts."""
    _refuse_weights(weights, "uniform")
    n = len(names)
    return _linear(torch.full((n,), 1.0 / n, dtype=torch.float64))


def argmax(names: Sequence[str], weights: torch.Tensor | None, options: AverageOptions) -> MergePlan:
    """The single expert with the largest prior entry (first one on ties)."""
    w = check_weights(weights, names, "argmax", options.normalise)
    one_hot = torch.zeros_like(w)
    one_hot[int(torch.argmax(w))] = 1.0
    return _linear(one_hot)


def weighted(names: Sequence[str], weights: torch.Tensor | None, options: AverageOptions) -> MergePlan:
    """sum_i w_i expert_i with explicit weights."""
    return _linear(check_weights(weights, names, "weighted", options.normalise))


def posterior(names: Sequence[str], weights: torch.Tensor | None, options: AverageOptions) -> MergePlan:
    """sum_i w_i expert_i with w a prior over experts (the cached prior): BTM's best average."""
    return _linear(check_weights(weights, names, "posterior", options.normalise))


def task_arithmetic(names: Sequence[str], weights: torch.Tensor | None, options: AverageOptions) -> MergePlan:
    """seed + scale * sum_i (expert_i - seed) (Ilharco et al. 2023).

    scale defaults to 1/n, which makes this exactly the uniform average (the seed cancels);
    values above 1/n (0.3-1.0 for a few experts) extrapolate along the task vectors.
    """
    _refuse_weights(weights, "task_arithmetic")
    scale = options.scale if options.scale is not None else 1.0 / len(names)

    def merge(tensors: list[torch.Tensor], seed: torch.Tensor | None) -> torch.Tensor:
        assert seed is not None
        total = torch.zeros_like(seed)
        for t in tensors:
            total += t - seed
        return seed + scale * total

    return MergePlan(merge=merge, use=tuple(range(len(names))), weights=None, needs_seed=True)


def ties(names: Sequence[str], weights: torch.Tensor | None, options: AverageOptions) -> MergePlan:
    """TIES-merging (Yadav et al. 2023), per tensor, relative to the seed.

    1. trim: keep the `density` fraction of each task vector tau_i = expert_i - seed with the
       largest magnitude, zero the rest;
    2. elect: the sign of each entry is sign(sum_i trimmed tau_i) (the sign with more mass);
    3. disjoint mean: average, per entry, only the trimmed tau_i that agree with that sign;
    merged = seed + scale * that mean (scale defaults to 1).
    """
    _refuse_weights(weights, "ties")
    density = options.density
    require(0.0 < density <= 1.0, f"ties density must be in (0, 1], got {density}")
    scale = options.scale if options.scale is not None else 1.0

    def merge(tensors: list[torch.Tensor], seed: torch.Tensor | None) -> torch.Tensor:
        assert seed is not None
        tau = torch.stack([(t - seed).reshape(-1) for t in tensors])  # [n, numel]
        numel = tau.shape[1]
        keep = max(1, math.ceil(density * numel))
        # the keep-th largest magnitude of each task vector is its trimming threshold
        threshold = tau.abs().kthvalue(numel - keep + 1, dim=1, keepdim=True).values  # [n, 1]
        trimmed = torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))
        elected = torch.sign(trimmed.sum(dim=0))  # [numel]
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(dim=0).clamp(min=1)
        merged_tau = (trimmed * agree).sum(dim=0) / count
        return seed + scale * merged_tau.reshape(seed.shape)

    return MergePlan(merge=merge, use=tuple(range(len(names))), weights=None, needs_seed=True)


AVERAGING_METHODS: dict[str, Callable[[Sequence[str], torch.Tensor | None, AverageOptions], MergePlan]] = {
    "uniform": uniform,
    "argmax": argmax,
    "posterior": posterior,
    "weighted": weighted,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
}


def make_plan(
    method: str, names: Sequence[str], weights: WeightsLike | None, options: AverageOptions, has_seed: bool
) -> MergePlan:
    """Look the method up, validate its weights, and check the seed is there if it needs one."""
    require(len(names) >= 1, "averaging needs at least one expert")
    if method not in AVERAGING_METHODS:
        raise ElmError(f"unknown averaging method {method!r}; choose one of {', '.join(AVERAGING_METHODS)}")
    plan = AVERAGING_METHODS[method](list(names), resolve_weights(weights, names), options)
    require(not plan.needs_seed or has_seed, f"averaging method {method!r} needs the seed model (seed_dir / seed)")
    return plan


# --- drivers ------------------------------------------------------------------------------


def check_same_tensors(shapes: Sequence[Mapping[str, tuple[int, ...]]], labels: Sequence[str]) -> None:
    """Every input must hold the same tensor names with the same shapes; name the first offender."""
    ref, ref_label = shapes[0], labels[0]
    for other, label in zip(shapes[1:], labels[1:]):
        for key in ref:
            require(key in other, f"tensor {key!r} is in {ref_label} but missing from {label}")
            require(
                tuple(ref[key]) == tuple(other[key]),
                f"tensor {key!r} has shape {tuple(ref[key])} in {ref_label} but {tuple(other[key])} in {label}",
            )
        for key in other:
            require(key in ref, f"tensor {key!r} is in {label} but missing from {ref_label}")


def merge_tensor(plan: MergePlan, key: str, tensors: list[torch.Tensor], seed: torch.Tensor | None) -> torch.Tensor:
    """Merge one tensor in float32 and cast back to the first expert's dtype.

    Non-floating tensors (integer buffers) are not averaged: they must agree and are copied.
    """
    first = tensors[0]
    if not first.is_floating_point():
        for t in tensors[1:]:
            require(torch.equal(t, first), f"integer tensor {key!r} differs between experts; cannot average it")
        return first.clone()
    seed32 = seed.float() if seed is not None else None
    return plan.merge([t.float() for t in tensors], seed32).to(first.dtype)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: WeightsLike | None = None,
    method: str = "uniform",
    seed: Mapping[str, torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
    options: AverageOptions = AverageOptions(),
) -> dict[str, torch.Tensor]:
    """Average in memory: state dicts (expert order) -> merged state dict (same keys, dtypes).

    names label the experts in messages and weight mappings (default expert0, expert1, ...).
    """
    names = list(names) if names is not None else [f"expert{i}" for i in range(len(state_dicts))]
    require(len(names) == len(state_dicts), f"{len(names)} names for {len(state_dicts)} state dicts")
    plan = make_plan(method, names, weights, options, has_seed=seed is not None)
    inputs = list(state_dicts) + ([seed] if plan.needs_seed else [])
    labels = names + (["seed"] if plan.needs_seed else [])
    check_same_tensors([{k: tuple(v.shape) for k, v in sd.items()} for sd in inputs], labels)
    out = {}
    with torch.no_grad():
        for key in state_dicts[0]:
            tensors = [state_dicts[i][key] for i in plan.use]
            out[key] = merge_tensor(plan, key, tensors, seed[key] if plan.needs_seed else None)
    return out


def _weights_file(folder: Path) -> Path:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ElmError(f"no {WEIGHTS_FILE} here (sharded or .bin checkpoints are not supported)", folder)
    return path


def average_folders(
    expert_dirs: Sequence[str | Path],
    weights: WeightsLike | None,
    method: str,
    out_dir: str | Path,
    seed_dir: str | Path | None = None,
    options: AverageOptions = AverageOptions(),
) -> Path:
    """Average saved Hugging Face model folders into a new folder, one tensor at a time.

    Writes out_dir/model.safetensors, copies config.json (and tokenizer / generation files, if
    present) from the first expert, and records average.json {method, experts, weights, ...}.
    Experts are named by their folder names. out_dir must not exist; it appears complete or not
    at all. The seed is read only by methods that need it.
    """
    dirs = [Path(d) for d in expert_dirs]
    require(len(dirs) >= 1, "averaging needs at least one expert folder")
    names = [d.name for d in dirs]
    if isinstance(weights, Mapping):
        require(
            len(set(names)) == len(names),
            f"expert folder names are not unique ({', '.join(names)}); pass weights as a list",
        )
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ElmError("output folder already exists; choose a new one", out_dir)
    files = [_weights_file(d) for d in dirs]
    require((dirs[0] / "config.json").is_file(), "no config.json to copy", dirs[0])
    plan = make_plan(method, names, weights, options, has_seed=seed_dir is not None)
    seed_file = _weights_file(Path(seed_dir)) if plan.needs_seed else None

    merged: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        seed_handle = None
        if seed_file is not None:
            seed_handle = stack.enter_context(safe_open(str(seed_file), framework="pt", device="cpu"))
        inputs = handles + ([seed_handle] if seed_handle is not None else [])
        labels = [str(d) for d in dirs] + ([f"seed {seed_dir}"] if seed_handle is not None else [])
        check_same_tensors([{k: tuple(h.get_slice(k).get_shape()) for k in h.keys()} for h in inputs], labels)
        for key in handles[0].keys():
            tensors = [handles[i].get_tensor(key) for i in plan.use]  # one tensor per expert in memory
            seed_t = seed_handle.get_tensor(key) if seed_handle is not None else None
            merged[key] = merge_tensor(plan, key, tensors, seed_t)
            del tensors, seed_t

    record = {
        "method": method,
        "experts": names,
        "expert_paths": [str(d) for d in dirs],
        "weights": plan.weights,
        "seed": str(seed_dir) if plan.needs_seed else None,
        "scale": options.scale,
        "density": options.density if method == "ties" else None,
        "normalised": options.normalise,
    }
    with storage.atomic_dir(out_dir) as tmp:
        write_safetensors(merged, tmp / WEIGHTS_FILE)  # with the checksum, like every checkpoint
        for name in COPIED_FILES:
            src = dirs[0] / name
            if src.is_file():
                storage.write_bytes(tmp / name, src.read_bytes())
        storage.write_json(tmp / "average.json", record)
    return out_dir
