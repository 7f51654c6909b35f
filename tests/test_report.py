"""The procedure report and CSV export from a synthetic 30-minute record: exact summary figures,
figures embedded (no external reference), text escaped, and a headless Chromium screenshot
that shows the plots."""

from __future__ import annotations

import asyncio
import csv
import math
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from ilup_controller.config import load_config
from ilup_controller.mqtt.messages import (
    DrugPhase,
    Event,
    Loop,
    Measured,
    Outputs,
    State,
    Targets,
    Timing,
)
from ilup_controller.record import Recorder, RecordError, open_record
from ilup_controller.record.export import export_csv, main_export
from ilup_controller.record.report import fmt_duration, main_report, render_report, summarize
from ilup_controller.record.store import SAMPLE_COLUMNS

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<script>alert('x')</script> & \"quoted\""


@dataclass
class Procedure:
    states: list[State]
    events: list[Event]
    config_json: str
    drug_phase_s: float


def _state(t: int, phase: str, flow: float | None, *, target: float, **kw: Any) -> State:
    temp: float | None = kw.get("temp", 37.0 if phase != "priming" else 34.0)
    return State(
        t=T0 + timedelta(seconds=t),
        seq=10 * t,  # ticks at 10 Hz, recorded at 1 Hz
        cart_id="sim_cart_1",
        phase=phase,
        simulated=True,
        measured=Measured(
            flow_ml_min=flow,
            pressure_mmhg=kw.get("pressure", 15.0 if flow is not None else None),
            temperature_c=temp,
            water_temperature_c=None if temp is None else temp + 2.0,
            pump_speed_rpm=None if flow is None else flow / 33.0,
            reservoir_volume_ml=None if t < 5 else 800.0 - 0.025 * (t - 5),
        ),
        targets=Targets(
            flow_ml_min=target,
            flow_ramped_ml_min=target,
            pressure_limit_mmhg=25.0,
            temperature_c=37.0,
            temperature_ramped_c=37.0,
        ),
        outputs=Outputs(pump_speed_rpm=target / 33.0, heater_pct=35.0 if temp else 0.0),
        loop=Loop(pump_limited_by="flow", heater_limited_by="temperature"),
        drug_phase=DrugPhase(elapsed_s=kw["drug"], remaining_s=1800.0 - kw["drug"]),
        active_alarms=[],
        timing=Timing(tick_period_s=0.1, ticks=10 * t, overruns=0),
    )


def build_procedure() -> Procedure:
    """Priming 2 min, perfusion until 30 min at target (a 60 s flow dip and a 45 s safe-stop
    pause the drug timer), washout 5 min, complete. One sample per second."""
    cfg = load_config(REPO / "config" / "sim.yaml")
    states: list[State] = []
    events: list[Event] = []

    def event(t: int, kind: str, message: str, **kw: Any) -> None:
        events.append(
            Event(
                t=T0 + timedelta(seconds=t),
                seq=len(events),
                cart_id="sim_cart_1",
                kind=kind,
                message=message,
                **kw,
            )
        )

    def phase(t: int, a: str, b: str) -> None:
        event(t, "phase", f"phase {a} -> {b}", from_phase=a, to_phase=b, operator="op1")

    for t in range(120):
        states.append(_state(t, "priming", 150.0, target=150.0, drug=0.0, pressure=8.0))
    phase(120, "priming", "perfusion")
    event(130, "marker", "lung ventilated")
    drug, t = 0.0, 120
    while drug < 1800.0:
        if 1000 <= t < 1045:
            if t == 1000:
                phase(1000, "perfusion", "safe_stop")
            states.append(_state(t, "safe_stop", None, target=500.0, drug=drug, temp=None))
            t += 1
            continue
        if t == 1045:
            phase(1045, "safe_stop", "perfusion")
        flow = 400.0 if 600 <= t < 660 else (495.0 if t % 2 == 0 else 505.0)
        temp = {300: 36.6, 400: 37.3}.get(t, 37.0)
        if abs(flow - 500.0) <= 50.0:  # within 10 %: the drug timer runs
            drug += 1.0
        pressure = 27.5 if t == 800 else 15.0
        states.append(
            _state(t, "perfusion", flow, target=500.0, drug=drug, temp=temp, pressure=pressure)
        )
        t += 1
    event(605, "onset", "flow low", alarm_id="flow_deviation", priority="medium", value=400.0)
    event(660, "end", "flow back", alarm_id="flow_deviation", priority="medium")
    event(800, "onset", "PA pressure high", alarm_id="pa_pressure_high", priority="high")
    event(1500, "onset", "reservoir low", alarm_id="reservoir_low", priority="low")
    event(1600, "onset", HOSTILE, alarm_id="temperature_low", priority="medium")
    event(1700, "acknowledge", "acknowledged", alarm_id="temperature_low", operator="O'Brien")
    phase(t, "perfusion", "washout")
    end_perfusion = t
    for t in range(end_perfusion, end_perfusion + 300):
        states.append(_state(t, "washout", 500.0, target=500.0, drug=drug))
    event(end_perfusion + 100, "marker", "washout sample taken")
    phase(end_perfusion + 300, "washout", "complete")
    for t in range(end_perfusion + 300, end_perfusion + 310):
        states.append(_state(t, "complete", 0.0, target=0.0, drug=drug, temp=36.0))
    events.sort(key=lambda e: e.t)
    return Procedure(states, events, cfg.model_dump_json(), cfg.procedure.drug_phase_s)


