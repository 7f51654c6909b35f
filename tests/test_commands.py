"""Operator commands: every reason code, duplicates, expiry, limits; fuzzing of every payload."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ilup_controller.commands import (
    COMMAND_MODELS,
    REASON_CODES,
    CommandProcessor,
    ParsedCommand,
    Reply,
    command_filter,
    default_reply_topic,
    response_topic_allowed,
    split_command_topic,
)
from ilup_controller.commands.payload import MAX_PAYLOAD_BYTES
from ilup_controller.commands.record_gate import needs_record
from ilup_controller.config import CartConfig, load_config
from ilup_controller.core.alarms import Condition
from ilup_controller.core.cart import CartCore
from ilup_controller.core.procedure import Phase
from ilup_controller.mqtt.link import Incoming
from ilup_controller.runtime.commands import CommandIntake

CFG = load_config("config/sim.yaml")
FLOW_SLEW_ML_MIN = CFG.commands.slew.flow_ml_min
PRESSURE_SLEW_MMHG = CFG.commands.slew.pressure_limit_mmhg
TEMPERATURE_SLEW_C = CFG.commands.slew.temperature_c
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
OPERATOR = "alice"
T_S = 10.0  # core time of every apply


def body(command_id: str = "c1", issued_at: datetime = NOW, **fields: Any) -> bytes:
    return json.dumps(
        {"command_id": command_id, "issued_at": issued_at.isoformat(), **fields}
    ).encode()


@dataclass
class Cart:
    core: CartCore
    proc: CommandProcessor

    def send(
        self,
        name: str,
        payload: bytes,
        *,
        now: datetime = NOW,
        sender: str = OPERATOR,
        response_topic: str | None = None,
    ) -> Reply:
        result = self.proc.parse(name, payload, now, sender, response_topic=response_topic)
        if isinstance(result, ParsedCommand):
            assert result.sender == sender
            return self.proc.apply(result, self.core, T_S, sender)
        return result


def new_cart(cfg: CartConfig = CFG, **kw: Any) -> Cart:
    return Cart(CartCore(cfg, 0.0), CommandProcessor(cfg, **kw))


@pytest.fixture
def cart() -> Cart:
    """A cart whose rate limit does not get in the way (test_rate_limit_after_the_burst)."""
    return new_cart(burst=1000)


def snapshot(core: CartCore) -> tuple[Any, ...]:
    """Everything a command could change."""
    ctl, proc = core.controller, core.procedure
    return (
        proc.phase,
        proc.resume_to,
        ctl.flow_target_ml_min,
        ctl.pressure_limit_mmhg,
        ctl.temperature_target_c,
        ctl.control_mode,
        ctl.output_mode,
        ctl.manual_speed_rpm,
        tuple(core.alarms.active(T_S)),
        core.alarms.audio_paused_until(),
    )


def raise_air_alarm(core: CartCore, t_s: float = 1.0) -> None:
    core.alarms.update(t_s, {"air_detected": Condition(True, detail="test bubble")})
    assert core.pump_blockers() == ("air_detected",)


def confirmed(cart: Cart, request: Reply, command_id: str, sender: str = OPERATOR) -> Reply:
    """The second step of a change whose reply said confirm_required."""
    assert request.status == "confirm_required", request
    return cart.send("confirm", body(command_id, token=request.token), sender=sender)


def rejected(reply: Reply, reason: str, *detail: str) -> None:
    assert (reply.status, reply.reason) == ("rejected", reason), reply
    for text in detail:
        assert text in reply.detail, (text, reply.detail)


# --------------------------------------------------------------------------- accepted commands


def test_setpoint_sets_the_targets_and_reports_the_change(cart: Cart) -> None:
    ctl = cart.core.controller
    assert (ctl.flow_target_ml_min, ctl.pressure_limit_mmhg, ctl.temperature_target_c) == (
        500.0,
        25.0,
        37.0,
    )
    request = cart.send(
        "setpoint", body(flow_ml_min=650.0, pressure_limit_mmhg=27.5, temperature_c=37.5)
    )
    # Raising the limit and a flow step over 100 mL/min: two steps (test_confirmation.py).
    assert (ctl.flow_target_ml_min, ctl.pressure_limit_mmhg) == (500.0, 25.0)
    reply = confirmed(cart, request, "k1")
    assert (reply.status, reply.reason, reply.command_id, reply.command) == (
        "ok",
        None,
        "k1",
        "confirm",
    )
    assert reply.t == NOW
    assert reply.detail == "setpoint c1 confirmed: flow_ml_min 500 -> 650; " + (
        "pressure_limit_mmhg 25 -> 27.5; temperature_c 37 -> 37.5"
    )
    assert (ctl.flow_target_ml_min, ctl.pressure_limit_mmhg, ctl.temperature_target_c) == (
        650.0,
        27.5,
        37.5,
    )
    asked, event = cart.proc.drain_events()
    assert (asked.status, event.sender, event.status, event.kind) == (
        "confirm_required",
        OPERATOR,
        "ok",
        "command",
    )
    assert asked.arguments == {
        "flow_ml_min": 650.0,
        "pressure_limit_mmhg": 27.5,
        "temperature_c": 37.5,
    }


def test_phase_walks_the_procedure(cart: Cart) -> None:
    steps = ["priming", "perfusion", "safe_stop", "resume", "washout", "complete"]
    phases = []
    for i, action in enumerate(steps):
        reply = cart.send("phase", body(f"p{i}", action=action))
        if action == "resume":
            reply = confirmed(cart, reply, "k1")
        assert reply.status == "ok", reply
        phases.append(cart.core.procedure.phase)
    assert phases == [
        Phase.priming,
        Phase.perfusion,
        Phase.safe_stop,
        Phase.perfusion,
        Phase.washout,
        Phase.complete,
    ]
    events = cart.proc.drain_events()
    assert [e.detail for e in events][:2] == ["phase idle -> priming", "phase priming -> perfusion"]


def test_alarm_actions_go_through_the_alarm_engine(cart: Cart) -> None:
    core = cart.core
    raise_air_alarm(core)
    ack = cart.send("alarm", body("a1", action="acknowledge", alarm_id="air_detected"))
    assert ack.status == "ok"
    assert core.alarms.active(T_S)[0].acknowledged is True
    pause = cart.send("alarm", body("a2", action="pause_audio"))
    assert pause.status == "ok"
    assert core.alarms.audio_paused_until() == T_S + CFG.alarms.audio_pause_s
    # Reset is refused while the condition is present, and the alarm stays.
    refused = cart.send("alarm", body("a3", action="reset", alarm_id="air_detected"))
    rejected(refused, "refused", "condition still present")
    assert core.pump_blockers() == ("air_detected",)
    core.alarms.update(2.0, {"air_detected": Condition(False)})
    reset = cart.send("alarm", body("a4", action="reset", alarm_id="air_detected"))
    assert reset.status == "ok"
    assert core.pump_blockers() == ()
    not_active = cart.send("alarm", body("a5", action="acknowledge", alarm_id="leak"))
    rejected(not_active, "refused", "'leak' is not active")
    unknown = cart.send("alarm", body("a6", action="acknowledge", alarm_id="no_such_alarm"))
    rejected(unknown, "refused", "unknown alarm")


def test_marker_is_an_event_with_its_text(cart: Cart) -> None:
    before = snapshot(cart.core)
    reply = cart.send("marker", body("m1", text="drug in"))
    assert reply.status == "ok"
    assert snapshot(cart.core) == before
    (event,) = cart.proc.drain_events()
    assert (event.kind, event.message, event.sender) == ("marker", "drug in", OPERATOR)


def test_mode_changes_the_controller_and_out_of_range_speed_is_rejected(cart: Cart) -> None:
    ctl = cart.core.controller
    reply = cart.send("mode", body("m0", control="pressure", output_mode="auto"))
    assert reply.status == "ok"
    assert (ctl.control_mode, ctl.output_mode) == ("pressure", "auto")
    too_fast = CFG.control.flow.speed_max_rpm + 1.0
    before = snapshot(cart.core)
    rejected(
        cart.send(
            "mode", body("m1", control="flow", output_mode="manual", pump_speed_rpm=too_fast)
        ),
        "out_of_range",
        "pump_speed_rpm",
    )
    assert snapshot(cart.core) == before
    assert (ctl.control_mode, ctl.output_mode) == ("pressure", "auto")
    reply = cart.send("mode", body("m2", control="flow", output_mode="manual", pump_speed_rpm=12.0))
    assert ctl.output_mode == "auto"  # manual output takes two steps
    assert confirmed(cart, reply, "k2").status == "ok"
    assert (ctl.output_mode, ctl.manual_speed_rpm) == ("manual", 12.0)


# --------------------------------------------------------------------------- each reason code


def test_duplicate_gets_the_first_reply_and_is_applied_once(cart: Cart) -> None:
    first = cart.send("setpoint", body("c1", flow_ml_min=600.0))
    assert first.status == "ok"
    assert cart.send("setpoint", body("c2", flow_ml_min=700.0)).status == "ok"
    # The first command delivered again, later: the same reply, and the target stays at 700.
    again = cart.send("setpoint", body("c1", flow_ml_min=600.0), now=NOW + timedelta(seconds=1))
    assert again == first
    assert cart.core.controller.flow_target_ml_min == 700.0
    # Even after its expiry a repeat is answered from the cache, never applied.
    late = cart.send("setpoint", body("c1", flow_ml_min=600.0), now=NOW + timedelta(seconds=30))
    assert late == first
    assert cart.core.controller.flow_target_ml_min == 700.0
    events = cart.proc.drain_events()
    assert [(e.command_id, e.repeated, (e.t - NOW).total_seconds()) for e in events] == [
        ("c1", False, 0.0),
        ("c2", False, 0.0),
        ("c1", True, 1.0),
        ("c1", True, 30.0),
    ]
    assert "repeated delivery, not applied again" in events[2].message


def test_apply_twice_applies_once(cart: Cart) -> None:
    parsed = cart.proc.parse("phase", body("p1", action="priming"), NOW, OPERATOR)
    assert isinstance(parsed, ParsedCommand)
    first = cart.proc.apply(parsed, cart.core, T_S, OPERATOR)
    assert first.status == "ok"
    assert cart.send("phase", body("p2", action="safe_stop")).status == "ok"
    # Applying the priming command again would be refused (not allowed from safe_stop) if it
    # were applied at all: it is answered with its first reply instead.
    assert cart.proc.apply(parsed, cart.core, T_S + 1, OPERATOR) == first
    assert cart.core.procedure.phase is Phase.safe_stop


def test_recorder_failure_rejects_without_applying(cart: Cart) -> None:
    parsed = cart.proc.parse("setpoint", body("r1", flow_ml_min=600.0), NOW, OPERATOR)
    assert isinstance(parsed, ParsedCommand)
    reply = cart.proc.reject(parsed, "recorder_failed", "record disk full")
    rejected(reply, "recorder_failed", "record disk full")
    assert cart.core.controller.flow_target_ml_min == 500.0
    # The command is answered: neither a repeat nor a late apply changes anything.
    assert cart.send("setpoint", body("r1", flow_ml_min=600.0)) == reply
    assert cart.proc.apply(parsed, cart.core, T_S, OPERATOR) == reply
    assert cart.core.controller.flow_target_ml_min == 500.0
    events = cart.proc.drain_events()
    assert [(e.reason, e.repeated) for e in events] == [
        ("recorder_failed", False),
        ("recorder_failed", True),
        ("recorder_failed", True),
    ]


def test_duplicate_of_a_pending_or_different_command_is_rejected(cart: Cart) -> None:
    parsed = cart.proc.parse("marker", body("d1", text="clamp off"), NOW, OPERATOR)
    assert isinstance(parsed, ParsedCommand)
    pending = cart.proc.parse("marker", body("d1", text="clamp off"), NOW, OPERATOR)
    assert isinstance(pending, Reply)
    rejected(pending, "duplicate", "being applied")
    other = cart.proc.parse("marker", body("d1", text="something else"), NOW, OPERATOR)
    assert isinstance(other, Reply)
    rejected(other, "duplicate", "already used for a different command")
    other_name = cart.proc.parse("phase", body("d1", action="priming"), NOW, OPERATOR)
    assert isinstance(other_name, Reply)
    rejected(other_name, "duplicate")
    # Ids are per sender: the same id from another operator is a different command.
    assert isinstance(cart.proc.parse("marker", body("d1", text="x"), NOW, "bob"), ParsedCommand)
    assert cart.core.procedure.phase is Phase.idle


def test_expired_command_is_rejected(cart: Cart) -> None:
    old = NOW - timedelta(seconds=5.5)
    before = snapshot(cart.core)
    reply = cart.send("setpoint", body("e1", issued_at=old, flow_ml_min=600.0))
    rejected(reply, "expired", "issued 5.5 s ago", "expires_in_s = 5")
    assert snapshot(cart.core) == before
    # Its own longer expiry makes the same age acceptable.
    ok = cart.send("setpoint", body("e2", issued_at=old, expires_in_s=10.0, flow_ml_min=600.0))
    assert ok.status == "ok"
    # A repeat of the expired one is still answered with its first reply.
    assert cart.send("setpoint", body("e1", issued_at=old, flow_ml_min=600.0)) == reply


def test_command_from_the_future_is_invalid(cart: Cart) -> None:
    ahead = cart.send("marker", body("f1", issued_at=NOW + timedelta(seconds=3), text="x"))
    rejected(ahead, "invalid", "3.0 s in the future", "clock")
    slightly = cart.send("marker", body("f2", issued_at=NOW + timedelta(seconds=1.5), text="x"))
    assert slightly.status == "ok"


def test_naive_issued_at_is_invalid(cart: Cart) -> None:
    payload = json.dumps({"command_id": "n1", "issued_at": "2025-06-01T12:00:00", "text": "x"})
    rejected(cart.send("marker", payload.encode()), "invalid", "marker.issued_at", "timezone")


def test_phase_not_allowed_in_this_phase(cart: Cart) -> None:
    before = snapshot(cart.core)
    washout = cart.send("phase", body("w1", action="washout"))
    rejected(washout, "not_allowed_in_phase", "washout is not allowed from idle")
    resume = cart.send("phase", body("w2", action="resume"))
    rejected(resume, "not_allowed_in_phase", "only possible from safe_stop")
    assert snapshot(cart.core) == before


def test_interlock_blocks_pump_start_and_resume(cart: Cart) -> None:
    raise_air_alarm(cart.core)
    before = snapshot(cart.core)
    priming = cart.send("phase", body("i1", action="priming"))
    rejected(priming, "interlock_active", "air_detected")
    assert snapshot(cart.core) == before
    # Safe-stop is always allowed; resuming into a running phase is blocked by the interlock.
    other = new_cart()
    assert other.send("phase", body("i2", action="priming")).status == "ok"
    assert other.send("phase", body("i3", action="safe_stop")).status == "ok"
    raise_air_alarm(other.core)
    rejected(other.send("phase", body("i4", action="resume")), "interlock_active", "air_detected")
    assert other.core.procedure.phase is Phase.safe_stop


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"flow_ml_min": 1400.0}, "1400 is outside the allowed 0..1320"),
        ({"pressure_limit_mmhg": 29.5}, "29.5 is outside the allowed 5..29"),
        ({"pressure_limit_mmhg": 4.0}, "4 is outside the allowed 5..29"),
        ({"temperature_c": 38.6}, "38.6 is outside the allowed 30..38.5"),
        ({"temperature_c": 29.0}, "29 is outside the allowed 30..38.5"),
        ({"flow_ml_min": 1e300}, "setpoint.flow_ml_min: Input should be less than or equal to"),
        ({"flow_ml_min": -1.0}, "setpoint.flow_ml_min: Input should be greater than or equal"),
        ({"expires_in_s": 61.0, "flow_ml_min": 500.0}, "setpoint.expires_in_s"),
    ],
)
def test_out_of_range(cart: Cart, fields: dict[str, Any], detail: str) -> None:
    before = snapshot(cart.core)
    rejected(cart.send("setpoint", body(**fields)), "out_of_range", detail)
    assert snapshot(cart.core) == before


def test_bounds_come_from_the_configuration() -> None:
    b = CommandProcessor(CFG).bounds
    c = CFG.control
    assert b.flow_ml_min == (0.0, c.flow.speed_max_rpm * c.flow.stroke_volume_ml_per_rev)
    assert b.pressure_limit_mmhg == (5.0, c.pressure.stop_mmhg - 1.0)
    assert b.temperature_c == (30.0, c.temperature.max_c - 0.5)


@pytest.mark.parametrize(
    ("field", "attr", "start", "slew"),
    [
        ("flow_ml_min", "flow_target_ml_min", 500.0, FLOW_SLEW_ML_MIN),
        ("pressure_limit_mmhg", "pressure_limit_mmhg", 25.0, PRESSURE_SLEW_MMHG),
        ("temperature_c", "temperature_target_c", 37.0, TEMPERATURE_SLEW_C),
    ],
)
def test_slew_limit_per_command(
    cart: Cart, field: str, attr: str, start: float, slew: float
) -> None:
    ctl = cart.core.controller
    assert getattr(ctl, attr) == start
    too_far: dict[str, Any] = {field: start - 1.5 * slew}
    rejected(
        cart.send("setpoint", body("s1", **too_far)),
        "out_of_range",
        f"setpoint.{field}",
        f"slew limit of {slew:g}",
    )
    assert getattr(ctl, attr) == start
    one_slew: dict[str, Any] = {field: start - slew}
    assert cart.send("setpoint", body("s2", **one_slew)).status == "ok"
    assert getattr(ctl, attr) == start - slew


def test_setpoint_is_applied_whole_or_not_at_all(cart: Cart) -> None:
    before = snapshot(cart.core)
    reply = cart.send("setpoint", body(flow_ml_min=600.0, temperature_c=39.0))
    rejected(reply, "out_of_range", "setpoint.temperature_c")
    assert snapshot(cart.core) == before


def test_unknown_and_missing_fields_are_invalid(cart: Cart) -> None:
    extra = cart.send("setpoint", body(flow_ml_min=600.0, speed_rpm=3.0))
    rejected(extra, "invalid", "setpoint.speed_rpm: unknown field")
    assert extra.command_id == "c1"
    operator_field = cart.send("phase", body("x2", action="priming", operator="root"))
    rejected(operator_field, "invalid", "phase.operator: unknown field")
    missing = cart.send("phase", json.dumps({"command_id": "x3", "action": "priming"}).encode())
    rejected(missing, "invalid", "phase.issued_at: required field missing")
    nothing = cart.send("setpoint", body("x4"))
    rejected(nothing, "invalid", "at least one of flow_ml_min")
    wrong_type = cart.send("setpoint", body("x5", flow_ml_min="600"))
    rejected(wrong_type, "invalid", "setpoint.flow_ml_min: Input should be a valid number")
    bool_type = cart.send("setpoint", body("x6", flow_ml_min=True))
    rejected(bool_type, "invalid", "setpoint.flow_ml_min")
    ack = cart.send("alarm", body("x7", action="acknowledge"))
    rejected(ack, "invalid", "alarm_id is required for acknowledge")
    pause = cart.send("alarm", body("x8", action="pause_audio", alarm_id="leak"))
    rejected(pause, "invalid", "omit alarm_id")
    manual = cart.send("mode", body("x9", control="flow", output_mode="manual"))
    rejected(manual, "invalid", "pump_speed_rpm is required")
    tab = cart.send("marker", body("x10", text="drug\tin"))
    rejected(tab, "invalid", "printable")
    assert cart.core.procedure.phase is Phase.idle


def test_unknown_command(cart: Cart) -> None:
    reply = cart.send("shutdown", body("u1"))
    rejected(reply, "unknown_command", "'shutdown'", "setpoint, mode, phase, alarm, marker")
    assert (reply.command_id, reply.command) == ("u1", "shutdown")


def test_rate_limit_after_the_burst() -> None:
    cart = new_cart(rate_per_s=5.0, burst=10)
    replies = [cart.send("marker", body(f"r{i}", text="x")) for i in range(11)]
    assert [r.status for r in replies] == ["ok"] * 10 + ["rejected"]
    rejected(replies[10], "rate_limited", "5 commands/s", "burst 10")
    assert replies[10].command_id == "r10"
    # Garbage costs a token too, and another sender has its own bucket.
    rejected(cart.send("marker", b"\xff"), "rate_limited")
    assert cart.send("marker", body("b1", text="x"), sender="bob").status == "ok"
    # One token back after 1 / rate = 0.2 s, and only one.
    later = NOW + timedelta(seconds=0.2)
    assert cart.send("marker", body("r11", issued_at=later, text="x"), now=later).status == "ok"
    rejected(cart.send("marker", body("r12", issued_at=later, text="x"), now=later), "rate_limited")


def test_unauthorized_senders() -> None:
    daemon_cfg = CFG.model_copy(update={"mqtt": CFG.mqtt.model_copy(update={"username": "ilupd"})})
    cart = new_cart(daemon_cfg)
    before = snapshot(cart.core)
    rejected(cart.send("phase", body(action="priming"), sender="ilupd"), "unauthorized", "daemon")
    for sender in ("", "a/b", "a+b", "#", "x" * 65, "with space"):
        rejected(cart.send("phase", body(action="priming"), sender=sender), "unauthorized")
    assert snapshot(cart.core) == before
    assert cart.send("phase", body(action="priming"), sender="op.alice@site-1").status == "ok"


def test_payload_size_encoding_and_json_rules(cart: Cart) -> None:
    rejected(cart.send("marker", b""), "invalid", "empty payload")
    big = b" " * (MAX_PAYLOAD_BYTES + 1)
    rejected(cart.send("marker", big), "invalid", f"{MAX_PAYLOAD_BYTES + 1} bytes", "16384")
    one_mb = b'{"command_id": "' + b"a" * 1_000_000 + b'"}'
    rejected(cart.send("marker", one_mb), "invalid", "the limit is 16384")
    # Padding within the limit is fine.
    padded = body("ok1", text="x") + b" " * (MAX_PAYLOAD_BYTES - len(body("ok1", text="x")))
    assert len(padded) == MAX_PAYLOAD_BYTES
    assert cart.send("marker", padded).status == "ok"
    rejected(cart.send("marker", b'{"text": "\xff"}'), "invalid", "not UTF-8 (byte 10)")
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        payload = b'{"command_id": "j1", "issued_at": "2025-06-01T12:00:00Z", "flow_ml_min": '
        reply = cart.send("setpoint", payload + token + b"}")
        rejected(reply, "invalid", token.decode().lstrip("-"), "finite")
    rejected(cart.send("setpoint", b'{"a": 1, "a": 2}'), "invalid", "'a' appears twice")
    rejected(cart.send("setpoint", b"[" * 5000), "invalid")
    rejected(cart.send("setpoint", b"[1, 2]"), "invalid", "setpoint: Input should be an object")
    rejected(cart.send("setpoint", b"{"), "invalid", "not JSON")
    huge = b'{"command_id": "j2", "issued_at": "2025-06-01T12:00:00Z", "flow_ml_min": 1e999}'
    rejected(cart.send("setpoint", huge), "invalid", "finite")
    assert cart.core.controller.flow_target_ml_min == 500.0


@pytest.mark.parametrize(
    ("issued_at", "expires_in_s"),
    [
        ("9999-12-31T23:59:59Z", 5.0),
        ("9999-12-31T23:59:59-23:59", 5.0),  # past datetime.max once in UTC
        ("9999-12-31T23:59:30+00:00", 60.0),
        ("2200-01-01T00:00:00Z", 60.0),
    ],
)
def test_issued_at_far_in_the_future_is_invalid_not_an_internal_error(
    cart: Cart, issued_at: str, expires_in_s: float
) -> None:
    payload = json.dumps(
        {"command_id": "y1", "issued_at": issued_at, "expires_in_s": expires_in_s, "text": "x"}
    ).encode()
    reply = cart.send("marker", payload)
    rejected(reply, "invalid", "marker.issued_at is", "s in the future", "clock")
    assert "internal error" not in reply.detail
    # Answered the same way again, not from a poisoned cache entry.
    assert cart.send("marker", payload).detail == reply.detail


def test_future_dated_commands_cannot_fill_the_duplicate_cache() -> None:
    """A rejected command is kept to answer its repeats only while it could be valid: one dated
    years ahead must not hold a cache slot for years, or a few of them refuse every command."""
    cart = new_cart(cache_size=4, burst=1000)
    for i in range(8):
        ahead = NOW + timedelta(days=365 * (i + 1))
        rejected(cart.send("marker", body(f"f{i}", issued_at=ahead, text="x")), "invalid")
    later = NOW + timedelta(seconds=70)  # any command seen so far is past its validity
    reply = cart.send("marker", body("ok1", issued_at=later, text="x"), now=later)
    assert reply.status == "ok", reply


@pytest.mark.parametrize("depth", [9, 300, 5000])
def test_nesting_deeper_than_a_command_needs_is_invalid(cart: Cart, depth: int) -> None:
    deep = "[" * depth + "]" * depth
    payload = f'{{"command_id": "n1", "issued_at": "{NOW.isoformat()}", "text": "x", "z": {deep}}}'
    reply = cart.send("marker", payload.encode())
    rejected(reply, "invalid", "nested deeper than")
    assert "internal error" not in reply.detail


def test_cache_never_forgets_a_command_that_could_still_be_replayed() -> None:
    cart = new_cart(cache_size=2)
    assert cart.send("marker", body("k1", text="a")).status == "ok"
    assert cart.send("marker", body("k2", text="b")).status == "ok"
    full = cart.send("marker", body("k3", text="c"))
    rejected(full, "rate_limited", "still within their validity window")
    # Once the first two are past their validity, room is made and nothing old can replay.
    later = NOW + timedelta(seconds=6)
    assert cart.send("marker", body("k4", issued_at=later, text="d"), now=later).status == "ok"
    rejected(cart.send("marker", body("k1", text="a"), now=later), "expired")


def test_every_command_and_outcome_is_one_event(cart: Cart) -> None:
    cart.send("marker", body("v1", text="drug in"))
    cart.send("phase", body("v2", action="washout"))
    cart.send("nope", b"{}")
    cart.send("marker", b"\xff")
    events = cart.proc.drain_events()
    assert [(e.command, e.status, e.reason) for e in events] == [
        ("marker", "ok", None),
        ("phase", "rejected", "not_allowed_in_phase"),
        ("nope", "rejected", "unknown_command"),
        ("marker", "rejected", "invalid"),
    ]
    assert events[1].message.startswith("phase v2 from alice: rejected (not_allowed_in_phase)")
    assert cart.proc.drain_events() == []


# --------------------------------------------------------------------------- topics


def test_command_topics_and_replies() -> None:
    assert command_filter("ilup", "cart1") == "ilup/cart1/cmd/+/+"
    assert split_command_topic("ilup/cart1/cmd/alice/phase", "ilup", "cart1") == (
        "alice",
        "phase",
    )
    for topic in (
        "ilup/cart1/cmd/alice/phase/reply",
        "ilup/cart2/cmd/alice/phase",
        "ilup/cart1/cmd/alice",
        "ilup/cart1/cmd//phase",
    ):
        assert split_command_topic(topic, "ilup", "cart1") is None, topic
    assert default_reply_topic("ilup", "cart1", "alice", "phase") == (
        "ilup/cart1/cmd/alice/phase/reply"
    )
    assert response_topic_allowed("ilup/cart1/cmd/alice/ui/42", "ilup", "cart1", "alice")
    for topic in (
        "ilup/cart1/state",  # the daemon would overwrite its own state
        "ilup/cart1/cmd/bob/ui/42",  # another user's replies
        "ilup/cart1/cmd/alice/phase",  # a command topic: the daemon would answer itself
        "ilup/cart1/cmd/alice/ui/+",
        "elsewhere/x/y",
    ):
        assert not response_topic_allowed(topic, "ilup", "cart1", "alice"), topic


def test_reply_goes_to_an_allowed_response_topic_only(cart: Cart) -> None:
    prefix, cart_id = CFG.mqtt.topic_prefix, CFG.cart_id
    own = f"{prefix}/{cart_id}/cmd/{OPERATOR}/ui/7"
    assert cart.proc.reply_topic(OPERATOR, "phase", own) == own
    default = f"{prefix}/{cart_id}/cmd/{OPERATOR}/phase/reply"
    assert cart.proc.reply_topic(OPERATOR, "phase", None) == default
    bad = f"{prefix}/{cart_id}/state"
    assert cart.proc.reply_topic(OPERATOR, "phase", bad) == default
    reply = cart.send("phase", body(action="priming"), response_topic=bad)
    rejected(reply, "invalid", "response topic not allowed")
    assert cart.core.procedure.phase is Phase.idle
    ok = cart.send("phase", body("c2", action="priming"), response_topic=own)
    assert ok.status == "ok"


# --------------------------------------------------------------------------- fuzzing

NUMERIC = {"flow_ml_min", "pressure_limit_mmhg", "temperature_c", "pump_speed_rpm", "expires_in_s"}
CAPS = {"flow_ml_min": 5000.0, "pressure_limit_mmhg": 100.0, "temperature_c": 42.0}
REQUIRED = {"command_id", "issued_at", "control", "output_mode", "action", "text", "token"}
VALID_BODIES: dict[str, dict[str, Any]] = {
    "setpoint": {"flow_ml_min": 550.0, "temperature_c": 37.2},
    "mode": {"control": "pressure", "output_mode": "manual", "pump_speed_rpm": 10.0},
    "phase": {"action": "priming"},
    "alarm": {"action": "acknowledge", "alarm_id": "air_detected"},
    "marker": {"text": "drug in"},
    "confirm": {"token": "tok00001", "action": "confirm"},  # none pending: not_confirmed
}
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and +-inf included: json.dumps writes NaN/Infinity tokens
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
wrong_for_number = st.text(max_size=5) | st.booleans() | st.lists(st.integers(), max_size=2)
wrong_for_string = (
    st.integers()
    | st.floats(allow_nan=False)
    | st.booleans()
    | st.dictionaries(st.text(), st.none())
)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(name, payload, must_reject): a valid command with one thing broken, or still valid."""
    name = draw(st.sampled_from(sorted(VALID_BODIES)))
    fields: dict[str, Any] = {"command_id": "fz1", "issued_at": NOW.isoformat()}
    fields.update(VALID_BODIES[name])
    kind = draw(st.sampled_from(["drop", "extra", "retype", "huge", "nonfinite", "none"]))
    key = draw(st.sampled_from(sorted(fields)))
    must_reject = True
    if kind == "drop":
        del fields[key]
        must_reject = (
            (key in REQUIRED and not (name == "confirm" and key == "action"))
            or (name == "alarm" and key == "alarm_id")
            or (name == "mode" and key == "pump_speed_rpm")
        )
    elif kind == "extra":
        known = COMMAND_MODELS[name].model_fields
        extra = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in known))
        fields[extra] = draw(json_values)
    elif kind == "retype":
        pool = wrong_for_number if key in NUMERIC else wrong_for_string
        fields[key] = draw(pool)
    elif kind == "huge":
        field = draw(st.sampled_from(sorted(NUMERIC & set(fields) | {"expires_in_s"})))
        value = draw(st.sampled_from([1e308, -1e308, 10**30, -(10**30), 2**64, 1e-320]))
        fields[field] = value
        must_reject = (
            not (0 < value <= 60)
            if field == "expires_in_s"
            else (value > CAPS.get(field, float("inf")) or value < 0)
        )
    elif kind == "nonfinite":
        field = draw(st.sampled_from(sorted(NUMERIC)))
        fields[field] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    else:
        must_reject = False
    return name, json.dumps(fields).encode(), must_reject


