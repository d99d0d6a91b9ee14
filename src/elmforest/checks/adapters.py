"""`elmforest check` on adapter experts and adapter forests (`models.adapters`, `combine.forest`).

    adapter expert   expert.json names its base by content hash; the PEFT files parse and match
                     their checksum; the base folder (FOREST/base inside a forest, else expert.json's
                     `base`) hashes to that value and its config to expert.json's arch_hash; the
                     adapter loads onto it
    adapter forest   FOREST/base hashes to forest.json's base_sha256 (each expert is compared with
                     it by `folders.check_forest`, like the tokenizer and architecture hashes)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from elmforest.checks.problems import Collector


def base_hash(c: Collector, base: Path) -> str | None:
    """The content hash of a base model folder (`models.adapters.base_sha256`), None when unreadable (recorded)."""
    from elmforest.models.adapters import base_sha256

    return c.attempt(base, lambda: base_sha256(base))


def check_adapter_expert(c: Collector, path: Path, meta: dict[str, Any], base: Path | None = None) -> None:
    """An adapter expert against its base: `base` (a forest's), else the folder expert.json names."""
    from elmforest.models.adapters import ADAPTER_WEIGHTS_NAME, load_adapter_model, read_adapter_config
    from elmforest.models.checkpoint import verify_weights
    from elmforest.models.factory import arch_hash

    jpath = path / "expert.json"
    ok = c.succeeds(path, lambda: read_adapter_config(path)) and c.succeeds(path, lambda: verify_weights(path / ADAPTER_WEIGHTS_NAME))
    if base is None:
        recorded = meta.get("base")
        if not isinstance(recorded, str) or not (Path(recorded) / "model.safetensors").is_file():
            c.add(jpath, f"field 'base': the base model folder {recorded!r} is not there (its hash cannot be checked)")
            return
        base = Path(recorded)
    actual = base_hash(c, base)
    if actual is not None and actual != meta["base_sha256"]:
        c.add(jpath, f"base_sha256 {meta['base_sha256']} differs from the base {base}'s {actual}")
        return
    model = c.attempt(path, lambda: load_adapter_model(base, path)) if ok and actual is not None else None
    if model is not None and arch_hash(model.get_base_model().config) != meta["arch_hash"]:
        c.add(jpath, f"arch_hash {meta['arch_hash']} differs from the base's config.json {arch_hash(model.get_base_model().config)}")


def check_adapter_base(c: Collector, forest: Path, data: dict[str, Any]) -> Path | None:
    """An adapter forest's FOREST/base against forest.json's base_sha256 -> the base folder (None: unusable)."""
    from elmforest.combine.forest import BASE_DIR

    jpath, base = forest / "forest.json", forest / BASE_DIR
    if not isinstance(data["base_sha256"], str):
        c.add(jpath, "field 'base_sha256' is not a string")
        return None
    if not (base / "model.safetensors").is_file():
        c.add(forest, f"adapter forest has no base model ({BASE_DIR}/model.safetensors)")
        return None
    actual = base_hash(c, base)
    if actual is not None and actual != data["base_sha256"]:
        c.add(jpath, f"base_sha256 {data['base_sha256']} differs from {BASE_DIR}/'s {actual}")
        return None
    return base
