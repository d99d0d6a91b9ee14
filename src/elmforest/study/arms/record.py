"""An arm's budget record: `RUN/<arm folder>/arm.json`, the same typed fields for every arm.

    {"arm": "btx", "tokens": 41472, "flops": 2.9e9, "params_at_inference": 151552,
     "extra_tokens": 512, "compute_matched": false}

`tokens` and `flops` count training only, everything the arm's models saw from initialisation
(a forest counts the seed it branched from; BTX counts the BTM forest plus its fine-tune);
`extra_tokens` is the part beyond the shared budget (BTX's fine-tune, router tuning);
`flops_measured` is a count taken by FlopCounterMode where the arm has one. `compute_matched`
says whether the arm trained on the dense baseline's budget. The record is validated on read: a
missing or mistyped field is a one-line `ElmError` naming the file and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from elmforest import storage
from elmforest.errors import ElmError

ARM_JSON = "arm.json"


class ArmRecord(BaseModel):
    """What one trained arm cost and what it runs at inference."""

    model_config = ConfigDict(extra="forbid", strict=True)

    arm: str = Field(description="The arm's name (a key of results.json budget.arms).")
    tokens: int = Field(ge=0, description="Training tokens, everything the arm's models saw (the seed's included).")
    flops: float = Field(ge=0, description="Training FLOPs counted like `tokens`.")
    flops_measured: float | None = Field(None, ge=0, description="FLOPs counted by FlopCounterMode, when measured.")
    params_at_inference: int = Field(ge=0, description="Parameters of every model the arm runs at inference.")
    extra_tokens: int | None = Field(None, ge=0, description="Tokens beyond the shared budget (fine-tuning, router tuning).")
    compute_matched: bool = Field(description="Trained on the dense baseline's budget (tokens and FLOPs).")

    def budget(self) -> dict[str, float | int | bool]:
        """The record as results.json's budget.arms lists it (optional fields only when set)."""
        return self.model_dump(exclude={"arm"}, exclude_none=True)


def _field_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "record"
    msg = "missing" if first["type"] == "missing" else first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"field {field!r}: {msg}"


def read_record(path: Path) -> ArmRecord:
    """Read and validate an arm.json; ElmError naming the file and the field otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ElmError(f"{ARM_JSON} is missing", path) from None
    except (ValueError, UnicodeDecodeError):
        raise ElmError(f"{ARM_JSON} is not valid JSON", path) from None
    if not isinstance(data, dict):
        raise ElmError(f"{ARM_JSON} must be a JSON object", path)
    try:
        # JSON has no int/float distinction for whole numbers: a float field may hold 1e9 written as an int
        return ArmRecord.model_validate({k: float(v) if k in ("flops", "flops_measured") and type(v) is int else v
                                         for k, v in data.items()})
    except ValidationError as e:
        raise ElmError(f"{ARM_JSON}: {_field_error(e)}", path) from None


def write_record(path: Path, record: ArmRecord) -> None:
    storage.write_json(Path(path), record.model_dump(mode="json", exclude_none=True))
