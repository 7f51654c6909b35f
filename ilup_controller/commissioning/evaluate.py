"""Pure evaluation of what ``ilup commission`` measured: no I/O, no clock. Each function takes
samples and the configuration and returns a verdict with the figures and, when it failed, the
fix to make."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ilup_controller.config.models import CartConfig, DataType, SensorLimits, Signal
from ilup_controller.core.diagnostics import FLOW_GAIN_HIGH, FLOW_GAIN_LOW
from ilup_controller.core.sensors import resolution_of

# For white noise of std sigma, the median |second difference| is 0.6745 * sqrt(6) sigma: the
# estimator core/sensors.py uses, so the step sees noise as the diagnostics will.
MEDIAN_ABS_D2_PER_SIGMA = 0.6745 * 6**0.5
STROKE_VOLUME_TOLERANCE = 0.05  # offer the measured stroke volume beyond 5 %
TRIP_TACHO_FRACTION = 0.05  # "fallen to 0": under 5 % of the test speed (or one LSB)


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    measured: str
    fix: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    warn: bool = False  # passed, with something to look at


def zero_reference_mmhg(cfg: CartConfig) -> float:
    """True pressure while zeroing: 0 with the transducer open to atmosphere. A cart served by
    the simulator (a ``simulator`` section) has no stopcock to open: its line rests at the
    simulated outflow pressure, which is then the reference."""
    if cfg.simulator is not None:
        return cfg.simulator.plant.outflow_pressure_mmhg
    return 0.0


def noise_sigma(values: Sequence[float]) -> float:
    if len(values) < 8:
        return 0.0
    d2 = [abs(values[i] - 2.0 * values[i - 1] + values[i - 2]) for i in range(2, len(values))]
    return statistics.median(d2) / MEDIAN_ABS_D2_PER_SIGMA


def in_range(name: str, sig: Signal, values: Sequence[float | bool]) -> Verdict:
    """Every sample decodes to a finite value inside the signal's range."""
    if not values:
        return Verdict(False, f"{name}: no reading", _fix_no_reading(name, sig))
    if sig.data_type is DataType.bool:
        return Verdict(True, f"{name}: reads {bool(values[-1])}")
    nums = [float(v) for v in values]
    lo, hi = min(nums), max(nums)
    text = f"{name}: {lo:g}..{hi:g} {sig.units}".rstrip()
    bad = [v for v in nums if not math.isfinite(v)]
    if sig.range is not None:
        bad += [v for v in nums if math.isfinite(v) and not sig.range[0] <= v <= sig.range[1]]
    if not bad:
        return Verdict(True, text, figures={"min": lo, "max": hi})
    worst = bad[0]
    rng = f"[{sig.range[0]:g}, {sig.range[1]:g}]" if sig.range else "(finite)"
    fix = f"signals.{name}: reads {worst:g} {sig.units}, outside its range {rng}: "
    if sig.register_count == 2:
        fix += (
            f"a 32-bit value far off is most often the word order: try word_order: "
            f"{'little' if sig.word_order == 'big' else 'big'} (device manual: 'word swap', "
            "'CDAB'), then check data_type, scale and offset"
        )
    elif sig.range is not None and worst < sig.range[0]:
        fix += (
            "a reading below the range of an analogue input is a broken loop (4-20 mA at "
            "0 mA): check the sensor is connected, its cable and its supply; then scale/offset"
        )
    else:
        fix += "check address, data_type, scale and offset against the device manual"
    return Verdict(False, text, fix, {"min": lo, "max": hi})


# Direct-read problems (modbus/link.py DirectRead) that are the register map's; the others
# (no reply in time, no connection) are the device's or the line's.
MAP_PROBLEMS = ("refused", "invalid")


def _slow(device: str) -> str:
    return f"a device slower than devices.{device}.timeout_s or a busy line (run the step again)"


def unread(device: str, problems: Mapping[str, tuple[str, str]]) -> Verdict:
    """A device that answered for some of its signals, not for these: signal -> (problem,
    detail) of the direct read (modbus/link.py DirectRead). A register the device refuses or
    that does not decode is the register map's; one that got no reply in time is not."""
    mapped = [s for s, (p, _) in problems.items() if p in MAP_PROBLEMS]
    late = [s for s in problems if s not in mapped]
    fixes = []
    if mapped:
        fixes.append(
            f"check table, address and data_type of {_keys(mapped)} against the device manual"
        )
    if late:
        fixes.append(
            f"{_keys(late)}: no reply in time although the device answered for its other "
            f"signals: {_slow(device)}"
        )
    seen = ", ".join(f"{s} ({detail})" for s, (_, detail) in problems.items())
    return Verdict(False, f"{device}: answers, but not for {seen}", "; ".join(fixes))


def _keys(signals: Sequence[str]) -> str:
    return ", ".join(f"signals.{s}" for s in signals)


def _fix_no_reading(name: str, sig: Signal) -> str:
    return (
        f"signals.{name}: no value could be read from {sig.table} {sig.address} on device "
        f"{sig.device!r}: check table and address against the device manual"
    )


