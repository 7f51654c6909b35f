"""The ``calibrate`` operator command: zero the pressure transducer, set the stroke volume.

Allowed in idle with the pump stopped only (a zero taken with flow, or a feed-forward changed
under a running pump, would be a step on the lung). The outcome is a command event like any
other, so the record holds who calibrated what, from which value to which.
"""

from __future__ import annotations

from ilup_controller.commands.models import CalibrateCommand, ReasonCode
from ilup_controller.commissioning.evaluate import zero_reference_mmhg
from ilup_controller.core.calibration import Calibration
from ilup_controller.core.cart import CartCore
from ilup_controller.core.procedure import Phase

MAX_ZERO_MMHG = 10.0  # a larger offset is a line not open to atmosphere, not a zero
STROKE_VOLUME_BAND = 0.25  # a measured stroke volume within 25 % of the configured one
PUMP_STOPPED_RPM = 0.5


def calibrate(
    c: CalibrateCommand, core: CartCore, t_s: float, operator: str
) -> tuple[ReasonCode | None, str]:
    cfg = core.cfg
    if core.procedure.phase is not Phase.idle:
        return "not_allowed_in_phase", (
            f"calibrate {c.action}: only in idle (phase is {core.procedure.phase})"
        )
    m = core.last_measured
    tacho = None if m is None else m.pump_speed_rpm
    commanded = core.last_pump_command_rpm
    if commanded > 0.0 or (tacho is not None and tacho > PUMP_STOPPED_RPM):
        return "refused", (
            f"calibrate {c.action}: the pump runs (command {commanded:g} rpm, tacho "
            f"{tacho if tacho is not None else '?'} rpm): stop it first"
        )
    old = core.calibration
    if c.action == "zero_pressure":
        got = core.zeroing.mean_over_window(t_s, cfg.control.stale_after_s)
        if isinstance(got, str):
            return "refused", f"calibrate zero_pressure: {got}"
        mean_mmhg, n = got
        zero = mean_mmhg - zero_reference_mmhg(cfg)
        if abs(zero) > MAX_ZERO_MMHG:
            return "out_of_range", (
                f"calibrate zero_pressure: offset {zero:+.2f} mmHg is more than "
                f"{MAX_ZERO_MMHG:g} mmHg: is the transducer open to atmosphere?"
            )
        core.set_calibration(
            Calibration(zero, old.stroke_volume_ml_per_rev, f"operator {operator}")
        )
        return None, (
            f"pressure zero {old.pressure_zero_mmhg:+.2f} -> {zero:+.2f} mmHg "
            f"(mean of {n} readings over 5 s)"
        )
    sv = c.stroke_volume_ml_per_rev
    assert sv is not None
    configured = cfg.control.flow.stroke_volume_ml_per_rev
    if abs(sv / configured - 1.0) > STROKE_VOLUME_BAND:
        return "out_of_range", (
            f"calibrate.stroke_volume_ml_per_rev: {sv:g} is more than "
            f"{STROKE_VOLUME_BAND * 100:.0f} % from the configured {configured:g}: check the "
            "tubing size in the pump head and control.flow.stroke_volume_ml_per_rev"
        )
    core.set_calibration(Calibration(old.pressure_zero_mmhg, sv, f"operator {operator}"))
    return None, f"stroke volume {old.stroke_volume_ml_per_rev:.2f} -> {sv:.2f} mL/rev"
