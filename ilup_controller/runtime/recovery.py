"""Start-up: continue an unfinished procedure record, or begin a new one.

A record is unfinished when its procedure left idle and never reached ``complete``. The daemon
then reopens that same file, raises "controller restarted" with the outage, and restores targets,
drug-phase time, the phase to resume to, the latched alarms and the rewarming rate loop's slowed
integral from it, in the safe state: the operator decides to resume (safety.md 5.3). Nothing
reverts silently to defaults.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ilup_controller.config.models import CartConfig
from ilup_controller.core.cart import Restored
from ilup_controller.core.catalogue import CATALOGUE
from ilup_controller.core.control import REWARM_INTEGRAL
from ilup_controller.core.procedure import Phase
from ilup_controller.record.chain import verify_record
from ilup_controller.record.recorder import Recorder, config_json_of
from ilup_controller.record.store import RecordData, RecordError, open_record

log = logging.getLogger("ilup.recovery")


def _unfinished(data: RecordData) -> Phase | None:
    """The phase to resume to, or None if the record holds no unfinished procedure."""
    phase, before_stop = Phase.idle, Phase.idle
    for e in data.events:
        if e["kind"] == "phase" and e["to_phase"]:
            new = Phase(e["to_phase"])
            if new is Phase.safe_stop and phase is not Phase.safe_stop:
                before_stop = phase
            phase = new
    if phase is Phase.safe_stop:
        phase = before_stop
    return None if phase in (Phase.idle, Phase.complete) else phase


def _latched(data: RecordData) -> tuple[str, ...]:
    present: dict[str, bool] = {}
    for e in data.events:
        alarm_id = e["alarm_id"]
        if alarm_id not in CATALOGUE or alarm_id == "controller_restarted":
            continue
        if e["kind"] == "onset":
            present[alarm_id] = True
        elif e["kind"] == "reset" or (e["kind"] == "end" and not CATALOGUE[alarm_id].latching):
            present[alarm_id] = False
    return tuple(sorted(a for a, on in present.items() if on))


def _rate_integral_scale(data: RecordData) -> float:
    """The rewarming rate loop's integral scale as this procedure left it (1: never slowed)."""
    scales = [
        float(e["value"])
        for e in data.events
        if e["kind"] == REWARM_INTEGRAL and e["value"] is not None
    ]
    return min([1.0, *scales])


def restored_from(data: RecordData, now: datetime) -> Restored | None:
    phase = _unfinished(data)
    if phase is None or data.n_samples == 0:
        return None
    s = {k: v[-1] for k, v in data.samples.items()}
    last_t = datetime.fromisoformat(str(s["t_utc"]))
    return Restored(
        phase=phase,
        flow_target_ml_min=float(s["flow_target_ml_min"]),
        pressure_limit_mmhg=float(s["pressure_limit_mmhg"]),
        temperature_target_c=float(s["temperature_target_c"]),
        drug_elapsed_s=float(s["drug_elapsed_s"]),
        latched_alarms=_latched(data),
        outage_s=max(0.0, (now - last_t).total_seconds()),
        rate_integral_scale=_rate_integral_scale(data),
    )


@dataclass(frozen=True, slots=True)
class Opening:
    """The recorder to use; what to restore if it continues an unfinished procedure; and, when
    the last record could not be read, its path and why (it may hold an unfinished one)."""

    recorder: Recorder
    restored: Restored | None = None
    unreadable: tuple[str, str] | None = None  # (path, reason)


def open_procedure(cfg: CartConfig) -> Opening:
    directory = Path(cfg.record.directory)
    latest = sorted(directory.glob(f"{cfg.cart_id}-*.sqlite"))[-1:] if directory.is_dir() else []
    for path in latest:
        try:
            snapshot = restored_from(open_record(path), datetime.now(UTC))
        except (RecordError, sqlite3.Error, OSError, KeyError, ValueError) as e:
            # Whatever it held cannot be known: the caller starts held in safe_stop.
            log.critical("last record %s is unreadable (%s): starting held in safe_stop", path, e)
            return Opening(Recorder.from_config(cfg), unreadable=(str(path), str(e)))
        if snapshot is None:
            continue
        chain = verify_record(path)  # continued either way; the log says it was not intact
        if chain.status == "tampered":
            log.critical("record %s being continued does not verify: %s", path, chain.summary())
        log.warning(
            "continuing unfinished procedure record=%s phase=%s outage=%.1fs",
            path,
            snapshot.phase,
            snapshot.outage_s,
        )
        recorder = Recorder.reopen(
            path,
            config_json=config_json_of(cfg),
            sample_every_ticks=cfg.record.sample_every_ticks,
            queue_size=cfg.record.queue_size,
        )
        return Opening(recorder, restored=snapshot)
    return Opening(Recorder.from_config(cfg))