def readback(
    name: str,
    sig: Signal,
    written: float,
    read: float | bool | None,
    problem: tuple[str, str] = ("refused", ""),
) -> Verdict:
    """``problem``: why ``read`` is None, as for :func:`unread`."""
    if read is None:
        kind, detail = problem
        seen = f"{name}: wrote {written:g}, read nothing back" + (f" ({detail})" if detail else "")
        if kind in MAP_PROBLEMS:
            return Verdict(False, seen, _fix_no_reading(name, sig))
        late = f"signals.{name}: no reply in time to the read after the write: {_slow(sig.device)}"
        return Verdict(False, seen, late)
    step = abs(sig.scale) if sig.data_type is not DataType.float32 else 1e-3 * abs(written)
    ok = abs(float(read) - written) <= step * 1.0001 + 1e-12
    text = f"{name}: wrote {written:g}, read back {float(read):g} {sig.units}".rstrip()
    fix = (
        ""
        if ok
        else (
            f"signals.{name}: the device holds another value than written: check address, "
            "data_type, word_order, scale and that the register is writable (device manual)"
        )
    )
    return Verdict(ok, text, fix, {"written": written, "read": float(read)})


def watchdog_trip(
    device: str,
    feedback: str,
    timeout_s: float,
    tick_s: float,
    test_value: float,
    seen_running: float | None,
    samples: Sequence[tuple[float, float]],
) -> Verdict:
    """``samples``: (seconds since the last write, feedback value). It must fall under
    ``TRIP_TACHO_FRACTION`` of ``test_value`` within the timeout + one tick + the feedback's
    own latency (one sample period)."""
    limit_s = timeout_s + tick_s + _period(samples)
    if seen_running is None or seen_running < 0.5 * test_value:
        return Verdict(
            False,
            f"{feedback} showed {seen_running if seen_running is not None else 'nothing'} "
            f"while {test_value:g} was commanded",
            f"device {device!r} did not start on a small command: check the command signal "
            f"and that {feedback} is its feedback (device manual)",
        )
    threshold = TRIP_TACHO_FRACTION * test_value
    tripped_at = next((t for t, v in samples if v <= threshold), None)
    last = samples[-1][1] if samples else float("nan")
    figures = {"timeout_s": timeout_s, "limit_s": limit_s, "running": seen_running}
    if tripped_at is None:
        return Verdict(
            False,
            f"{feedback} still {last:g} after {samples[-1][0] if samples else 0:.1f} s without "
            f"a write (limit {limit_s:.2f} s)",
            f"the watchdog of device {device!r} does not stop it: enable the device's "
            "communication watchdog (drive parameter 'communication loss action: stop') and "
            f"check devices.{device}.watchdog.signal against the manual",
            figures,
        )
    figures["tripped_after_s"] = tripped_at
    ok = tripped_at <= limit_s
    text = (
        f"{feedback} fell from {seen_running:g} to <= {threshold:g} {tripped_at:.2f} s after "
        f"the last write (limit {limit_s:.2f} s)"
    )
    fix = (
        ""
        if ok
        else (
            f"device {device!r} trips late: its timeout is longer than "
            f"devices.{device}.watchdog.timeout_s; set the same value in the device"
        )
    )
    return Verdict(ok, text, fix, figures)


def _period(samples: Sequence[tuple[float, float]]) -> float:
    """The feedback's own latency: one sample period, at least 0.1 s (a tacho's filter)."""
    if len(samples) < 2:
        return 0.1
    return max(0.1, (samples[-1][0] - samples[0][0]) / (len(samples) - 1))


def pressure_zero(values: Sequence[float], reference_mmhg: float, limit_mmhg: float) -> Verdict:
    if len(values) < 5:
        return Verdict(False, "too few pressure readings", "check the pressure sensor reads")
    mean = statistics.fmean(values)
    offset = mean - reference_mmhg
    sigma = statistics.pstdev(values)
    text = (
        f"mean {mean:.2f} mmHg over {len(values)} readings (noise {sigma:.2f}), reference "
        f"{reference_mmhg:g} mmHg: offset {offset:+.2f} mmHg"
    )
    figures = {"offset_mmhg": offset, "mean_mmhg": mean, "noise_mmhg": sigma}
    if abs(offset) > limit_mmhg:
        return Verdict(
            False,
            text,
            f"an offset over {limit_mmhg:g} mmHg is not a zero: open the transducer's stopcock "
            "to atmosphere with the pump stopped, and check the sensor's scale and offset",
            figures,
        )
    return Verdict(True, text, figures=figures)


