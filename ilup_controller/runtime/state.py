"""Turn core results into the published messages (state, alarms, events)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from ilup_controller.config.models import CartConfig
from ilup_controller.config.resolution import at_resolution, field_decimals, rounded
from ilup_controller.core.alarms import ActiveAlarm
from ilup_controller.core.cart import CoreEvent, TickResult
from ilup_controller.core.control import ControlEvent
from ilup_controller.core.procedure import PhaseEvent
from ilup_controller.mqtt import messages as msg
from ilup_controller.runtime.ticker import TickStats

# Monotonic core time (s) -> UTC wall time, fixed once per daemon run.
UtcOf = Callable[[float], datetime]


_decimals_of: tuple[CartConfig, dict[str, int]] | None = None


def _decimals(cfg: CartConfig) -> dict[str, int]:
    """field_decimals of ``cfg``, worked out once per configuration (not on every tick)."""
    global _decimals_of
    if _decimals_of is None or _decimals_of[0] is not cfg:
        _decimals_of = (cfg, field_decimals(cfg))
    return _decimals_of[1]


def build_state(
    cfg: CartConfig,
    r: TickResult,
    *,
    seq: int,
    utc_of: UtcOf,
    stats: TickStats,
    calibration: msg.Calibration | None = None,
    commissioning: msg.Commissioning | None = None,
) -> msg.State:
    m, loop = r.measured, r.loop
    d = _decimals(cfg)  # each value at its signal's resolution: no float noise

    def at(key: str, value: float) -> float:
        return at_resolution(value, key, d)

    return msg.State(
        t=utc_of(r.t_s),
        seq=seq,
        cart_id=cfg.cart_id,
        phase=str(r.phase),
        simulated=cfg.simulated,
        measured=msg.Measured(
            flow_ml_min=rounded(m.flow_ml_min, "flow_ml_min", d),
            pressure_mmhg=rounded(m.pressure_mmhg, "pressure_mmhg", d),
            temperature_c=rounded(m.temperature_c, "temperature_c", d),
            water_temperature_c=rounded(m.water_temperature_c, "water_temperature_c", d),
            pump_speed_rpm=rounded(m.pump_speed_rpm, "pump_speed_rpm_measured", d),
            reservoir_volume_ml=rounded(m.reservoir_volume_ml, "reservoir_volume_ml", d),
        ),
        targets=msg.Targets(
            flow_ml_min=at("flow_target_ml_min", r.flow_target_ml_min),
            flow_ramped_ml_min=at("flow_ramped_ml_min", loop.flow_setpoint_ml_min),
            pressure_limit_mmhg=at("pressure_limit_mmhg", r.pressure_limit_mmhg),
            temperature_c=at("temperature_target_c", r.temperature_target_c),
            temperature_ramped_c=at("temperature_ramped_c", loop.temperature_setpoint_c),
        ),
        outputs=msg.Outputs(
            pump_speed_rpm=at("pump_speed_rpm", loop.pump_speed_rpm),
            heater_pct=at("heater_pct", loop.heater_pct),
        ),
        loop=msg.Loop(
            pump_limited_by=loop.pump_limited_by,
            heater_limited_by=loop.heater_limited_by,
            water_setpoint_c=rounded(loop.water_setpoint_c, "water_setpoint_c", d),
            rate_integral_scale=loop.rate_integral_scale,
        ),
        drug_phase=msg.DrugPhase(
            elapsed_s=at("drug_elapsed_s", r.drug_elapsed_s),
            remaining_s=at("drug_remaining_s", r.drug_remaining_s),
            counting=r.drug_counting,
        ),
        active_alarms=[a.alarm_id for a in r.alarms],
        timing=msg.Timing(
            tick_period_s=cfg.control.tick_period_s, ticks=stats.ticks, overruns=stats.overruns
        ),
        calibration=calibration,
        commissioning=commissioning,
    )


def build_alarms(cfg: CartConfig, r: TickResult, *, utc_of: UtcOf) -> msg.Alarms:
    return msg.Alarms(
        t=utc_of(r.t_s),
        cart_id=cfg.cart_id,
        audio_paused_until=(
            None if r.audio_paused_until_s is None else utc_of(r.audio_paused_until_s)
        ),
        alarms=[_alarm(a, utc_of) for a in r.alarms],
    )


def _alarm(a: ActiveAlarm, utc_of: UtcOf) -> msg.Alarm:
    return msg.Alarm(
        id=a.alarm_id,
        priority=str(a.priority),
        presence=str(a.presence),
        acknowledged=a.acknowledged,
        audible=a.audible,
        since=utc_of(a.onset_s),
        message=a.message,
        value=a.value,
        limit=a.limit,
    )


def build_event(cfg: CartConfig, e: CoreEvent, *, seq: int, utc_of: UtcOf) -> msg.Event:
    if isinstance(e, ControlEvent):
        return msg.Event(
            t=utc_of(e.t_s),
            seq=seq,
            cart_id=cfg.cart_id,
            kind=e.kind,
            message=e.message,
            value=e.value,
        )
    if isinstance(e, PhaseEvent):
        return msg.Event(
            t=utc_of(e.t_s),
            seq=seq,
            cart_id=cfg.cart_id,
            kind="phase",
            from_phase=str(e.from_phase),
            to_phase=str(e.to_phase),
            message=f"phase {e.from_phase} -> {e.to_phase}: {e.reason}",
            operator=e.operator,
        )
    return msg.Event(
        t=utc_of(e.t_s),
        seq=seq,
        cart_id=cfg.cart_id,
        kind=e.kind,
        alarm_id=e.alarm_id,
        priority=e.priority,
        message=e.message,
        operator=e.operator,
        value=e.value,
        limit=e.limit,
    )
