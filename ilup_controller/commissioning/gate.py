"""May priming start? The daemon asks once at start-up (the answer holds a deadline, so the
24 h age is enforced at the time of the request, in core time: core/cart.py)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal

from ilup_controller.commissioning.results import CommissioningRun, age_h, config_hash, load
from ilup_controller.config.models import CartConfig
from ilup_controller.core.calibration import Calibration
from ilup_controller.core.cart import CartCore


@dataclass(frozen=True, slots=True)
class Gate:
    status: Literal["commissioned", "waived", "not_commissioned"]
    detail: str
    valid_until: datetime | None = None  # commissioned: the run expires then
    run: CommissioningRun | None = None  # the passing run whose calibration applies


def evaluate(cfg: CartConfig, path: Path | None, now: datetime) -> Gate:
    c = cfg.commissioning
    found = load(path) if path is not None else "no commissioning file known"
    run = found if isinstance(found, CommissioningRun) else None
    usable = run is not None and run.passed and run.config_sha256 == config_hash(cfg)
    if c.waive:
        return Gate(
            "waived", f"waived by the configuration: {c.reason}", run=run if usable else None
        )
    if run is None:
        assert isinstance(found, str)
        return Gate("not_commissioned", found)
    if run.config_sha256 != config_hash(cfg):
        return Gate(
            "not_commissioned",
            f"the commissioning run of {run.finished:%Y-%m-%d %H:%M}Z was for another "
            f"configuration (sha256 {run.config_sha256[:12]}, now {config_hash(cfg)[:12]}): "
            "the cart file changed since; run ilup commission again",
        )
    if not run.passed:
        failed = ", ".join(s.id for s in run.steps if s.status == "fail")
        return Gate(
            "not_commissioned",
            f"the last commissioning run ({run.finished:%Y-%m-%d %H:%M}Z) failed at {failed}: "
            "fix it and run ilup commission again",
        )
    hours = age_h(run, now)
    if hours > c.max_age_h:
        return Gate(
            "not_commissioned",
            f"the last passing commissioning run is {hours:.1f} h old (commissioning.max_age_h "
            f"{c.max_age_h:g} h): run ilup commission again",
        )
    until = run.finished + timedelta(hours=c.max_age_h)
    return Gate(
        "commissioned",
        f"commissioned {run.finished:%Y-%m-%d %H:%M}Z by {run.operator}, valid until "
        f"{until:%Y-%m-%d %H:%M}Z",
        valid_until=until,
        run=run,
    )


def apply(core: CartCore, gate: Gate, t_s: float, now: datetime) -> None:
    """Set the gate and the calibration of a passing run on the core (daemon start-up)."""
    if gate.status == "not_commissioned":
        core.priming_block = gate.detail
    elif gate.status == "commissioned" and gate.valid_until is not None:
        core.priming_allowed_until_s = t_s + (gate.valid_until - now).total_seconds()
    run = gate.run
    if run is None:
        return
    cal = core.calibration
    core.set_calibration(
        Calibration(
            run.pressure_zero_mmhg if run.pressure_zero_mmhg is not None else 0.0,
            run.stroke_volume_ml_per_rev or cal.stroke_volume_ml_per_rev,
            f"commissioning {run.finished:%Y-%m-%d %H:%M}Z by {run.operator}",
        )
    )