def stroke_volume(
    configured: float, points: Sequence[tuple[float, float]]
) -> tuple[Verdict, float | None]:
    """``points``: (tacho or command rpm, mean flow mL/min) at each test speed. The measured
    stroke volume is the mean of flow / speed; more than 5 % off the configured value: a warn
    with the measured value offered."""
    ratios = [q / s for s, q in points if s > 0.0]
    if len(ratios) < 2:
        return Verdict(False, "no flow at the test speeds", "check the flow sensor"), None
    sv = statistics.fmean(ratios)
    spread = (max(ratios) - min(ratios)) / sv if sv > 0 else math.inf
    figures = {"measured_ml_per_rev": sv, "configured_ml_per_rev": configured, "spread": spread}
    each = ", ".join(f"{q:.1f} mL/min at {s:.2f} rpm" for s, q in points)
    text = (
        f"{each}: {sv:.2f} mL/rev (configured {configured:g}, {100 * (sv / configured - 1):+.1f} %)"
    )
    if not FLOW_GAIN_LOW <= sv / configured <= 1.0 / FLOW_GAIN_LOW:
        return Verdict(
            False,
            text,
            "the flow per revolution is far from the configured stroke volume: check the tubing "
            "size in the pump head, the flow sensor's scale and its direction",
            figures,
        ), None
    if spread > 0.1:
        return Verdict(
            False,
            text,
            "flow / speed differs by more than 10 % between the two speeds: the roller may be "
            "under-occluded, or the flow sensor has an offset; set the occlusion and re-run",
            figures,
        ), None
    off = abs(sv / configured - 1.0) > STROKE_VOLUME_TOLERANCE
    fix = (
        f"more than {STROKE_VOLUME_TOLERANCE * 100:.0f} % off: use the measured value "
        f"(accepted with --yes, or set control.flow.stroke_volume_ml_per_rev: {sv:.2f})"
        if off
        else ""
    )
    return Verdict(True, text, fix, figures, warn=off), sv


def step_response(
    configured_sv: float,
    du_rpm: float,
    dq_ml_min: float,
    dp_mmhg: float,
    pressure_noise_mmhg: float,
    pressure_lsb_mmhg: float,
) -> Verdict:
    """Pump step: flow moves by about du x stroke volume, pressure rises."""
    gain = dq_ml_min / du_rpm if du_rpm else 0.0
    pgain = dp_mmhg / du_rpm if du_rpm else 0.0
    figures = {
        "du_rpm": du_rpm,
        "dq_ml_min": dq_ml_min,
        "dp_mmhg": dp_mmhg,
        "flow_gain_ml_min_per_rpm": gain,
        "pressure_gain_mmhg_per_rpm": pgain,
    }
    text = (
        f"+{du_rpm:.2f} rpm: flow {dq_ml_min:+.1f} mL/min ({gain:.1f} mL/min per rpm), "
        f"pressure {dp_mmhg:+.2f} mmHg ({pgain:.2f} mmHg per rpm)"
    )
    lo, hi = FLOW_GAIN_LOW * configured_sv, FLOW_GAIN_HIGH / FLOW_GAIN_LOW * configured_sv
    if gain <= 0:
        return Verdict(
            False,
            text,
            "flow fell when the pump sped up: the flow sensor is "
            "mounted backwards or its sign is wrong (scale < 0?)",
            figures,
        )
    if not lo <= gain <= hi:
        return Verdict(
            False,
            text,
            f"flow gain outside {lo:.0f}..{hi:.0f} mL/min per rpm: "
            "check the flow sensor's scale and the pump's speed scale",
            figures,
        )
    need = 2.0 * pressure_noise_mmhg + pressure_lsb_mmhg
    if dp_mmhg <= 0:
        return Verdict(
            False,
            text,
            "pressure did not rise with flow: check the pressure sensor "
            "sits on the inflow line and reads the right signal",
            figures,
        )
    if dp_mmhg < need:
        return Verdict(
            True,
            text,
            f"pressure rose by less than its noise ({need:.2f} mmHg): "
            "a low-resistance circuit, or a damped transducer line",
            figures,
            warn=True,
        )
    return Verdict(True, text, figures=figures)


def heater_rise(rise_c: float, needed_c: float, seconds: float, capped: str) -> Verdict:
    figures = {"rise_c": rise_c, "needed_c": needed_c, "seconds": seconds}
    text = f"water rose {rise_c:+.2f} degC in {seconds:.1f} s (needed {needed_c:.2f})"
    if capped:
        text += f"; stopped: {capped}"
    if rise_c >= needed_c:
        return Verdict(True, text, figures=figures)
    return Verdict(
        False,
        text,
        "the water did not warm under heater power: check the heater is switched on, its "
        "power command signal and scale, and that the water temperature signal is the heater's",
        figures,
    )


def sensor_noise(label: str, values: Sequence[float], limits: SensorLimits, sig: Signal) -> Verdict:
    """Noise as the diagnostics estimate it, against ``max_noise`` + quantisation."""
    lsb = resolution_of(sig.scale, sig.data_type)
    sigma = noise_sigma(values)
    allowed = limits.max_noise + 1.25 * lsb
    distinct = len(set(values))
    figures = {"noise": sigma, "allowed": allowed, "resolution": lsb, "distinct": float(distinct)}
    text = (
        f"{label}: noise {sigma:.3g} (allowed {allowed:.3g}), resolution {lsb:g}, "
        f"{distinct} distinct values in {len(values)}"
    )
    if sigma > allowed:
        return Verdict(
            False,
            text,
            f"{label} is noisier than alarms.*.max_noise: check the "
            "sensor's shielding and grounding, or its filter setting",
            figures,
        )
    return Verdict(True, text, figures=figures)