async def _write(directory: Path, proc: Procedure) -> Path:
    rec = Recorder.create(directory, "sim_cart_1", proc.config_json)
    rec.start()
    pending = list(proc.events)
    for st in proc.states:
        while pending and pending[0].t <= st.t:
            await rec.commit(pending.pop(0))
        rec.sample(st, t_mono_s=(st.t - T0).total_seconds())
    for e in pending:
        await rec.commit(e)
    assert rec.close(timeout_s=10.0)
    assert rec.dropped == 0
    return rec.path


@dataclass
class Rendered:
    proc: Procedure
    record: Path
    html_path: Path
    html: str
    png_dir: Path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    d = tmp_path_factory.mktemp("report")
    proc = build_procedure()
    record = asyncio.run(_write(d / "records", proc))
    out = render_report(record, d / "out" / "report.html", png_dir=d / "out" / "png")
    return Rendered(proc, record, out, out.read_text(encoding="utf-8"), d / "out" / "png")


def _cell(html: str, ident: str) -> str:
    m = re.search(rf'<td id="{ident}">([^<]*)</td>', html)
    assert m, f"summary row {ident} missing"
    return m.group(1)


def _perfusion(proc: Procedure, get: Any) -> list[float]:
    return [get(s) for s in proc.states if s.phase == "perfusion" and get(s) is not None]


# --------------------------------------------------------------------------- summary


def test_summary_figures_are_exact(rendered: Rendered) -> None:
    proc, html = rendered.proc, rendered.html
    assert len(proc.states) > 30 * 60  # a 30-minute drug phase plus priming and washout

    assert _cell(html, "s-drug") == "30:00 (1800 s) of 30:00"
    assert proc.drug_phase_s == 1800.0

    flows = _perfusion(proc, lambda s: s.measured.flow_ml_min)
    mean = math.fsum(flows) / len(flows)
    # At each signal's resolution in config/sim.yaml: flow float32 (2), pressure 0.01 (2).
    assert _cell(html, "s-flow") == f"{mean:.2f} / 400.00 / 505.00 mL/min"
    assert 490.0 < mean < 500.0  # the 60 s dip at 400 pulls the mean down

    assert _cell(html, "s-pressure") == "27.50 mmHg"

    temps = _perfusion(proc, lambda s: s.measured.temperature_c)
    t_mean = math.fsum(temps) / len(temps)
    assert _cell(html, "s-temperature") == f"{t_mean:.2f} / 36.60 / 37.30 °C"

    last = proc.states[-1].measured.reservoir_volume_ml
    assert last is not None
    # The reservoir signal's resolution is 1 mL (scale 1.0 in config/sim.yaml).
    assert _cell(html, "s-reservoir") == f"{last - 800.0:+.0f} mL (800 to {last:.0f} mL)"

    assert _cell(html, "s-alarms") == "high 1, medium 2, low 1"
    assert _cell(html, "s-safe-stop") == "0:45 (45 s)"
    assert _cell(html, "s-samples") == f"{len(proc.states)} / 0"
    assert _cell(html, "s-events") == str(len(proc.events))
    assert _cell(html, "s-duration") == fmt_duration(len(proc.states) - 1)


def test_summary_values_from_the_record(rendered: Rendered) -> None:
    sm = summarize(open_record(rendered.record))
    assert sm.drug_elapsed_s == 1800.0
    assert sm.pressure_max_mmhg == 27.5
    assert sm.safe_stop_s == 45.0
    assert sm.alarm_onsets == {"high": 1, "medium": 2, "low": 1}
    assert sm.flow_perfusion is not None
    assert (sm.flow_perfusion.min, sm.flow_perfusion.max) == (400.0, 505.0)
    # Missing readings in safe-stop are NULL, not 0: they do not drag the minimum down.
    assert sm.flow_perfusion.n == len([s for s in rendered.proc.states if s.phase == "perfusion"])
    assert sm.reservoir_first_ml == 800.0
    assert sm.gap_samples == 0


