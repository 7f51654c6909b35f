"""The guard's decision: a pure function of its readings, its state and explicit time.

One step: find the hazards present now (a limit crossed, a sensor unreadable for longer than
``unreadable_s``, the controller's heartbeat unchanged for longer than ``heartbeat_s``); a
hazard that persists for ``budget_s`` while its actuator is still on latches that actuator
off. The budget lets the controller act first (it stops the pump or the heater within one
tick), so the guard acts only when the controller did not. A latch holds until ``reset``,
which is refused while a hazard of that actuator is present.

"On": the pump while commanded above 0 or still turning (its tacho). The heater has no tacho,
so besides its command above 0 two pieces of evidence count: once the controller has fallen
silent (its heartbeat unchanged for ``heartbeat_s``), a command above 0 at any time since its
last heartbeat (for a live controller "on" is the command now; a device whose
watchdog zeroes its command register, as it should, leaves no other trace of an element that
may be stuck on); and, commanded 0, its water (smoothed over WATER_SMOOTH_S) warming
HEATER_RISE_C above its lowest since while it stands more than HEATER_LEADS_C above the
perfusate (a welded relay: the controller's 0 changes nothing, and only the contactor stops
it; a water below the perfusate warms from it, heater or not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

Actuator = Literal["pump", "heater"]
ACTUATORS: tuple[Actuator, ...] = ("pump", "heater")
_BOTH: tuple[Actuator, ...] = ACTUATORS
# Water warming this much above its lowest reading since the heater's command read 0: the
# element heats against its command. An element switched off leaves the water falling or
# holding (its stored heat adds a few tenths at most); the simulated probe's noise is 0.02 degC.
HEATER_RISE_C = 0.5
# ... while it stands this far above the perfusate (as the core's HEATER_CONTRIBUTES_C; the
# guard imports nothing of the core): the heat is not the perfusate's (the water of a heater
# that is off warms toward a warmer perfusate; ilup tune's flow test with the guard running
# latched the heater on that, "controller heartbeat unchanged", once the tune stopped).
HEATER_LEADS_C = 0.5
# The rise is taken on the water smoothed with this time constant: at 20 Hz a probe with
# 0.15 degC of noise (the daemon accepts up to alarms.water.max_noise, 0.5) has raw extremes
# a degree apart within minutes, and a steady water latched the heater of a silent controller.
WATER_SMOOTH_S = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    """The guard's limits (config ``guard:``, resolved against the control limits)."""

    pressure_stop_mmhg: float
    perfusate_max_c: float
    water_max_c: float
    reservoir_low_ml: float | None  # None: the cart has no reservoir sensor
    air: bool  # the cart has a bubble detector
    budget_s: float
    unreadable_s: float
    heartbeat_s: float


@dataclass(frozen=True, slots=True)
class Inputs:
    """One cycle's readings; None = unreadable (no reply, a decode error, out of range)."""

    t_s: float
    pressure_mmhg: float | None
    perfusate_c: float | None
    water_c: float | None
    air: bool | None
    reservoir_ml: float | None
    pump_on: bool  # commanded above 0 or still turning; an unreadable command counts as on
    heater_on: bool
    heartbeat: int | None


@dataclass(frozen=True, slots=True)
class State:
    latched: Mapping[Actuator, str] = field(default_factory=dict)  # actuator -> why
    since: Mapping[str, float] = field(default_factory=dict)  # "actuator:hazard" -> first seen
    unreadable_since: Mapping[str, float] = field(default_factory=dict)
    heartbeat: int | None = None
    heartbeat_t_s: float | None = None  # when the heartbeat last changed (or was first seen)
    heater_on_t_s: float | None = None  # the last cycle the heater read on
    water_c: float | None = None  # the water smoothed over WATER_SMOOTH_S
    water_t_s: float | None = None  # its last reading
    water_low_c: float | None = None  # the lowest smoothed water since the heater read off


@dataclass(frozen=True, slots=True)
class Decision:
    state: State
    enabled: Mapping[Actuator, bool]  # False: the guard holds it off
    hazards: Mapping[str, str]  # hazard -> detail, present now
    events: tuple[str, ...]  # one line per actuator latched this cycle


def hazards(s: State, x: Inputs, lim: Limits) -> dict[str, tuple[tuple[Actuator, ...], str]]:
    """Hazards present now: name -> (the actuators it concerns, a detail for the operator)."""
    out: dict[str, tuple[tuple[Actuator, ...], str]] = {}
    p, tp, tw = x.pressure_mmhg, x.perfusate_c, x.water_c
    if p is not None and p >= lim.pressure_stop_mmhg:
        out["pressure"] = (("pump",), f"PA pressure {p:.1f} >= {lim.pressure_stop_mmhg:g} mmHg")
    if x.air:
        out["air"] = (("pump",), "air in the inflow line")
    low = lim.reservoir_low_ml
    if low is not None and x.reservoir_ml is not None and x.reservoir_ml <= low:
        out["reservoir"] = (("pump",), f"reservoir {x.reservoir_ml:.0f} <= {low:g} mL")
    if tp is not None and tp >= lim.perfusate_max_c:
        out["perfusate"] = (("heater",), f"perfusate {tp:.2f} >= {lim.perfusate_max_c:g} degC")
    if tw is not None and tw >= lim.water_max_c:
        out["water"] = (("heater",), f"water {tw:.2f} >= {lim.water_max_c:g} degC")
    for name, since in s.unreadable_since.items():
        if x.t_s - since >= lim.unreadable_s:
            concerns = _SENSOR_ACTUATORS[name]
            out[f"{name}_unreadable"] = (concerns, f"{name} unreadable for {x.t_s - since:.1f} s")
    hb_t = s.heartbeat_t_s
    if hb_t is not None and x.t_s - hb_t >= lim.heartbeat_s:
        # A controller that stopped with its actuators off left nothing to stop.
        on = tuple(
            a for a, is_on in zip(_BOTH, (x.pump_on, heater_on(s, x, lim)), strict=True) if is_on
        )
        out["heartbeat"] = (on, f"controller heartbeat unchanged for {x.t_s - hb_t:.1f} s")
    return out