def check(name: str, payload: bytes, must_reject: bool) -> None:
    cart = new_cart()
    raise_air_alarm(cart.core)  # so that acknowledge has an alarm to act on
    before = snapshot(cart.core)
    result = cart.proc.parse(name, payload, NOW, OPERATOR)
    if isinstance(result, ParsedCommand):
        assert not must_reject, f"accepted an invalid {name}: {payload[:200]!r}"
        reply = cart.proc.apply(result, cart.core, T_S, OPERATOR)
    else:
        reply = result
        assert reply.status == "rejected"
    assert isinstance(reply, Reply)
    assert Reply.model_validate_json(reply.model_dump_json()) == reply
    assert "internal error" not in reply.detail, (name, payload[:200], reply.detail)
    if reply.status == "rejected":
        assert reply.reason in REASON_CODES
        assert reply.detail
        assert snapshot(cart.core) == before
    else:
        assert reply.reason is None
        # A change that takes two steps is pending, not applied.
        if reply.status == "confirm_required":
            assert snapshot(cart.core) == before
    assert len(cart.proc.drain_events()) == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_fuzz_mutated_commands(case: tuple[str, bytes, bool]) -> None:
    check(*case)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(COMMAND_MODELS)) | st.text(max_size=12), st.binary(max_size=300))
