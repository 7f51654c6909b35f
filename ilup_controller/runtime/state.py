"""Turn a core :class:`Decision` into the published :class:`State` message."""

from __future__ import annotations

import math
from datetime import datetime

from ilup_controller.config.models import CartConfig
from ilup_controller.core.control import Decision
from ilup_controller.core.types import Readings
from ilup_controller.mqtt import messages as msg
from ilup_controller.runtime.ticker import TickStats


def _fresh(readings: Readings, name: str | None, t_s: float, stale_after_s: float) -> float | None:
    if name is None:
        return None
    r = readings.get(name)
    if r is None or t_s - r.t > stale_after_s or not math.isfinite(r.value):
        return None
    return r.value


def build_state(
    cfg: CartConfig,
    d: Decision,
    readings: Readings,
    *,
    seq: int,
    wall: datetime,
    stats: TickStats,
) -> msg.State:
    c = cfg.control
    m = d.measured
    return msg.State(
        t=wall,
        seq=seq,
        cart_id=cfg.cart_id,
        phase=str(d.phase),
        simulated=cfg.simulated,
        measured=msg.Measured(
            flow_ml_min=m.flow_ml_min,
            pressure_mmhg=m.pressure_mmhg,
            temperature_c=m.temperature_c,
            water_temperature_c=m.water_temperature_c,
            pump_speed_rpm=_fresh(readings, c.flow.speed_measured, d.t_s, c.stale_after_s),
        ),
        targets=msg.Targets(
            flow_ml_min=d.flow_target_ml_min,
            flow_ramped_ml_min=d.flow_setpoint_ml_min,
            pressure_limit_mmhg=d.pressure_limit_mmhg,
            temperature_c=d.temperature_target_c,
            temperature_ramped_c=d.temperature_setpoint_c,
        ),
        outputs=msg.Outputs(pump_speed_rpm=d.pump_speed_rpm, heater_pct=d.heater_pct),
        loop=msg.Loop(
            pump_limited_by=d.pump_limited_by,
            heater_limited_by=d.heater_limited_by,
            water_setpoint_c=d.water_setpoint_c,
        ),
        faults=list(d.faults),
        timing=msg.Timing(
            tick_period_s=c.tick_period_s, ticks=stats.ticks, overruns=stats.overruns
        ),
    )
