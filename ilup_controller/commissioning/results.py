"""The commissioning file: one JSON document next to the cart file, written by
``ilup commission`` and read by the daemon (the gate and the calibration it applies)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from ilup_controller.config.models import CartConfig
from ilup_controller.record.recorder import config_json_of, config_sha256

SUFFIX = ".commissioning.json"


class StepResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    title: str
    status: Literal["pass", "fail", "warn", "skipped"]
    did: str = Field(description="What the step did.")
    measured: str = Field("", description="What it measured, with units.")
    fix: str = Field("", description="What to fix when it did not pass.")
    figures: dict[str, float] = Field(default_factory=dict)
    confirmed_by: str | None = None


class CommissioningRun(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cart_id: str
    config_sha256: str
    started: AwareDatetime
    finished: AwareDatetime
    operator: str
    passed: bool
    pressure_zero_mmhg: float | None = Field(None, description="Offset to subtract, mmHg.")
    stroke_volume_ml_per_rev: float | None = Field(
        None, description="Stroke volume to use (the measured one when accepted)."
    )
    stroke_volume_measured_ml_per_rev: float | None = None
    steps: list[StepResult]

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        parts = [f"commissioning {verdict} {self.finished:%Y-%m-%d %H:%M}Z by {self.operator}"]
        if self.pressure_zero_mmhg is not None:
            parts.append(f"pressure zero {self.pressure_zero_mmhg:+.2f} mmHg")
        if self.stroke_volume_ml_per_rev is not None:
            parts.append(f"stroke volume {self.stroke_volume_ml_per_rev:.2f} mL/rev")
        failed = [s.id for s in self.steps if s.status == "fail"]
        if failed:
            parts.append("failed: " + ", ".join(failed))
        parts.append(f"config sha256 {self.config_sha256[:12]}")
        return "; ".join(parts)


def config_hash(cfg: CartConfig) -> str:
    """The SHA-256 the procedure record stores for this configuration."""
    return config_sha256(config_json_of(cfg))


def results_path(cfg: CartConfig, cart_file: str | Path) -> Path:
    if cfg.commissioning.file is not None:
        p = Path(cfg.commissioning.file)
        return p if p.is_absolute() else Path(cart_file).parent / p
    cart = Path(cart_file)
    stem = cart.name.removesuffix(".yaml").removesuffix(".yml")
    return cart.with_name(stem + SUFFIX)


def save(run: CommissioningRun, path: Path) -> None:
    """Written whole (temporary file, fsync, rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    data = run.model_dump(mode="json")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path) -> CommissioningRun | str:
    """The run in ``path``, or why there is none usable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return f"no commissioning file {path}: run ilup commission"
    except OSError as e:
        return f"commissioning file {path} unreadable: {e}"
    try:
        raw: Any = json.loads(text)
        return CommissioningRun.model_validate(raw)
    except ValueError as e:
        return f"commissioning file {path} is not valid: {str(e).splitlines()[0]}"


def age_h(run: CommissioningRun, now: datetime) -> float:
    return (now - run.finished).total_seconds() / 3600.0