@example("setpoint", b"")
@example("marker", b"\x00" * 1_000_000)
@example("phase", b'{"command_id": "x", "issued_at": "2025-06-01T12:00:00Z", "action": NaN}')
@example("alarm", '{"text": "\udcff"}'.encode("utf-8", "surrogatepass"))
def test_fuzz_arbitrary_bytes(name: str, payload: bytes) -> None:
    check(name, payload, must_reject=True)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(COMMAND_MODELS)), json_values)
def test_fuzz_arbitrary_json(name: str, value: Any) -> None:
    check(name, json.dumps(value).encode(), must_reject=True)


def _iso(t: datetime) -> str:
    return t.isoformat()


any_aware_time = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.timezones() | st.just(UTC),
)
envelope_values: dict[str, st.SearchStrategy[Any]] = {
    "command_id": st.text(max_size=70) | json_values,
    "issued_at": any_aware_time.map(_iso) | st.text(max_size=30) | json_values,
    "expires_in_s": st.floats() | st.integers() | json_values,
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(sorted(VALID_BODIES)),
    st.fixed_dictionaries({}, optional=envelope_values),
    st.booleans(),
)
@example("marker", {"command_id": "c", "issued_at": "9999-12-31T23:59:59Z"}, True)
def test_fuzz_envelope(name: str, envelope: dict[str, Any], with_body: bool) -> None:
    """Any envelope (ids, times from year 1 to 9999 in any zone, expiries) on a valid body: a
    well-formed reply, never an internal error."""
    fields = {**(VALID_BODIES[name] if with_body else {}), **envelope}
    check(name, json.dumps(fields).encode(), must_reject=False)


