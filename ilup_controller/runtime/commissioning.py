"""The daemon's side of commissioning: read the gate once at start-up, set it and the
calibration on the core, and describe both for the state (cached: built only on change)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from ilup_controller.commissioning.gate import Gate, apply, evaluate
from ilup_controller.commissioning.results import results_path
from ilup_controller.config.models import CartConfig
from ilup_controller.core.calibration import Calibration
from ilup_controller.core.cart import CartCore
from ilup_controller.mqtt import messages as msg

log = logging.getLogger("ilup.commissioning")


class CommissioningEdge:
    def __init__(self, cfg: CartConfig, cart_file: str | None) -> None:
        self._cfg = cfg
        self.path: Path | None = None
        if cart_file is not None:
            self.path = results_path(cfg, cart_file)
        elif cfg.commissioning.file is not None:
            self.path = Path(cfg.commissioning.file)
        self.gate: Gate | None = None
        self._cal: tuple[Calibration, msg.Calibration] | None = None
        self._gate_msg: msg.Commissioning | None = None

    def start(self, core: CartCore, t_s: float) -> list[str]:
        """Evaluate and apply; the lines to record (and log)."""
        now = datetime.now(UTC)
        gate = self.gate = evaluate(self._cfg, self.path, now)
        apply(core, gate, t_s, now)
        self._gate_msg = msg.Commissioning(
            status=gate.status, detail=gate.detail, valid_until=gate.valid_until
        )
        lines = [f"{gate.status}: {gate.detail}"]
        if gate.run is not None:
            lines.append(f"results ({self.path}): {gate.run.summary()}")
            lines.extend(f"{s.id} {s.status}: {s.measured}" for s in gate.run.steps if s.measured)
        cal = core.calibration
        lines.append(
            f"calibration applied: pressure zero {cal.pressure_zero_mmhg:+.2f} mmHg, stroke "
            f"volume {cal.stroke_volume_ml_per_rev:.2f} mL/rev ({cal.source})"
        )
        level = logging.WARNING if gate.status == "not_commissioned" else logging.INFO
        for line in lines[:2] + lines[-1:]:
            log.log(level, "%s", line)
        return lines

    def state(self, core: CartCore) -> tuple[msg.Calibration, msg.Commissioning | None]:
        cal = core.calibration
        if self._cal is None or self._cal[0] is not cal:
            self._cal = (
                cal,
                msg.Calibration(
                    pressure_zero_mmhg=round(cal.pressure_zero_mmhg, 3),
                    stroke_volume_ml_per_rev=round(cal.stroke_volume_ml_per_rev, 3),
                    source=cal.source,
                ),
            )
        return self._cal[1], self._gate_msg
