"""``ilup report``: one self-contained HTML file (figures embedded as data URIs, no external
references) from a procedure record, plus the same figures as PNG files."""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ilup_controller.config.resolution import DERIVED_DECIMALS, recorded_decimals
from ilup_controller.exitcodes import ExitCode
from ilup_controller.record.chain import verify_record
from ilup_controller.record.commands import add_report_arguments
from ilup_controller.record.store import RecordData, RecordError, open_record

PRIORITIES = ("high", "medium", "low")
# IEC 60601-1-8 alarm colours (high red, medium yellow, low cyan), kept off the data colours.
PRIORITY_COLOURS = {"high": "#ff0000", "medium": "#e6b800", "low": "#00bcd4"}
PHASE_COLOURS = {
    "idle": "#bbbbbb",
    "priming": "#9ecae1",
    "perfusion": "#a1d99b",
    "washout": "#fdd0a2",
    "complete": "#dadaeb",
    "safe_stop": "#fc9272",
}
FloatArray = np.ndarray[Any, np.dtype[np.float64]]


# --------------------------------------------------------------------------- summary


@dataclass(frozen=True, slots=True)
class Stats:
    mean: float
    min: float
    max: float
    n: int


@dataclass(frozen=True, slots=True)
class Summary:
    start_utc: datetime | None
    duration_s: float
    n_samples: int
    n_events: int
    gap_samples: int  # samples missing from the sequence (dropped or lost)
    drug_elapsed_s: float | None  # time at target in the drug phase (max of the timer)
    drug_target_s: float | None  # configured drug-phase length, if the config says
    flow_perfusion: Stats | None
    pressure_max_mmhg: float | None
    temperature_perfusion: Stats | None
    reservoir_first_ml: float | None
    reservoir_last_ml: float | None
    alarm_onsets: dict[str, int]
    safe_stop_s: float
    # Decimals of each sample column: the resolution of its signal in the recorded config.
    decimals: dict[str, int] = field(default_factory=dict)

    def digits(self, column: str) -> int:
        return self.decimals.get(column, DERIVED_DECIMALS)

    @property
    def reservoir_change_ml(self) -> float | None:
        if self.reservoir_first_ml is None or self.reservoir_last_ml is None:
            return None
        return self.reservoir_last_ml - self.reservoir_first_ml


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _stats(values: Sequence[float | None]) -> Stats | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    return Stats(math.fsum(v) / len(v), min(v), max(v), len(v))


def summarize(data: RecordData) -> Summary:
    s, events = data.samples, data.events
    times = [_utc(t) for t in s["t_utc"]] + [_utc(e["t_utc"]) for e in events]
    start = min(times) if times else None
    end = max(times) if times else None
    in_perfusion = [p == "perfusion" for p in s["phase"]]

    def perfusion(col: str) -> list[float | None]:
        return [v for v, keep in zip(s[col], in_perfusion, strict=True) if keep]

    pressures = [p for p in s["pressure_mmhg"] if p is not None]
    reservoir = [v for v in s["reservoir_volume_ml"] if v is not None]
    onsets = {p: 0 for p in PRIORITIES}
    for e in events:
        if e["kind"] == "onset":
            key = e["priority"] or "unknown"
            onsets[key] = onsets.get(key, 0) + 1
    seqs = s["seq"]
    # Sample numbers start at 0 and count dropped samples too: every hole is a missing sample.
    gap_samples = (seqs[0] if seqs else 0) + sum(b - a - 1 for a, b in pairwise(seqs))
    return Summary(
        start_utc=start,
        duration_s=(end - start).total_seconds() if start and end else 0.0,
        n_samples=data.n_samples,
        n_events=len(events),
        gap_samples=gap_samples,
        drug_elapsed_s=max(s["drug_elapsed_s"]) if s["drug_elapsed_s"] else None,
        drug_target_s=_config_drug_phase_s(data.meta),
        flow_perfusion=_stats(perfusion("flow_ml_min")),
        pressure_max_mmhg=max(pressures) if pressures else None,
        temperature_perfusion=_stats(perfusion("temperature_c")),
        reservoir_first_ml=reservoir[0] if reservoir else None,
        reservoir_last_ml=reservoir[-1] if reservoir else None,
        alarm_onsets=onsets,
        safe_stop_s=_safe_stop_s(events, end),
        decimals=recorded_decimals(data.meta.get("config_json")),
    )


