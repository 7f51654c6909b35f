"""Evaluates every alarm condition of the catalogue once per tick, from measurements only.

Sensor plausibility first (core/sensors.py): an unusable reading becomes None for the loops and a
sensor alarm condition. Then the process conditions (pressure, flow, temperature, volume, air),
the equipment conditions (device links, pump tacho, heater supervision in the style of Klipper's
verify_heater, tick overruns, the remote link). Returns plain :class:`Condition` values; the
alarm engine debounces and latches them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

from ilup_controller.config.models import CartConfig
from ilup_controller.core.alarms import Condition
from ilup_controller.core.catalogue import HEATER_CONTRIBUTES_C
from ilup_controller.core.diagnostics import Inputs, ProcessDiagnostics
from ilup_controller.core.procedure import RUNNING, Phase
from ilup_controller.core.rewarm import RateEstimator
from ilup_controller.core.sensors import SensorCheck, resolution_of
from ilup_controller.core.types import Readings, value_type

STARTUP_GRACE_S = 5.0  # a sensor never read is a fault only after this long
SERVO_STOP = "pressure_servo_stop"  # the loop stopped the pump ahead of the stop limit


@value_type
class Measured:
    """Usable measurements (None = missing, stale or implausible; never a made-up 0)."""

    flow_ml_min: float | None
    pressure_mmhg: float | None
    temperature_c: float | None
    water_temperature_c: float | None
    pump_speed_rpm: float | None = None
    reservoir_volume_ml: float | None = None
    air_detected: bool | None = None


@value_type
class Context:
    """What the rest of the core decided last tick, for the conditions that compare with it."""

    phase: Phase
    flow_setpoint_ml_min: float
    flow_target_ml_min: float
    temperature_setpoint_c: float
    temperature_target_c: float
    pressure_limit_mmhg: float
    pump_command_rpm: float
    heater_pct: float
    heater_enabled: bool
    water_setpoint_c: float | None
    pump_limited_by: str = ""
    flow_leads: bool = True  # constant-flow, automatic: a low flow is a deviation
    devices_down: tuple[str, ...] = ()
    overruns_total: int = 0
    remote_ok: bool = True
    recorder_problem: str = ""  # why the procedure record is not being written ("" = fine)
    identity_clash: str = ""  # another client uses this cart_id on the broker ("" = none seen)
    guard_problem: str = ""  # why the configured `ilup guard` is not watching ("" = it is)


def _held_by_pressure(pressure_mmhg: float, ctx: Context) -> str:
    """Why a constant flow stays under its target, and what to do, when the pressure limiter
    holds the pump: the drug timer counts only at target, so the procedure would wait."""
    if ctx.pump_limited_by != "pressure":
        return ""
    return (
        f": the pressure limiter holds the pump at {pressure_mmhg:.1f} mmHg (limit "
        f"{ctx.pressure_limit_mmhg:g} mmHg); this lung takes no more flow below it. The drug "
        "timer counts only at target flow: lower the flow target, or switch to constant "
        "pressure"
    )


class _Trend:
    """Rate of change over a window from samples kept at >= 1 s spacing."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, t_s: float, value: float | None) -> float | None:
        if value is None:
            return None
        if not self._samples or t_s - self._samples[-1][0] >= 1.0:
            self._samples.append((t_s, value))
        while len(self._samples) > 2 and t_s - self._samples[1][0] >= self._window_s:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        if t_s - t0 < self._window_s * 0.9:
            return None  # not enough history yet
        return (value - v0) / (t_s - t0) * 60.0  # per minute

    def clear(self) -> None:
        self._samples.clear()