def test_fmt_duration() -> None:
    assert [fmt_duration(s) for s in (0, 45, 1800, 3600, 3725.4)] == [
        "0:00",
        "0:45",
        "30:00",
        "1:00:00",
        "1:02:05",
    ]


# --------------------------------------------------------------------------- self-contained


def test_html_embeds_the_figures_and_references_nothing_outside(rendered: Rendered) -> None:
    html = rendered.html
    images = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert len(images) >= 4
    assert all(src.startswith("data:image/png;base64,") for src in images)
    assert html.count("data:image/png;base64,") == len(images) == 6
    for forbidden in ("http://", "https://", 'src="//', 'href="//', "<link", "<script", "@import"):
        assert forbidden not in html, forbidden
    assert "url(" not in html
    pngs = sorted(p.name for p in rendered.png_dir.iterdir())
    assert pngs == sorted(
        f"{n}.png" for n in ("flow", "pressure", "temperature", "pump", "heater", "reservoir")
    )
    for p in rendered.png_dir.iterdir():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(p)
        assert img.shape[1] == 1100
        assert float(np.var(img[..., :3])) > 0.005  # not blank


def test_text_is_escaped_and_the_event_log_is_complete(rendered: Rendered) -> None:
    html = rendered.html
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in html
    assert "O&#x27;Brien" in html
    log = html[html.index("<h2>Event log") :]
    assert log.count("<tr") == len(rendered.proc.events) + 1  # header row
    assert 'class="high"' in log
    assert "perfusion -&gt; safe_stop" in log
    assert "washout sample taken" in log


# --------------------------------------------------------------------------- CSV and CLI


def test_csv_export_has_every_sample_with_nulls_empty(rendered: Rendered, tmp_path: Path) -> None:
    out = tmp_path / "samples.csv"
    n = export_csv(rendered.record, out)
    assert n == len(rendered.proc.states)
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == SAMPLE_COLUMNS
    assert len(rows) == n + 1
    col = {c: i for i, c in enumerate(SAMPLE_COLUMNS)}
    safe = [r for r in rows[1:] if r[col["phase"]] == "safe_stop"]
    assert len(safe) == 45
    assert {r[col["flow_ml_min"]] for r in safe} == {""}  # NULL exported as empty, not 0
    first = rows[1]
    assert (first[col["seq"]], first[col["tick"]], first[col["phase"]]) == ("0", "0", "priming")
    # At the resolution of the pump tacho (scale 0.01 rpm), not 4.545454545454546.
    assert first[col["pump_speed_rpm_measured"]] == "4.55"
    assert first[col["reservoir_volume_ml"]] == ""


def test_cli_functions(rendered: Rendered, tmp_path: Path) -> None:
    record = tmp_path / "r.sqlite"
    shutil.copy(rendered.record, record)
    assert main_report([str(record)]) == 0
    assert (tmp_path / "r.html").is_file()
    assert len(list((tmp_path / "r-figures").glob("*.png"))) == 6
    assert main_export([str(record), "--csv", "-o", str(tmp_path / "x.csv")]) == 0
    assert len((tmp_path / "x.csv").read_text().splitlines()) == len(rendered.proc.states) + 1
    assert main_report([str(tmp_path / "missing.sqlite")]) == 1


def test_damaged_record_is_refused(rendered: Rendered, tmp_path: Path) -> None:
    bad = tmp_path / "bad.sqlite"
    data = bytearray(rendered.record.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")
    data[2 * page_size : 4 * page_size] = b"\xa5" * (2 * page_size)  # scribble over pages 3-4
    bad.write_bytes(bytes(data))
    with pytest.raises(RecordError):
        render_report(bad, tmp_path / "bad.html")
    assert not (tmp_path / "bad.html").exists()


# --------------------------------------------------------------------------- browser


def _near(img: np.ndarray[Any, Any], rgb: tuple[int, int, int], tol: int = 12) -> int:
    px = (img[..., :3] * 255.0).astype(np.int16)
    return int(np.all(np.abs(px - np.array(rgb, dtype=np.int16)) <= tol, axis=-1).sum())


def test_headless_chromium_renders_the_plots(rendered: Rendered, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: .ci/run installs the Debian packages chromium and "
            "chromium-driver (apt-get install -y chromium chromium-driver)",
            pytrace=False,
        )
    shot = tmp_path / "shot.png"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        rendered.html_path.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file(), proc.stderr[-2000:]
    img = imread(shot)
    assert img.shape[:2] == (2000, 1200)
    assert float(np.var(img[..., :3])) > 0.01  # not a blank page
    # The plots are drawn: the measured-flow line colour and the perfusion shading (#a1d99b at
    # alpha 0.35 over white) cover many pixels of the first screen.
    assert _near(img, (31, 119, 180)) > 300
    assert _near(img, (222, 242, 220), tol=6) > 20_000
