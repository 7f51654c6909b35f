"""A full procedure in virtual time, recorded through the same messages the daemon records;
the report's summary figures are checked against the simulator's own ground truth."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ilup_controller.config import CartConfig, load_config
from ilup_controller.core.control import REWARM_INTEGRAL, ControlEvent
from ilup_controller.core.procedure import Phase
from ilup_controller.record.chain import verify_record
from ilup_controller.record.recorder import Recorder, config_json_of
from ilup_controller.record.report import render_report, summarize
from ilup_controller.record.store import open_record
from ilup_controller.runtime.recovery import restored_from
from ilup_controller.runtime.state import build_event, build_state
from ilup_controller.runtime.ticker import TickStats
from sim.family import apply, by_name
from sim.virtual import Sample, VirtualCart


def test_recorded_procedure_matches_ground_truth(tmp_path: Path) -> None:
    base = load_config("config/sim.yaml")
    assert base.simulator is not None
    # Perfusate primed warm: the at-target edge is then set by the flow ramp. (Warming through
    # the 0.5 degC band at 0.3 degC/min, the 0.01 degC register resolution alone is worth 2 s.)
    plant = base.simulator.plant.model_copy(
        update={"initial_perfusate_c": 37.0, "initial_water_c": 37.5}
    )
    cfg = base.model_copy(update={"simulator": base.simulator.model_copy(update={"plant": plant})})
    cart = VirtualCart(cfg)
    recording = _Recording(tmp_path, cfg)
    rec, stats = recording.rec, recording.stats
    truth_at_target_s = 0.0
    truth_max_pressure = 0.0

    def on_tick(s: Sample) -> None:
        nonlocal truth_at_target_s, truth_max_pressure
        recording(s)
        r, t = s.decision, s.truth
        truth_max_pressure = max(truth_max_pressure, t.pa_pressure_mmhg)
        if (
            r.phase is Phase.perfusion
            and not cart.core.procedure.drug_done
            and abs(t.flow_ml_min - cfg.control.flow.target_ml_min)
            <= cfg.procedure.at_target_flow_pct / 100 * cfg.control.flow.target_ml_min
            and abs(t.arterial_c - cfg.control.temperature.target_c)
            <= cfg.procedure.at_target_temperature_c
        ):
            truth_at_target_s += cfg.control.tick_period_s

    cart.run_for(30.0 + 1800.0 + 600.0 + 600.0, on_tick)
    assert rec.close()
    assert rec.dropped == 0
    data = open_record(rec.path)
    s = summarize(data)
    assert data.n_samples == stats.ticks
    assert s.gap_samples == 0
    assert s.drug_elapsed_s == pytest.approx(cfg.procedure.drug_phase_s, abs=0.2)
    # Measured (noisy sensors) against true values. Priming (heater off below min flow) cools
    # the warm prime to about the band's lower edge, which the perfusate then recrosses slowly
    # (~0.15 degC/min): each 0.01 degC of register step or noise there is ~4 s of timer, so the
    # two timers agree to the probe's resolution, not to the tick.
    assert abs(truth_at_target_s - s.drug_elapsed_s) <= 3.0, (truth_at_target_s, s)
    # The sensor reads 0.3 mmHg high (zero offset) plus noise.
    assert s.pressure_max_mmhg == pytest.approx(truth_max_pressure + 0.3, abs=1.0)
    assert s.flow_perfusion is not None
    assert s.flow_perfusion.mean == pytest.approx(cfg.control.flow.target_ml_min, rel=0.10)
    assert s.reservoir_change_ml == pytest.approx(0.0, abs=10.0)
    assert s.alarm_onsets == {"high": 0, "medium": 0, "low": 0}
    assert s.safe_stop_s == 0.0
    # The whole procedure's hash chain verifies, quickly (figure in docs/security.md).
    chain = verify_record(rec.path)
    assert chain.status == "intact", chain.summary()
    assert chain.rows_checked == stats.ticks + recording.n_events
    assert chain.seconds < 5.0, f"{chain.rows_checked} rows in {chain.seconds:.2f} s"
    html = render_report(rec.path, tmp_path / "report.html")
    text = html.read_text()
    assert "30:00" in text  # drug phase time at target shown as mm:ss
    assert "http://" not in text
    assert "https://" not in text


class _Recording:
    """Records each tick's state and events as the daemon does (build_state, build_event)."""

    def __init__(self, tmp_path: Path, cfg: CartConfig) -> None:
        self.cfg = cfg
        # Virtual time runs ~600x faster than a daemon: room for the whole run in the queue.
        self.rec = Recorder.create(tmp_path, cfg.cart_id, config_json_of(cfg), queue_size=100_000)
        self.rec.start()
        self.stats = TickStats()
        self.n_events = 0

    @staticmethod
    def utc_of(t_s: float) -> datetime:
        return datetime(2026, 1, 1, 8, 0, tzinfo=UTC) + timedelta(seconds=t_s)

    def __call__(self, s: Sample) -> None:
        cfg, r, utc_of = self.cfg, s.decision, self.utc_of
        self.stats.ticks += 1
        state = build_state(cfg, r, seq=self.stats.ticks, utc_of=utc_of, stats=self.stats)
        self.rec.sample(state, t_mono_s=r.t_s)
        for e in r.events:
            self.rec.event(build_event(cfg, e, seq=self.n_events, utc_of=utc_of))
            self.n_events += 1


def _recorded_run(tmp_path: Path, cfg: CartConfig, duration_s: float) -> Path:
    recording = _Recording(tmp_path, cfg)
    VirtualCart(cfg).run_for(duration_s, recording)
    assert recording.rec.close()
    return recording.rec.path


@pytest.mark.parametrize(
    ("variant", "halvings"), [("strong_hx_delay_17s", [0.5, 0.25]), ("reference", [])]
)
def test_a_restart_keeps_the_rate_loop_as_slowed_by_this_plants_bursts(
    tmp_path: Path, variant: str, halvings: list[float]
) -> None:
    """The strong exchanger 17 s from its probe warms in bursts within 450 s and its rate loop
    halves its integral gain twice (test_family_control.py); the daemon crashes. The record it
    continues gives the restarted core the smallest, 0.25, told again as a rewarm_integral
    event (the record then holds it for a second restart); the reference plant restarts at 1."""
    cfg = apply(by_name(variant), load_config("config/sim.yaml"))
    record = open_record(_recorded_run(tmp_path, cfg, 450.0))
    told = [e for e in record.events if e["kind"] == REWARM_INTEGRAL]
    assert [e["value"] for e in told] == halvings
    scale = min(halvings, default=1.0)
    snapshot = restored_from(record, datetime(2026, 1, 1, 8, 8, tzinfo=UTC))
    assert snapshot is not None
    assert snapshot.phase is Phase.perfusion
    assert snapshot.rate_integral_scale == scale

    restarted = VirtualCart(cfg)
    restarted.core.restore(restarted.t_s, snapshot)
    first = restarted.tick().decision
    assert first.phase is Phase.safe_stop
    assert first.loop.rate_integral_scale == scale
    again = [e for e in first.events if isinstance(e, ControlEvent)]
    assert [(e.kind, e.value) for e in again] == ([(REWARM_INTEGRAL, scale)] if scale < 1 else [])
    if again:
        assert "restored from the record" in again[0].message