class _HeaterSupervision:
    """verify_heater (Klipper): while short of the water setpoint the water must rise by
    ``gain`` every ``check_gain_time``; once it stops doing so, the shortfall accumulates and
    a cumulative error above ``max_error`` is a fault."""

    def __init__(
        self, hysteresis_c: float, max_error_c_s: float, gain_c: float, check_s: float
    ) -> None:
        self._hyst, self._max_error, self._gain, self._check = (
            hysteresis_c,
            max_error_c_s,
            gain_c,
            check_s,
        )
        self.reset()

    def reset(self) -> None:
        self.error_c_s = 0.0
        self._approaching = False
        self._goal_c = 0.0
        self._goal_t_s = 0.0

    def update(self, t_s: float, dt_s: float, water_c: float, setpoint_c: float) -> str:
        floor = setpoint_c - self._hyst
        if water_c >= floor:
            self.reset()
            return ""
        if not self._approaching and self.error_c_s == 0.0:
            self._approaching = True
            self._goal_c, self._goal_t_s = water_c + self._gain, t_s + self._check
        if self._approaching:
            if water_c >= self._goal_c:
                self._goal_c, self._goal_t_s = water_c + self._gain, t_s + self._check
            elif t_s >= self._goal_t_s:
                self._approaching = False
                self.error_c_s = 1e-12  # from now on the shortfall accumulates
            return ""
        self.error_c_s += (floor - water_c) * dt_s
        if self.error_c_s >= self._max_error:
            return (
                f"water {water_c:.1f} degC stays below setpoint {setpoint_c:.1f} degC "
                f"(cumulative error {self.error_c_s:.0f} degC*s)"
            )
        return ""