_SENSOR_ACTUATORS: dict[str, tuple[Actuator, ...]] = {
    "pressure": ("pump",),
    "air": ("pump",),
    "reservoir": ("pump",),
    "perfusate": ("heater",),
    "water": ("heater",),
}


def _unreadable(x: Inputs, lim: Limits) -> set[str]:
    readings: dict[str, object] = {
        "pressure": x.pressure_mmhg,
        "perfusate": x.perfusate_c,
        "water": x.water_c,
    }
    if lim.air:
        readings["air"] = x.air
    if lim.reservoir_low_ml is not None:
        readings["reservoir"] = x.reservoir_ml
    return {name for name, v in readings.items() if v is None}


def heater_on(s: State, x: Inputs, lim: Limits) -> bool:
    """The heater commanded on now, or, the controller silent (its heartbeat unchanged for
    heartbeat_s), at any time since its last sign of life; or its water warming while commanded
    off (module docstring)."""
    if x.heater_on:
        return True
    since, on_t_s = s.heartbeat_t_s, s.heater_on_t_s
    if (
        since is not None
        and x.t_s - since >= lim.heartbeat_s
        and on_t_s is not None
        and on_t_s >= since
    ):
        return True  # on since the last heartbeat of a controller now silent
    low, water, perfusate = s.water_low_c, s.water_c, x.perfusate_c
    if low is None or water is None or perfusate is None or x.water_c is None:
        return False
    return water - low >= HEATER_RISE_C and water - perfusate > HEATER_LEADS_C


def observe(s: State, x: Inputs, lim: Limits) -> State:
    """Track when each sensor became unreadable, when the heartbeat last moved, when the heater
    last read on and its water's lowest reading since it read off."""
    bad = _unreadable(x, lim)
    unreadable = {n: s.unreadable_since.get(n, x.t_s) for n in bad}
    hb, hb_t = s.heartbeat, s.heartbeat_t_s
    if hb_t is None or (x.heartbeat is not None and x.heartbeat != hb):
        hb, hb_t = x.heartbeat, x.t_s
    water, water_t, low = s.water_c, s.water_t_s, s.water_low_c
    if x.water_c is not None:
        if water is None or water_t is None:
            water = x.water_c
        else:
            water += (1.0 - math.exp(-(x.t_s - water_t) / WATER_SMOOTH_S)) * (x.water_c - water)
        water_t = x.t_s
        low = water if low is None else min(low, water)
    if x.heater_on:
        low = None
    return replace(
        s,
        unreadable_since=unreadable,
        heartbeat=hb,
        heartbeat_t_s=hb_t,
        heater_on_t_s=x.t_s if x.heater_on else s.heater_on_t_s,
        water_c=water,
        water_t_s=water_t,
        water_low_c=low,
    )


def decide(s: State, x: Inputs, lim: Limits) -> Decision:
    """One guard cycle (see the module docstring)."""
    s = observe(s, x, lim)
    present = hazards(s, x, lim)
    on: dict[Actuator, bool] = {"pump": x.pump_on, "heater": heater_on(s, x, lim)}
    since: dict[str, float] = {}
    latched = dict(s.latched)
    events: list[str] = []
    for name, (concerns, detail) in present.items():
        for a in concerns:
            if not on[a] or a in latched:
                continue
            key = f"{a}:{name}"
            first = s.since.get(key, x.t_s)
            since[key] = first
            if x.t_s - first >= lim.budget_s:
                latched[a] = detail
                events.append(
                    f"{a} held off: {detail}, still on {x.t_s - first:.2f} s after the "
                    f"guard saw it (budget {lim.budget_s:g} s)"
                )
    state = replace(s, latched=latched, since=since)
    enabled = {a: a not in latched for a in ACTUATORS}
    details = {name: detail for name, (_, detail) in present.items()}
    return Decision(state, enabled, details, tuple(events))


def reset(s: State, x: Inputs, lim: Limits) -> tuple[State, str]:
    """Release every latch, or refuse ("" = done) while a hazard of a latched actuator is
    present: the operator resets once the cause is gone, as for a latched alarm."""
    s = observe(s, x, lim)
    blocking = sorted(
        detail
        for concerns, detail in hazards(s, x, lim).values()
        if any(a in s.latched for a in concerns)
    )
    if blocking:
        return s, "refused: " + "; ".join(blocking)
    return replace(s, latched={}, since={}), ""
