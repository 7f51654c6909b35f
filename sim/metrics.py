"""Control-quality figures of one closed-loop run in virtual time (family table, tests).

``run_metrics`` runs a cart configuration through the procedure with :class:`VirtualCart` and
returns a :class:`RunMetrics`; ``benchmarks/run.py --family`` prints one row per plant variant and
tests can assert on the same numbers.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ilup_controller.config.models import CartConfig
from ilup_controller.core.alarms import AlarmEvent
from ilup_controller.core.procedure import Phase, PhaseEvent
from sim.plant import PERFUSATE_SPECIFIC_HEAT_J_PER_KG_K, WATER_SPECIFIC_HEAT_J_PER_KG_K
from sim.virtual import Sample, VirtualCart

# Guideline rewarming rate (domain.md) and the allowance the issue grants over it.
GUIDELINE_C_PER_MIN = 0.5
GUIDELINE_ALLOWANCE = 1.25
REWARM_BAND_C = 0.3  # "rewarmed": true arterial temperature within this of the target
FLOW_SETTLE_S = 30.0  # after the flow ramp, before flow RMS counts
RATE_WINDOW_S = 120.0  # "never faster than 0.5 degC/min over any 2-minute window"
_BOUND_HORIZON_S = 4 * 3600.0  # a physical bound beyond this: the target is out of reach


@dataclass(frozen=True, slots=True)
class RunMetrics:
    duration_s: float
    wall_s: float
    cpu_s: float  # process CPU time of the run: the speed-up on a machine shared with others
    alarm_onsets: dict[str, int]  # alarm id -> onsets in the run
    drug_phase_done_s: float | None  # time the drug phase completed (perfusion -> washout)
    drug_elapsed_s: float  # drug-phase time at target when the run ended
    rewarm_start_s: float | None  # first tick the temperature loop drove the heater
    rewarm_start_c: float | None  # true arterial temperature then
    rewarm_start_bulk_c: float | None  # true perfusate (the circuit's bulk) then, for the bound
    rewarm_start_water_c: float | None  # true heater water then, for the bound
    rewarm_s: float | None  # from rewarm_start_s to within REWARM_BAND_C of the target
    rewarm_limit_s: float | None  # GUIDELINE_ALLOWANCE x (target - start) / 0.5 degC/min
    overshoot_c: float  # highest true arterial temperature above the target (0 if never)
    flow_rms_ml_min: float | None  # true flow vs target in perfusion, after the ramp settles
    flow_mean_error_ml_min: float | None  # mean of the same deviation: a bias RMS hides
    peak_pressure_mmhg: float  # highest true line pressure (where the sensor sits)
    peak_water_c: float
    # Guideline checks on the true plant: fastest arterial warming over any RATE_WINDOW_S, and
    # the largest water-to-arterial gradient while the perfusate is at or above 30 degC.
    max_rate_c_per_min: float = 0.0
    max_gradient_c: float = 0.0
    # The cold plug: the lowest true arterial temperature between the heater's start and the
    # band (the tubing contents that cooled at priming flow pass the probe as the flow ramps),
    # its time from rewarm_start_s, and the time a steady guideline pace (0.5 degC/min) from it
    # takes to the band: the guideline's 2-minute window counts the rise from that bottom.
    plug_low_c: float | None = None
    plug_low_s: float | None = None
    plug_pace_s: float | None = None

    @property
    def onsets(self) -> int:
        return sum(self.alarm_onsets.values())

    @property
    def rewarm_ratio(self) -> float | None:
        if self.rewarm_s is None or not self.rewarm_limit_s:
            return None
        return self.rewarm_s / self.rewarm_limit_s

    @property
    def bound_start(self) -> tuple[float, float] | None:
        """Where a physical bound starts: the true perfusate and water when the heater may
        first run (see physical_bound_s)."""
        if self.rewarm_start_bulk_c is None or self.rewarm_start_water_c is None:
            return None
        return self.rewarm_start_bulk_c, self.rewarm_start_water_c

    @property
    def speed_up(self) -> float:
        return self.duration_s / self.wall_s if self.wall_s > 0 else math.inf

    @property
    def cpu_speed_up(self) -> float:
        return self.duration_s / self.cpu_s if self.cpu_s > 0 else math.inf


class RunCollector:
    """Folds samples into the figures as they come, so a long run keeps no history. A test that
    drives a VirtualCart itself (commands between segments) can fold its samples here too."""

    def __init__(self, cfg: CartConfig) -> None:
        self.target_c = cfg.control.temperature.target_c
        flow = cfg.control.flow
        priming = cfg.procedure.priming_flow_ml_min
        # From priming flow to target at target/ramp_s per second, then FLOW_SETTLE_S.
        self.flow_settle_s = (
            flow.ramp_s * max(0.0, 1.0 - priming / flow.target_ml_min) + FLOW_SETTLE_S
            if flow.target_ml_min > 0
            else FLOW_SETTLE_S
        )
        self.onsets: Counter[str] = Counter()
        self.drug_done_s: float | None = None
        self.drug_elapsed_s = 0.0
        self.perfusion_start_s: float | None = None
        self.rewarm_start_s: float | None = None
        self.rewarm_start_c: float | None = None
        self.rewarm_start_bulk_c: float | None = None
        self.rewarm_start_water_c: float | None = None
        self.rewarm_s: float | None = None
        self.max_arterial_c = -math.inf
        self.flow_sq_sum = 0.0
        self.flow_sum = 0.0
        self.flow_n = 0
        self.peak_pressure = -math.inf
        self.peak_water = -math.inf
        self._arterial_1s: deque[tuple[float, float]] = deque()  # (t, lowest arterial that second)
        self.max_rate = 0.0
        self.max_gradient = 0.0
        self.plug_low_c = math.inf
        self.plug_low_s = 0.0

    def __call__(self, s: Sample) -> None:
        d, truth = s.decision, s.truth
        t_s = d.t_s
        for e in d.events:
            if isinstance(e, AlarmEvent):
                if e.kind == "onset" and e.alarm_id is not None:
                    self.onsets[e.alarm_id] += 1
            elif isinstance(e, PhaseEvent):
                if e.to_phase is Phase.perfusion and self.perfusion_start_s is None:
                    self.perfusion_start_s = e.t_s
                if e.from_phase is Phase.perfusion and e.to_phase is Phase.washout:
                    self.drug_done_s = e.t_s
        self.drug_elapsed_s = d.drug_elapsed_s
        arterial = truth.arterial_c
        if self.rewarm_start_s is None and d.loop.heater_enabled:
            self.rewarm_start_s, self.rewarm_start_c = t_s, arterial
            self.rewarm_start_bulk_c = truth.perfusate_c
            self.rewarm_start_water_c = truth.water_c
        if (
            self.rewarm_start_s is not None
            and self.rewarm_s is None
            and arterial >= self.target_c - REWARM_BAND_C
        ):
            self.rewarm_s = t_s - self.rewarm_start_s
        if self.rewarm_start_s is not None and self.rewarm_s is None and arterial < self.plug_low_c:
            self.plug_low_c, self.plug_low_s = arterial, t_s - self.rewarm_start_s
        self.max_arterial_c = max(self.max_arterial_c, arterial)
        self._rate_window(t_s, arterial)
        if arterial >= 30.0:
            self.max_gradient = max(self.max_gradient, truth.water_c - arterial)
        if (
            d.phase is Phase.perfusion
            and self.perfusion_start_s is not None
            and t_s >= self.perfusion_start_s + self.flow_settle_s
        ):
            err = truth.flow_ml_min - d.flow_target_ml_min
            self.flow_sq_sum += err * err
            self.flow_sum += err
            self.flow_n += 1
        self.peak_pressure = max(self.peak_pressure, truth.pa_pressure_mmhg)
        self.peak_water = max(self.peak_water, truth.water_c)

    def _rate_window(self, t_s: float, arterial: float) -> None:
        """Largest rise over any RATE_WINDOW_S, from one sample a second (lowest first)."""
        pts = self._arterial_1s
        if not pts or t_s - pts[-1][0] >= 1.0 - 1e-9:
            pts.append((t_s, arterial))
            while t_s - pts[0][0] > RATE_WINDOW_S + 1e-9:
                pts.popleft()
            if t_s - pts[0][0] >= RATE_WINDOW_S - 1.0:
                rise = arterial - min(v for _, v in pts)
                self.max_rate = max(self.max_rate, rise / RATE_WINDOW_S * 60.0)

    def result(self, duration_s: float, wall_s: float, cpu_s: float) -> RunMetrics:
        limit_s = None
        if self.rewarm_start_c is not None:
            rise_c = max(0.0, self.target_c - self.rewarm_start_c)
            limit_s = GUIDELINE_ALLOWANCE * rise_c / GUIDELINE_C_PER_MIN * 60.0
        plug_low = self.plug_low_c if math.isfinite(self.plug_low_c) else None
        plug_pace_s = None
        if plug_low is not None:
            rise_c = max(0.0, self.target_c - REWARM_BAND_C - plug_low)
            plug_pace_s = self.plug_low_s + rise_c / GUIDELINE_C_PER_MIN * 60.0
        return RunMetrics(
            duration_s=duration_s,
            wall_s=wall_s,
            cpu_s=cpu_s,
            alarm_onsets=dict(sorted(self.onsets.items())),
            drug_phase_done_s=self.drug_done_s,
            drug_elapsed_s=self.drug_elapsed_s,
            rewarm_start_s=self.rewarm_start_s,
            rewarm_start_c=self.rewarm_start_c,
            rewarm_start_bulk_c=self.rewarm_start_bulk_c,
            rewarm_start_water_c=self.rewarm_start_water_c,
            rewarm_s=self.rewarm_s,
            rewarm_limit_s=limit_s,
            overshoot_c=max(0.0, self.max_arterial_c - self.target_c),
            flow_rms_ml_min=(self.flow_sq_sum / self.flow_n) ** 0.5 if self.flow_n else None,
            flow_mean_error_ml_min=self.flow_sum / self.flow_n if self.flow_n else None,
            peak_pressure_mmhg=self.peak_pressure,
            peak_water_c=self.peak_water,
            max_rate_c_per_min=self.max_rate,
            max_gradient_c=self.max_gradient,
            plug_low_c=plug_low,
            plug_low_s=None if plug_low is None else self.plug_low_s,
            plug_pace_s=plug_pace_s,
        )


def physical_bound_s(cfg: CartConfig, perfusate_c: float, water_c: float) -> float | None:
    """Fastest rewarm to within REWARM_BAND_C of the target at the arterial probe that the
    plant allows from where it stands when the heater may first run (true perfusate and water
    temperatures), within the guideline's own limits; None when the target is out of reach.

    The plant's two thermal nodes (sim/plant.py), with an ideal controller: the heater at up to
    full power (and its supply limit) brings the water as fast as it can to where the perfusate
    warms at GUIDELINE_C_PER_MIN, never above the perfusate + ``max_gradient_c`` or a cap, and
    holds it there; the probe sees the perfusate one tubing transit later at the target flow.
    The lung exchanges at the target flow throughout (early on the flow is still ramping: with
    the rate capped and the heater's power to spare, that moves the water, not the time). What
    it leaves out (a lagging probe, noise, a water loop slower than full power) only makes a
    real run slower, so this is a lower bound; unlike a quasi-static one it counts the time the
    heater needs to warm its water to the gradient."""
    if cfg.simulator is None:
        raise ValueError("the configuration has no 'simulator' section")
    p, t = cfg.simulator.plant, cfg.control.temperature
    c_perfusate = p.perfusate_volume_ml * 1e-3 * PERFUSATE_SPECIFIC_HEAT_J_PER_KG_K
    c_water = p.water_mass_kg * WATER_SPECIFIC_HEAT_J_PER_KG_K
    flow_ml_min = cfg.control.flow.target_ml_min
    lung_ua = p.lung_ua_w_per_k_per_l_min * flow_ml_min * 1e-3
    heater_w = p.heater_power_w * t.heater_max_pct / 100.0
    if p.heater_supply_max_w is not None:
        heater_w = min(heater_w, p.heater_supply_max_w)
    water_top_c = min(t.water_cap_c - 0.5, p.water_cap_c)
    rate_c_per_s = GUIDELINE_C_PER_MIN / 60.0
    end_c = t.target_c - REWARM_BAND_C
    tp, tw, elapsed_s, h = perfusate_c, water_c, 0.0, 0.5
    while tp < end_c:
        if elapsed_s > _BOUND_HORIZON_S:
            return None
        losses_w = p.tubing_ua_w_per_k * (tp - p.ambient_c) + lung_ua * (tp - p.body_c)
        goal_c = tp + (c_perfusate * rate_c_per_s + losses_w) / p.hx_ua_w_per_k
        goal_c = min(goal_c, tp + t.max_gradient_c, water_top_c)
        hx_w = p.hx_ua_w_per_k * (tw - tp)
        water_loss_w = p.water_ambient_ua_w_per_k * (tw - p.ambient_c)
        power_w = (goal_c - tw) * c_water / h + hx_w + water_loss_w
        power_w = min(max(power_w, 0.0), heater_w)
        tw += h * (power_w - hx_w - water_loss_w) / c_water
        tp += h * (hx_w - losses_w) / c_perfusate
        elapsed_s += h
    return elapsed_s + p.tubing_volume_ml / flow_ml_min * 60.0


def run_metrics(cfg: CartConfig, duration_s: float = 2400.0) -> RunMetrics:
    """Run ``cfg`` (with a simulator section) for ``duration_s`` of virtual time and measure."""
    cart = VirtualCart(cfg)
    collect = RunCollector(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    cart.run_for(duration_s, collect)
    return collect.result(duration_s, time.perf_counter() - t0, time.process_time() - c0)


def run_many(
    runs: Mapping[str, tuple[CartConfig, float]], workers: int | None = None
) -> dict[str, RunMetrics]:
    """``run_metrics`` of each (config, duration), on up to ``workers`` processes (default: one
    per CPU). Spawned, not forked: a fork would copy whatever locks the caller's threads hold."""
    n = min(workers or os.cpu_count() or 1, len(runs))
    if n <= 1:
        return {name: run_metrics(cfg, s) for name, (cfg, s) in runs.items()}
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(run_metrics, cfg, s) for name, (cfg, s) in runs.items()}
        return {name: f.result() for name, f in futures.items()}