class Monitor:
    def __init__(self, cfg: CartConfig, t0_s: float) -> None:
        self._cfg = cfg
        a, c = cfg.alarms, cfg.control
        stale = c.stale_after_s

        def lsb(signal: str | None) -> float:
            if signal is None:
                return 0.0
            sig = cfg.signals[signal]
            return resolution_of(sig.scale, str(sig.data_type))

        def check(label: str, signal: str | None, limits_name: str) -> SensorCheck | None:
            if signal is None:
                return None
            return SensorCheck(
                label, getattr(a, limits_name), cfg.signals[signal].range, stale, lsb(signal)
            )

        self._checks: dict[str, tuple[str, SensorCheck | None]] = {
            "sensor_pressure": (
                c.pressure.measured,
                check("pressure", c.pressure.measured, "pressure"),
            ),
            "sensor_flow": (c.flow.measured, check("flow", c.flow.measured, "flow")),
            "sensor_temperature": (
                c.temperature.measured,
                check("temperature", c.temperature.measured, "temperature"),
            ),
            "sensor_water": (
                c.temperature.water_measured,
                check("water", c.temperature.water_measured, "water"),
            ),
            "sensor_reservoir": (
                c.reservoir_measured or "",
                check("reservoir", c.reservoir_measured, "reservoir"),
            ),
        }
        self._check_of = {k: chk for k, (_, chk) in self._checks.items()}
        self._diagnostics = ProcessDiagnostics(
            c.flow.stroke_volume_ml_per_rev,
            lsb(c.flow.measured),
            lsb(c.pressure.measured),
            lsb(c.temperature.measured),
        )
        self._t0_s = t0_s
        self._ever_ok: set[str] = set()
        self._heating = _Trend(a.heating_rate_window_s)
        self._heating_lsb_c_per_min = lsb(c.temperature.measured) / a.heating_rate_window_s * 60.0
        self._volume = _Trend(a.leak_window_s)
        # The water's slope while the heater is commanded 0 (a line through one-second means:
        # a single noisy reading does not make a rise), and since when it is at 0.
        self._water_off = RateEstimator(a.heater_off_window_s)
        self._water_off_since_s: float | None = None
        self._water_off_low_c: float | None = None  # the lowest of that line since then
        self._water_off_lsb_c_per_min = (
            2.0 * lsb(c.temperature.water_measured) / a.heater_off_window_s * 60.0
        )
        self._heater = _HeaterSupervision(
            a.heater_hysteresis_c,
            a.heater_max_error_c_s,
            a.heater_gain_c,
            a.heater_check_gain_time_s,
        )
        self._baseline_samples: list[float] = []
        self.pvr_baseline: float | None = None
        self._overruns: deque[tuple[float, int]] = deque()

    # ------------------------------------------------------------------ sensing

    def sense(
        self, t_s: float, readings: Readings, ctx: Context | None = None
    ) -> tuple[Measured, dict[str, Condition]]:
        """Usable measurements and the sensor conditions. ``ctx`` (what the core decided last
        tick) enables the cross-checks of core/diagnostics.py."""
        values: dict[str, float | None] = {}
        conditions: dict[str, Condition] = {}
        for alarm_id, (signal, chk) in self._checks.items():
            values[alarm_id] = None if chk is None else chk.check(t_s, readings.get(signal))
        c = self._cfg.control
        tacho = None
        if c.flow.speed_measured is not None:
            r = readings.get(c.flow.speed_measured)
            tacho = r.value if r is not None and t_s - r.t <= c.stale_after_s else None
        if ctx is not None:
            flow = readings.get(c.flow.measured)
            self._cross_check(t_s if flow is None else flow.t, values, tacho, ctx)
        for alarm_id, (_, chk) in self._checks.items():
            if chk is None:
                continue
            if values[alarm_id] is not None:
                self._ever_ok.add(alarm_id)
            armed = alarm_id in self._ever_ok or t_s - self._t0_s >= STARTUP_GRACE_S
            conditions[alarm_id] = Condition(bool(chk.fault) and armed, detail=chk.fault)
        air: bool | None = None
        if c.air_measured is not None:
            r = readings.get(c.air_measured)
            fresh = r is not None and t_s - r.t <= c.stale_after_s
            air = bool(r.value) if fresh and r is not None else None
            armed = "sensor_air" in self._ever_ok or t_s - self._t0_s >= STARTUP_GRACE_S
            if air is not None:
                self._ever_ok.add("sensor_air")
            conditions["sensor_air"] = Condition(
                air is None and armed, detail="missing or stale" if air is None else ""
            )
        m = Measured(
            flow_ml_min=values["sensor_flow"],
            pressure_mmhg=values["sensor_pressure"],
            temperature_c=values["sensor_temperature"],
            water_temperature_c=values["sensor_water"],
            pump_speed_rpm=tacho,
            reservoir_volume_ml=values["sensor_reservoir"],
            air_detected=air,
        )
        return m, conditions

    def _cross_check(
        self, read_t_s: float, values: dict[str, float | None], tacho: float | None, ctx: Context
    ) -> None:
        """Stuck from the process (core/diagnostics.py): a stuck reading becomes unusable."""
        x = Inputs(
            flow_ml_min=values["sensor_flow"],
            pressure_mmhg=values["sensor_pressure"],
            temperature_c=values["sensor_temperature"],
            water_temperature_c=values["sensor_water"],
            pump_speed_rpm=tacho,
            pump_command_rpm=ctx.pump_command_rpm,
            pressure_limit_mmhg=ctx.pressure_limit_mmhg,
            phase=ctx.phase,
            read_t_s=read_t_s,
        )
        checks = self._check_of
        if self._diagnostics.operating_point_changed(x):
            for k in ("sensor_flow", "sensor_pressure"):  # their noise depends on the flow
                chk = checks[k]
                if chk is not None:
                    chk.relearn()

        flow, pressure, temp = (
            None if chk is None else chk.run
            for chk in (
                checks["sensor_flow"],
                checks["sensor_pressure"],
                checks["sensor_temperature"],
            )
        )
        verdicts = self._diagnostics.assess(x, flow, pressure, temp)
        for k, why in verdicts.items():
            chk = checks[k]
            if chk is not None:
                chk.declare(why)
                values[k] = None

    def _heats_when_off(
        self, t_s: float, water: float | None, temp: float | None, ctx: Context
    ) -> Condition:
        """The water warming with the heater commanded 0, and above the perfusate by more
        than HEATER_CONTRIBUTES_C (so the heat is not the perfusate's: a cold prime warmed by
        the body warms the water from below): faster than heater_off_rise_c_per_min over a
        whole window (two LSB of the water register and three standard errors of the slope
        allowed on top), or, for a heater too weak for that rate, heater_off_rise_c above its
        lowest since the command went to 0. Both on a line through one-second means, so a
        noisy reading makes no rise, from heater_off_settle_s after the command went to 0: an
        element switched off gives its water a few tenths from its stored heat, then the
        water cools."""
        a = self._cfg.alarms
        if ctx.heater_pct > 0.0:
            if self._water_off_since_s is not None:  # once, not every tick of heating
                self._water_off.clear()
                self._water_off_since_s = self._water_off_low_c = None
            return Condition(False)
        if self._water_off_since_s is None:
            self._water_off_since_s = t_s
        if t_s - self._water_off_since_s < a.heater_off_settle_s:
            return Condition(False)  # the element's stored heat (config description)
        if water is not None:
            self._water_off.add(t_s, water)
        slope, line_c = self._water_off.slope_c_per_s, self._water_off.value_c
        if slope is None or line_c is None:
            return Condition(False)
        low_c = line_c if self._water_off_low_c is None else min(self._water_off_low_c, line_c)
        self._water_off_low_c = low_c
        full = t_s - self._water_off_since_s - a.heater_off_settle_s >= 0.9 * a.heater_off_window_s
        rate = slope * 60.0 if full else None
        above = water is not None and temp is not None and water - temp > HEATER_CONTRIBUTES_C
        # Three standard errors of the slope on top: a noisy probe tilts a 30-s line.
        noise_c_per_min = 3.0 * self._water_off.slope_se_c_per_s * 60.0
        limit = a.heater_off_rise_c_per_min + self._water_off_lsb_c_per_min + noise_c_per_min
        fast = rate is not None and rate > limit
        risen = line_c - low_c >= a.heater_off_rise_c
        warming = above and (fast or risen)
        return Condition(
            warming,
            rate if rate is not None else slope * 60.0,
            limit,
            f"water {water:.1f} degC, {line_c - low_c:.1f} degC above its lowest since the "
            f"command went to 0, perfusate {temp:.1f} degC"
            if warming and water is not None and temp is not None
            else "",
        )

    # ------------------------------------------------------------------ conditions

    def evaluate(self, t_s: float, dt_s: float, m: Measured, ctx: Context) -> dict[str, Condition]:
        a, c = self._cfg.alarms, self._cfg.control
        out: dict[str, Condition] = {}
        p, q, temp, water = m.pressure_mmhg, m.flow_ml_min, m.temperature_c, m.water_temperature_c

        out["pressure_alert"] = _above(p, ctx.pressure_limit_mmhg)
        servo = ctx.pump_limited_by == SERVO_STOP
        out["pressure_high"] = Condition(
            servo or (p is not None and p >= c.pressure.stop_mmhg),
            p,
            c.pressure.stop_mmhg,
            " (servo stop ahead of the limit)" if servo else "",
        )

        ramped = (
            ctx.flow_leads
            and ctx.phase in (Phase.perfusion, Phase.washout)
            and (abs(ctx.flow_setpoint_ml_min - ctx.flow_target_ml_min) < 1e-6)
        )
        band = max(
            a.flow_deviation_pct / 100.0 * ctx.flow_setpoint_ml_min, a.flow_deviation_min_ml_min
        )
        deviates = ramped and q is not None and abs(q - ctx.flow_setpoint_ml_min) > band
        out["flow_deviation"] = Condition(
            deviates, q, band, _held_by_pressure(p, ctx) if deviates and p is not None else ""
        )
        out["pvr_rise"] = self._pvr(p, q, ramped, ctx)

        out["perfusate_high"] = _above(temp, c.temperature.max_c)
        at_temp = abs(ctx.temperature_setpoint_c - ctx.temperature_target_c) < 1e-6
        out["perfusate_low"] = Condition(
            ctx.phase is Phase.perfusion
            and at_temp
            and temp is not None
            and temp < ctx.temperature_setpoint_c - a.perfusate_low_c,
            temp,
            a.perfusate_low_c,
        )
        out["water_cap"] = _above(water, c.temperature.water_cap_c)
        rate = self._heating.add(t_s, temp)
        # Two readings one LSB apart can differ by a whole LSB more than the perfusate moved:
        # a 0.1 degC probe would otherwise add 0.05 degC/min to a 2-minute window.
        too_fast = (
            rate is not None and rate > a.heating_rate_c_per_min + self._heating_lsb_c_per_min
        )
        # Switching the heater off only helps when the heater is the heat source, i.e. its
        # water is above the perfusate (whatever the command: a welded relay commands 0 % and
        # heats; a heater on into water colder than the perfusate adds nothing to it).
        heater_heats = water is None or temp is None or water - temp > HEATER_CONTRIBUTES_C
        out["heating_rate"] = Condition(too_fast and heater_heats, rate, a.heating_rate_c_per_min)
        uncontrolled = too_fast and not heater_heats
        out["warming_uncontrolled"] = Condition(
            uncontrolled,
            rate,
            a.heating_rate_c_per_min,
            _above_or_below(water - temp)
            if uncontrolled and water is not None and temp is not None
            else "",
        )
        grad = None if water is None or temp is None else water - temp
        out["gradient"] = Condition(
            grad is not None and temp is not None and temp >= 30.0 and grad > a.gradient_c,
            grad,
            a.gradient_c,
        )
        out["heater_heats_when_off"] = self._heats_when_off(t_s, water, temp, ctx)
        detail = ""
        if ctx.heater_enabled and water is not None and ctx.water_setpoint_c is not None:
            detail = self._heater.update(t_s, dt_s, water, ctx.water_setpoint_c)
        else:
            self._heater.reset()
        out["heater_not_heating"] = Condition(bool(detail), detail=detail)

        v = m.reservoir_volume_ml
        out["reservoir_low"] = Condition(
            v is not None and v <= a.reservoir_low_ml, v, a.reservoir_low_ml
        )
        vol_rate = self._volume.add(t_s, v)
        loss = None if vol_rate is None else -vol_rate
        out["leak"] = Condition(loss is not None and loss > a.leak_ml_min, loss, a.leak_ml_min)
        out["air_detected"] = Condition(m.air_detected is True)

        out["device_comms"] = Condition(bool(ctx.devices_down), detail="; ".join(ctx.devices_down))
        cmd, tacho = ctx.pump_command_rpm, m.pump_speed_rpm
        tol = max(a.pump_follow_rpm, a.pump_follow_pct / 100.0 * cmd)
        out["pump_not_following"] = Condition(
            tacho is not None and abs(tacho - cmd) > tol, tacho, cmd
        )
        self._overruns.append((t_s, ctx.overruns_total))
        while t_s - self._overruns[0][0] > a.overrun_window_s:
            self._overruns.popleft()
        recent = ctx.overruns_total - self._overruns[0][1]
        out["tick_overrun"] = Condition(recent > 0, float(recent), 0.0)
        out["remote_link"] = Condition(not ctx.remote_ok)
        out["recorder"] = Condition(bool(ctx.recorder_problem), detail=ctx.recorder_problem)
        out["duplicate_cart_id"] = Condition(bool(ctx.identity_clash), detail=ctx.identity_clash)
        out["guard_absent"] = Condition(bool(ctx.guard_problem), detail=ctx.guard_problem)
        return out

    def _pvr(self, p: float | None, q: float | None, ramped: bool, ctx: Context) -> Condition:
        a = self._cfg.alarms
        if p is None or q is None or q < 50.0 or not ramped:
            return Condition(False)
        ratio = p / q
        if self.pvr_baseline is None:
            self._baseline_samples.append(ratio)
            period = self._cfg.control.tick_period_s
            if len(self._baseline_samples) * period >= a.pvr_baseline_s:
                self.pvr_baseline = sum(self._baseline_samples) / len(self._baseline_samples)
            return Condition(False)
        worse_pct = (ratio / self.pvr_baseline - 1.0) * 100.0
        return Condition(worse_pct > a.pvr_rise_pct, worse_pct, a.pvr_rise_pct)


def silent_devices(
    t_s: float, last_ok: Mapping[str, tuple[float | None, str | None]], stale_after_s: float
) -> tuple[str, ...]:
    """Devices with no good reply for longer than ``stale_after_s``, each with its reason.
    ``last_ok`` maps device -> (time of the last good reply or None, last error)."""
    down = []
    for name, (ok_t, error) in last_ok.items():
        age = None if ok_t is None else t_s - ok_t
        if age is None or age > stale_after_s:
            since = "never answered" if age is None else f"silent for {age:.1f} s"
            down.append(f"{name}: {since} ({error or 'no reply'})")
    return tuple(down)


def _above_or_below(diff_c: float) -> str:
    return f"now {abs(diff_c):.1f} degC {'above' if diff_c >= 0.0 else 'below'}"


def _above(value: float | None, limit: float) -> Condition:
    return Condition(value is not None and value >= limit, value, limit)


__all__ = ["RUNNING", "Context", "Measured", "Monitor", "silent_devices"]