def _safe_stop_s(events: list[dict[str, Any]], end: datetime | None) -> float:
    """From the phase events (committed before they were acknowledged): entering safe_stop
    starts a span, leaving it ends one; a span still open ends with the record."""
    total, since = 0.0, None
    for e in events:
        if e["kind"] != "phase":
            continue
        t = _utc(e["t_utc"])
        if e["to_phase"] == "safe_stop" and since is None:
            since = t
        elif e["from_phase"] == "safe_stop" and since is not None:
            total += (t - since).total_seconds()
            since = None
    if since is not None and end is not None:
        total += (end - since).total_seconds()
    return total


def _config_drug_phase_s(meta: dict[str, str]) -> float | None:
    try:
        value = json.loads(meta.get("config_json", ""))["procedure"]["drug_phase_s"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


# --------------------------------------------------------------------------- formatting


def fmt_duration(seconds: float) -> str:
    """``m:ss`` (``h:mm:ss`` from one hour), rounded to the second."""
    total = round(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _num(value: float | None, digits: int, unit: str = "") -> str:
    if value is None:
        return "no data"
    return f"{value:.{digits}f}{' ' + unit if unit else ''}"


def _stats_text(st: Stats | None, digits: int, unit: str) -> str:
    if st is None:
        return "no data"
    return f"{st.mean:.{digits}f} / {st.min:.{digits}f} / {st.max:.{digits}f} {unit}"


def summary_rows(sm: Summary) -> list[tuple[str, str, str]]:
    """(id, label, value) rows of the summary table."""
    drug = "no data"
    if sm.drug_elapsed_s is not None:
        drug = f"{fmt_duration(sm.drug_elapsed_s)} ({sm.drug_elapsed_s:.0f} s)"
        if sm.drug_target_s is not None:
            drug += f" of {fmt_duration(sm.drug_target_s)}"
    change = sm.reservoir_change_ml
    r = sm.digits("reservoir_volume_ml")
    reservoir = "no data"
    if change is not None:
        reservoir = (
            f"{change:+.{r}f} mL ({sm.reservoir_first_ml:.{r}f} to {sm.reservoir_last_ml:.{r}f} mL)"
        )
    alarms = ", ".join(f"{p} {n}" for p, n in sm.alarm_onsets.items())
    return [
        ("s-drug", "Drug phase: time at target", drug),
        (
            "s-flow",
            "Flow in perfusion, mean / min / max",
            _stats_text(sm.flow_perfusion, sm.digits("flow_ml_min"), "mL/min"),
        ),
        (
            "s-pressure",
            "Maximum PA pressure",
            _num(sm.pressure_max_mmhg, sm.digits("pressure_mmhg"), "mmHg"),
        ),
        (
            "s-temperature",
            "Perfusate temperature in perfusion, mean / min / max",
            _stats_text(sm.temperature_perfusion, sm.digits("temperature_c"), "°C"),
        ),
        ("s-reservoir", "Reservoir volume change (first to last reading)", reservoir),
        ("s-alarms", "Alarm onsets by priority", alarms),
        (
            "s-safe-stop",
            "Total time in safe-stop",
            f"{fmt_duration(sm.safe_stop_s)} ({sm.safe_stop_s:.0f} s)",
        ),
        ("s-duration", "Record duration", fmt_duration(sm.duration_s)),
        ("s-samples", "Samples recorded / missing", f"{sm.n_samples} / {sm.gap_samples}"),
        ("s-events", "Events", str(sm.n_events)),
    ]


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True, slots=True)
class _Series:
    label: str
    column: str
    style: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Plot:
    name: str
    title: str
    ylabel: str
    series: tuple[_Series, ...]


_TARGET = {"drawstyle": "steps-post", "linestyle": "--", "linewidth": 1.2}
_RAMP = {"linestyle": ":", "linewidth": 1.2}
PLOTS: tuple[_Plot, ...] = (
    _Plot(
        "flow",
        "Flow",
        "mL/min",
        (
            _Series("measured", "flow_ml_min", {"color": "#1f77b4"}),
            _Series("target", "flow_target_ml_min", {"color": "black", **_TARGET}),
            _Series("ramped setpoint", "flow_ramped_ml_min", {"color": "#555555", **_RAMP}),
        ),
    ),
    _Plot(
        "pressure",
        "PA pressure",
        "mmHg",
        (
            _Series("measured", "pressure_mmhg", {"color": "#9467bd"}),
            _Series("limit", "pressure_limit_mmhg", {"color": "#d62728", **_TARGET}),
        ),
    ),
    _Plot(
        "temperature",
        "Temperature",
        "°C",
        (
            _Series("perfusate", "temperature_c", {"color": "#1f77b4"}),
            _Series("heater water", "water_temperature_c", {"color": "#8c564b"}),
            _Series("target", "temperature_target_c", {"color": "black", **_TARGET}),
            _Series("ramped setpoint", "temperature_ramped_c", {"color": "#555555", **_RAMP}),
        ),
    ),
    _Plot(
        "pump",
        "Pump speed",
        "rpm",
        (
            _Series("command", "pump_speed_rpm", {"color": "#2ca02c"}),
            _Series("measured", "pump_speed_rpm_measured", {"color": "#7f7f7f", **_RAMP}),
        ),
    ),
    _Plot(
        "heater",
        "Heater power",
        "%",
        (_Series("command", "heater_pct", {"color": "#e377c2"}),),
    ),
    _Plot(
        "reservoir",
        "Reservoir volume",
        "mL",
        (_Series("measured", "reservoir_volume_ml", {"color": "#1f77b4"}),),
    ),
)


class _Axis:
    """Minutes since the start of the record, with a line break wherever samples are missing."""

    def __init__(self, data: RecordData, start: datetime) -> None:
        s = data.samples
        self._start = start
        x = np.array([self.minutes(t) for t in s["t_utc"]], dtype=np.float64)
        self.x_unbroken = x
        seq = np.array(s["seq"], dtype=np.int64)
        # Insert a NaN after each hole in the sequence so no line is drawn across a gap.
        self._breaks = np.flatnonzero(np.diff(seq) > 1) + 1 if len(seq) > 1 else np.array([])
        self.x = self.broken(x)

    def minutes(self, utc_text: str) -> float:
        return (_utc(utc_text) - self._start).total_seconds() / 60.0

    def broken(self, values: FloatArray) -> FloatArray:
        if len(self._breaks) == 0:
            return values
        return np.insert(values, self._breaks, np.nan)


def _column(data: RecordData, name: str) -> FloatArray:
    return np.array(
        [np.nan if v is None else float(v) for v in data.samples[name]], dtype=np.float64
    )


def _phase_runs(data: RecordData, axis: _Axis) -> list[tuple[float, float, str]]:
    runs: list[tuple[float, float, str]] = []
    phases: list[str] = data.samples["phase"]
    for i, phase in enumerate(phases):
        x = float(axis.x_unbroken[i])
        if runs and runs[-1][2] == phase:
            runs[-1] = (runs[-1][0], x, phase)
        else:
            if runs:  # the previous phase lasts until this sample
                runs[-1] = (runs[-1][0], x, runs[-1][2])
            runs.append((x, x, phase))
    return runs


def _draw(plot: _Plot, data: RecordData, axis: _Axis) -> Figure | None:
    columns = [(sr, axis.broken(_column(data, sr.column))) for sr in plot.series]
    if not any(np.isfinite(y).any() for _, y in columns):
        return None
    fig = Figure(figsize=(11.0, 3.0), dpi=100)
    # Fixed margins (not a layout engine) so the time axes of all figures line up.
    fig.subplots_adjust(left=0.07, right=0.83, top=0.88, bottom=0.17)
    ax: Axes = fig.add_subplot()
    handles: list[Any] = []
    for sr, y in columns:
        (line,) = ax.plot(axis.x, y, label=sr.label, **sr.style)
        handles.append(line)
    phases_seen: list[str] = []
    for x0, x1, phase in _phase_runs(data, axis):
        ax.axvspan(x0, x1, color=PHASE_COLOURS.get(phase, "#eeeeee"), alpha=0.35, lw=0)
        if phase not in phases_seen:
            phases_seen.append(phase)
    handles += [
        Patch(color=PHASE_COLOURS.get(p, "#eeeeee"), alpha=0.35, label=p) for p in phases_seen
    ]
    priorities_seen: list[str] = []
    markers = False
    for e in data.events:
        if e["kind"] == "onset":
            colour = PRIORITY_COLOURS.get(e["priority"] or "", "grey")
            ax.axvline(axis.minutes(e["t_utc"]), color=colour, linewidth=1.0, alpha=0.9)
            if e["priority"] not in priorities_seen:
                priorities_seen.append(e["priority"])
        elif e["kind"] == "marker":
            ax.axvline(axis.minutes(e["t_utc"]), color="black", linestyle="-.", linewidth=1.0)
            markers = True
    handles += [
        Line2D([], [], color=PRIORITY_COLOURS.get(p or "", "grey"), label=f"alarm ({p})")
        for p in priorities_seen
    ]
    if markers:
        handles.append(Line2D([], [], color="black", linestyle="-.", label="marker"))
    ax.set_title(plot.title, loc="left")
    ax.set_ylabel(plot.ylabel)
    ax.set_xlabel("time since start of record (min)")
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    return fig


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No metadata: the default "Software" text carries a web address.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.warn { background: #fdd; border: 2px solid #d62728; padding: 0.5em; font-weight: bold; }
tr.high td { background: #fde0e0; } tr.medium td { background: #fff0dd; }
tr.low td { background: #e6f0fa; }
figure { margin: 0.8em 0; } img { max-width: 100%; }
pre { white-space: pre-wrap; font-size: 0.8em; }
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[object]], row_classes: Sequence[str] = ()
) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{_e(row_classes[i])}"' if i < len(row_classes) and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _plain(value: object) -> object:
    """An alarm's value or limit without float noise (6 significant digits: 3.78, not
    3.7800000000000002); the signal behind it is not recorded with the event."""
    return f"{value:.6g}" if isinstance(value, float) else value


def _event_log(data: RecordData, axis: _Axis | None) -> str:
    rows, classes = [], []
    for e in data.events:
        phase = f"{e['from_phase']} -> {e['to_phase']}" if e["to_phase"] else ""
        rows.append(
            (
                e["t_utc"],
                "" if axis is None else f"{axis.minutes(e['t_utc']):.2f}",
                e["kind"],
                e["alarm_id"],
                e["priority"],
                phase,
                e["message"],
                e["operator"],
                _plain(e["value"]),
                _plain(e["limit_value"]),
            )
        )
        classes.append(e["priority"] if e["kind"] == "onset" and e["priority"] else "")
    header = (
        "UTC",
        "min",
        "kind",
        "alarm",
        "priority",
        "phase",
        "message",
        "operator",
        "value",
        "limit",
    )
    return _table(header, rows, classes)


def _config_text(meta: dict[str, str]) -> str:
    raw = meta.get("config_json", "")
    try:
        return json.dumps(json.loads(raw), indent=2, sort_keys=True)
    except ValueError:
        return raw


def render_report(
    record_path: str | Path, out_html: str | Path, *, png_dir: str | Path | None = None
) -> Path:
    """Write the report of ``record_path`` to ``out_html`` (and each figure to ``png_dir``)."""
    data = open_record(record_path)
    chain = verify_record(record_path)  # `ilup verify`: intact, unsealed or tampered
    sm = summarize(data)
    axis = _Axis(data, sm.start_utc) if sm.start_utc is not None else None
    figures: list[tuple[_Plot, bytes]] = []
    if axis is not None and data.n_samples:
        for plot in PLOTS:
            fig = _draw(plot, data, axis)
            if fig is not None:
                figures.append((plot, _png(fig)))
    if png_dir is not None:
        d = Path(png_dir)
        d.mkdir(parents=True, exist_ok=True)
        for plot, png in figures:
            (d / f"{plot.name}.png").write_bytes(png)
    meta = data.meta
    cart = meta.get("cart_id", "?")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>ILuP procedure report: {_e(cart)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>ILuP procedure report: cart {_e(cart)}</h1>",
    ]
    parts += [f'<p class="warn">{_e(w)}</p>' for w in data.warnings]
    if chain.status in ("tampered", "unreadable"):
        parts.append(
            f'<p class="warn" id="chain-warning">Record integrity: {_e(chain.summary())}</p>'
        )
    if sm.gap_samples:
        parts.append(
            f'<p class="warn">{sm.gap_samples} samples are missing from this record (see Gaps).</p>'
        )
    parts.append(
        _table(
            ("record", "value"),
            [
                ("file", data.path.name),
                ("cart", cart),
                ("created (UTC)", meta.get("created_utc")),
                ("first entry (UTC)", sm.start_utc.isoformat() if sm.start_utc else "none"),
                ("configuration sha256", meta.get("config_sha256")),
                ("schema version", meta.get("schema_version")),
                ("integrity check", data.integrity),
                ("hash chain (ilup verify)", chain.summary()),
            ],
        )
    )
    parts.append("<h2>Summary</h2><table><tbody>")
    parts += [
        f'<tr><th>{_e(label)}</th><td id="{ident}">{_e(value)}</td></tr>'
        for ident, label, value in summary_rows(sm)
    ]
    parts.append("</tbody></table>")
    parts.append("<h2>Figures</h2>")
    if not figures:
        parts.append("<p>No samples recorded.</p>")
    for plot, png in figures:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(
            f'<figure id="fig-{plot.name}"><img alt="{_e(plot.title)} over time" src="{uri}">'
            f"<figcaption>{_e(plot.title)} ({_e(plot.ylabel)}); phases shaded, alarm onsets "
            "and markers as vertical lines.</figcaption></figure>"
        )
    parts.append("<h2>Gaps</h2>")
    if data.gaps:
        parts.append(
            _table(
                ("from seq", "to seq", "reason"),
                [(g["from_seq"], g["to_seq"], g["reason"]) for g in data.gaps],
            )
        )
    else:
        parts.append("<p>No gaps recorded.</p>")
    parts.append(f"<h2>Event log ({len(data.events)})</h2>")
    parts.append(_event_log(data, axis))
    parts.append(
        "<h2>Configuration</h2><details><summary>effective configuration</summary>"
        f"<pre>{_e(_config_text(meta))}</pre></details>"
    )
    parts.append("</body></html>\n")
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def run_report(args: argparse.Namespace) -> int:
    """``ilup report RECORD [-o OUT] [--png-dir DIR]``; returns the exit status."""
    out: Path = args.output or args.record.with_suffix(".html")
    png_dir: Path = args.png_dir or out.with_name(out.stem + "-figures")
    try:
        render_report(args.record, out, png_dir=png_dir)
    except RecordError as e:
        print(f"ilup report: {e}", file=sys.stderr)
        return ExitCode.FAILURE
    print(out)
    return ExitCode.OK


def main_report(argv: Sequence[str] | None = None) -> int:
    ap = add_report_arguments(argparse.ArgumentParser(prog="ilup report", description=__doc__))
    return run_report(ap.parse_args(argv))