# --------------------------------------------------------------------------- record gate


@pytest.mark.parametrize(
    ("name", "fields", "needs"),
    [
        ("setpoint", {"flow_ml_min": 480.0}, True),
        ("setpoint", {"temperature_c": 37.5}, True),
        ("mode", {"control": "pressure", "output_mode": "auto"}, True),
        ("phase", {"action": "priming"}, True),
        ("phase", {"action": "perfusion"}, True),
        ("phase", {"action": "washout"}, True),
        ("phase", {"action": "complete"}, True),
        ("phase", {"action": "resume"}, True),
        ("phase", {"action": "safe_stop"}, False),
        ("alarm", {"action": "reset", "alarm_id": "recorder"}, True),
        ("alarm", {"action": "acknowledge", "alarm_id": "recorder"}, False),
        ("alarm", {"action": "pause_audio"}, False),
        ("marker", {"text": "disk full"}, False),
    ],
)
def test_record_gate_table(name: str, fields: dict[str, Any], needs: bool) -> None:
    """docs/security.md 'While the record cannot be written', row by row."""
    parsed = new_cart().proc.parse(name, body("g1", **fields), NOW, OPERATOR)
    assert isinstance(parsed, ParsedCommand)
    assert needs_record(parsed.command) is needs


def test_intake_rejects_therapy_commands_while_the_record_fails() -> None:
    sent: list[Reply] = []
    intake = CommandIntake(CFG, lambda _topic, reply, _corr: sent.append(reply))
    core = CartCore(CFG, 0.0)
    base = f"{CFG.mqtt.topic_prefix}/{CFG.cart_id}/cmd/{OPERATOR}"
    now = datetime.now(UTC)
    for cid, name, fields in [
        ("r1", "setpoint", {"flow_ml_min": 600.0}),
        ("r2", "alarm", {"action": "pause_audio"}),
        ("r3", "phase", {"action": "safe_stop"}),
    ]:
        intake.on_message(Incoming(f"{base}/{name}", body(cid, now, **fields), False, None, None))
    replies, events = intake.apply_pending(core, T_S, record_problem="recorder failed: disk full")
    # pause_audio and safe_stop are applied first, before anything queued with them.
    assert [(r.command_id, r.status, r.reason) for _, r, _ in replies] == [
        ("r2", "ok", None),
        ("r3", "ok", None),
        ("r1", "rejected", "recorder_failed"),
    ]
    assert "record cannot be written (recorder failed: disk full)" in replies[2][1].detail
    assert core.controller.flow_target_ml_min == 500.0
    assert core.procedure.phase is Phase.safe_stop
    assert [e.reason for e in events] == [None, None, "recorder_failed"]
    assert sent == []  # replies wait for the caller (commit before acknowledge)
