"""Operator commands like a clinical console (issue 12 part 3), at the processor, in virtual
time: two-step confirmation, the operator allow-list and roles, the commands that are never
limited, and the cart-file settings behind them (end to end: test_console_e2e.py)."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from ilup_controller.commands import CommandProcessor, ParsedCommand, Reply
from ilup_controller.config import CartConfig, ConfigError, load_config
from ilup_controller.core.alarms import Condition
from ilup_controller.core.cart import CartCore
from ilup_controller.core.procedure import Phase
from ilup_controller.mqtt.link import Incoming
from ilup_controller.runtime.commands import CommandIntake

SIM = load_config("config/sim.yaml")
CFG = SIM.model_copy(
    update={
        "operators": {"alice": "operator", "bob": "operator", "nina": "assistant", "mo": "monitor"}
    }
)
NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
WINDOW_S = CFG.commands.confirm.window_s


def body(command_id: str, issued_at: datetime = NOW, **fields: Any) -> bytes:
    return json.dumps(
        {"command_id": command_id, "issued_at": issued_at.isoformat(), **fields}
    ).encode()


class Console:
    """One core and one processor; every command is applied at core time ``t_s`` (virtual)."""

    def __init__(self, cfg: CartConfig = CFG, **kw: Any) -> None:
        self.core = CartCore(cfg, 0.0)
        counter = itertools.count(1)
        self.proc = CommandProcessor(cfg, token_factory=lambda: f"tok{next(counter):05d}", **kw)
        self.t_s = 10.0

    def send(
        self,
        sender: str,
        name: str,
        command_id: str,
        *,
        issued_at: datetime | None = None,
        **fields: Any,
    ) -> Reply:
        wall = NOW + timedelta(seconds=self.t_s - 10.0)  # arrival, in step with core time
        payload = body(command_id, wall if issued_at is None else issued_at, **fields)
        parsed = self.proc.parse(name, payload, wall, sender)
        if isinstance(parsed, ParsedCommand):
            return self.proc.apply(parsed, self.core, self.t_s, sender)
        return parsed

    def confirm(self, sender: str, command_id: str, token: str | None, **kw: Any) -> Reply:
        return self.send(sender, "confirm", command_id, token=token, **kw)

    def targets(self) -> tuple[float, float, float]:
        c = self.core.controller
        return c.flow_target_ml_min, c.pressure_limit_mmhg, c.temperature_target_c

    def events(self) -> list[tuple[str, str, str | None, str]]:
        return [(e.command, e.status, e.reason, e.sender) for e in self.proc.drain_events()]


def expect(reply: Reply, status: str, reason: str | None = None, *detail: str) -> None:
    assert (reply.status, reply.reason) == (status, reason), reply
    for text in detail:
        assert text in reply.detail, (text, reply.detail)


# --------------------------------------------------------------------------- confirmation


def test_raising_the_pressure_limit_takes_two_steps_by_the_same_operator() -> None:
    c = Console()
    asked = c.send("alice", "setpoint", "s1", pressure_limit_mmhg=28.0)
    expect(asked, "confirm_required", None, "pressure_limit_mmhg 25 -> 28", "raises")
    assert (asked.token, asked.confirm_within_s) == ("tok00001", 10.0)
    assert c.targets() == (500.0, 25.0, 37.0)  # nothing changed yet
    c.t_s += WINDOW_S - 0.1  # virtual time: just inside the window
    done = c.confirm("alice", "k1", "tok00001")
    expect(done, "ok", None, "setpoint s1 confirmed: pressure_limit_mmhg 25 -> 28")
    assert c.targets() == (500.0, 28.0, 37.0)
    assert c.events() == [
        ("setpoint", "confirm_required", None, "alice"),
        ("confirm", "ok", None, "alice"),
    ]
    # Confirmed once: the same token again changes nothing and says why.
    expect(c.confirm("alice", "k2", "tok00001"), "rejected", "not_confirmed", "confirmed already")


def test_what_needs_confirmation_and_what_does_not() -> None:
    c = Console()
    step = CFG.commands.confirm.flow_step_ml_min  # 100 mL/min
    expect(c.send("alice", "setpoint", "a", flow_ml_min=500.0 + step), "ok")  # exactly the step
    expect(c.send("alice", "setpoint", "b", pressure_limit_mmhg=22.0), "ok")  # lowering
    expect(c.send("alice", "setpoint", "c", flow_ml_min=400.0), "ok")  # lowering
    expect(c.send("alice", "setpoint", "d", temperature_c=37.5), "ok")
    asked = c.send("alice", "setpoint", "e", flow_ml_min=400.0 + step + 1.0)
    expect(asked, "confirm_required", None, "flow_ml_min 400 -> 501", "more than 100 in one step")
    # Out of range or over the slew limit: refused at once, nothing to confirm.
    expect(c.send("alice", "setpoint", "f", pressure_limit_mmhg=30.0), "rejected", "out_of_range")
    # Manual output: entering it, and raising its speed, take two steps; lowering does not.
    manual = c.send("alice", "mode", "m1", control="flow", output_mode="manual", pump_speed_rpm=9)
    expect(manual, "confirm_required", None, "flow auto -> constant-flow manual at 9 rpm")
    expect(c.confirm("alice", "k1", manual.token), "ok", None, "manual output at 9 rpm")
    expect(
        c.send("alice", "mode", "m2", control="flow", output_mode="manual", pump_speed_rpm=5), "ok"
    )
    raised = c.send("alice", "mode", "m3", control="flow", output_mode="manual", pump_speed_rpm=8)
    expect(raised, "confirm_required", None, "manual pump speed 5 -> 8 rpm")
    assert c.core.controller.manual_speed_rpm == 5.0


def test_resume_needs_confirmation_and_safe_stop_never_does() -> None:
    c = Console()
    for i, action in enumerate(["priming", "perfusion", "safe_stop"]):
        expect(c.send("alice", "phase", f"p{i}", action=action), "ok")
    asked = c.send("alice", "phase", "r1", action="resume")
    expect(asked, "confirm_required", None, "phase safe_stop -> perfusion (resume)", "500 mL/min")
    assert c.core.procedure.phase is Phase.safe_stop
    expect(c.confirm("alice", "k1", asked.token), "ok", None, "safe_stop -> perfusion")
    assert c.core.procedure.phase is Phase.perfusion
    # A resume that would be refused anyway (an interlock) is refused at once, not confirmed.
    expect(c.send("alice", "phase", "p9", action="safe_stop"), "ok")
    c.core.alarms.update(c.t_s, {"air_detected": Condition(True, detail="bubble")})
    expect(c.send("alice", "phase", "r2", action="resume"), "rejected", "interlock_active")


def test_a_confirm_from_another_operator_is_refused_and_cancels_the_change() -> None:
    c = Console()
    asked = c.send("alice", "setpoint", "s1", pressure_limit_mmhg=28.0)
    stolen = c.confirm("bob", "k1", asked.token)
    expect(stolen, "rejected", "unauthorized", "belongs to setpoint s1 of alice", "cancelled")
    expect(c.confirm("alice", "k2", asked.token), "rejected", "not_confirmed", "bob sent a confirm")
    assert c.targets() == (500.0, 25.0, 37.0)
    assert c.events() == [
        ("setpoint", "confirm_required", None, "alice"),
        ("setpoint", "cancelled", None, "alice"),
        ("confirm", "rejected", "unauthorized", "bob"),
        ("confirm", "rejected", "not_confirmed", "alice"),
    ]


def test_a_wrong_token_cancels_the_change() -> None:
    c = Console()
    asked = c.send("alice", "setpoint", "s1", flow_ml_min=650.0)
    wrong = c.confirm("alice", "k1", "tok99999")
    expect(wrong, "rejected", "not_confirmed", "wrong token", "setpoint s1 is cancelled")
    expect(c.confirm("alice", "k2", asked.token), "rejected", "not_confirmed", "wrong token")
    assert c.targets()[0] == 500.0
    # No change pending at all: a confirm says so.
    expect(c.confirm("bob", "k3", "tok12345"), "rejected", "not_confirmed", "no change of bob")


def test_the_window_passing_expires_the_change_and_is_recorded() -> None:
    c = Console()
    asked = c.send("alice", "setpoint", "s1", flow_ml_min=650.0)
    c.proc.expire(c.t_s + WINDOW_S, NOW)  # at the deadline: still pending
    assert c.proc.confirmations.pending("alice") is not None
    c.t_s += WINDOW_S + 0.1
    c.proc.expire(c.t_s, NOW)  # the tick after the deadline: expired, on the record at once
    events = c.proc.drain_events()
    assert [(e.command_id, e.status) for e in events] == [
        ("s1", "confirm_required"),
        ("s1", "expired"),
    ]
    assert "not confirmed within 10 s" in events[1].message
    late = c.confirm("alice", "k1", asked.token)
    expect(
        late, "rejected", "expired", "setpoint s1 was not confirmed within 10 s", "send it again"
    )
    assert c.targets()[0] == 500.0
    # A confirm that arrives late before the sweep ran is refused the same way.
    asked = c.send("alice", "setpoint", "s2", flow_ml_min=650.0)
    c.t_s += WINDOW_S + 0.5
    expect(c.confirm("alice", "k2", asked.token), "rejected", "expired", "not confirmed within")
    assert c.targets()[0] == 500.0


def test_any_other_command_from_that_operator_cancels_it() -> None:
    c = Console()
    asked = c.send("alice", "setpoint", "s1", flow_ml_min=650.0)
    # Another operator's command does not touch alice's pending change...
    expect(c.send("bob", "marker", "b1", text="bob was here"), "ok")
    assert c.proc.confirmations.pending("alice") is not None
    # ...alice's own next command (even a rejected one) cancels it, and its reply says so.
    other = c.send("alice", "setpoint", "s2", temperature_c=45.0)
    expect(other, "rejected", "out_of_range", "your pending setpoint s1 is cancelled")
    expect(
        c.confirm("alice", "k1", asked.token),
        "rejected",
        "not_confirmed",
        "cancelled by setpoint s2",
    )
    assert c.targets() == (500.0, 25.0, 37.0)
    # An explicit cancel: ok, nothing applied.
    asked = c.send("alice", "setpoint", "s3", flow_ml_min=650.0)
    expect(c.confirm("alice", "k2", asked.token, action="cancel"), "ok", None, "s3 cancelled")
    assert c.targets()[0] == 500.0


def test_a_confirmed_change_is_checked_again_against_the_cart_as_it_is_then() -> None:
    c = Console()
    asked = c.send("alice", "setpoint", "s1", flow_ml_min=650.0)
    expect(c.send("bob", "setpoint", "b1", flow_ml_min=400.0), "ok")  # meanwhile
    late = c.confirm("alice", "k1", asked.token)
    expect(late, "rejected", "out_of_range", "confirmed but refused now", "400 -> 650", "slew")
    assert c.targets()[0] == 400.0


# --------------------------------------------------------------------------- never limited


def test_safe_stop_and_pause_audio_pass_an_exhausted_rate_limit_and_never_expire() -> None:
    c = Console(burst=2)
    for i in range(2):
        expect(c.send("alice", "marker", f"m{i}", text="x"), "ok")
    expect(c.send("alice", "marker", "m9", text="x"), "rejected", "rate_limited")
    expect(c.send("alice", "setpoint", "s1", flow_ml_min=450.0), "rejected", "rate_limited")
    assert c.send("alice", "phase", "p1", action="priming").reason == "rate_limited"
    c.core.alarms.update(c.t_s, {"air_detected": Condition(True, detail="bubble")})
    long_ago = NOW - timedelta(hours=1)  # far past any expires_in_s
    expect(c.send("alice", "alarm", "a1", issued_at=long_ago, action="pause_audio"), "ok")
    assert c.core.alarms.audio_paused_until() == c.t_s + CFG.alarms.audio_pause_s
    expect(c.send("alice", "phase", "p2", issued_at=long_ago, action="safe_stop"), "ok")
    assert c.core.procedure.phase is Phase.safe_stop
    # The same command again is still a duplicate, answered with its first reply.
    again = c.send("alice", "phase", "p2", issued_at=long_ago, action="safe_stop")
    assert again.detail == "phase idle -> safe_stop"
    # Other commands stay limited and still expire.
    expect(c.send("alice", "marker", "m10", text="x"), "rejected", "rate_limited")
    fresh = Console()
    expect(fresh.send("alice", "marker", "m1", issued_at=long_ago, text="x"), "rejected", "expired")


def test_the_intake_applies_safe_stop_although_the_queue_is_full_and_sweeps_expiries() -> None:
    sent: list[Reply] = []
    intake = CommandIntake(CFG, lambda _t, reply, _c: sent.append(reply))
    intake.processor = CommandProcessor(CFG, burst=1000)
    core = CartCore(CFG, 0.0)
    base = f"{CFG.mqtt.topic_prefix}/{CFG.cart_id}/cmd/alice"
    now = datetime.now(UTC)
    for i in range(64):  # MAX_PENDING
        intake.on_message(
            Incoming(f"{base}/marker", body(f"m{i}", now, text="x"), False, None, None)
        )
    intake.on_message(Incoming(f"{base}/marker", body("full", now, text="x"), False, None, None))
    assert [r.reason for r in sent] == ["rate_limited"]
    stop = body("stop", now, action="safe_stop")
    intake.on_message(Incoming(f"{base}/phase", stop, False, None, None))
    replies, _ = intake.apply_pending(core, 1.0)
    assert (replies[0][1].command_id, replies[0][1].status) == ("stop", "ok")
    assert core.procedure.phase is Phase.safe_stop
    while replies:  # the markers, 16 a tick
        replies, _ = intake.apply_pending(core, 1.0)
    # A pending change is expired by the tick that comes after its window.
    ask = body("s1", now, flow_ml_min=650.0)
    intake.on_message(Incoming(f"{base}/setpoint", ask, False, None, None))
    replies, events = intake.apply_pending(core, 2.0)
    assert [(r.status, e.status) for (_, r, _), e in zip(replies, events, strict=True)] == [
        ("confirm_required", "confirm_required")
    ]
    assert intake.apply_pending(core, 2.0 + WINDOW_S) == ([], [])  # at the deadline: pending
    _, events = intake.apply_pending(core, 2.1 + WINDOW_S)
    assert [(e.command_id, e.status) for e in events] == [("s1", "expired")]


# --------------------------------------------------------------------------- allow-list


def test_users_not_listed_or_without_the_role_change_nothing_and_are_recorded() -> None:
    c = Console()
    before = c.targets()
    expect(
        c.send("mallory", "setpoint", "x1", flow_ml_min=450.0),
        "rejected",
        "unauthorized",
        "mallory is not on this cart's operator list",
    )
    expect(
        c.send("mo", "setpoint", "x2", flow_ml_min=450.0),
        "rejected",
        "unauthorized",
        "role monitor",
    )
    # safe_stop is exempt from limits, not from the allow-list.
    expect(c.send("mallory", "phase", "x3", action="safe_stop"), "rejected", "unauthorized")
    # An assistant may respond (acknowledge, pause audio, safe_stop, markers), not treat.
    expect(c.send("nina", "alarm", "n1", action="pause_audio"), "ok")
    expect(c.send("nina", "marker", "n2", text="clamp off"), "ok")
    expect(
        c.send("nina", "setpoint", "n3", flow_ml_min=450.0),
        "rejected",
        "unauthorized",
        "role assistant, which may not send setpoint",
    )
    expect(
        c.send("nina", "phase", "n4", action="priming"), "rejected", "unauthorized", "phase priming"
    )
    expect(c.send("nina", "phase", "n5", action="safe_stop"), "ok")
    assert c.targets() == before
    assert [(s, st, r) for _, st, r, s in c.events()] == [
        ("mallory", "rejected", "unauthorized"),
        ("mo", "rejected", "unauthorized"),
        ("mallory", "rejected", "unauthorized"),
        ("nina", "ok", None),
        ("nina", "ok", None),
        ("nina", "rejected", "unauthorized"),
        ("nina", "rejected", "unauthorized"),
        ("nina", "ok", None),
    ]


def test_a_cart_file_without_operators_accepts_no_command() -> None:
    c = Console(SIM.model_copy(update={"operators": None}))
    expect(
        c.send("alice", "marker", "m1", text="x"), "rejected", "unauthorized", "lists no operators"
    )
    expect(c.send("alice", "phase", "p1", action="safe_stop"), "rejected", "unauthorized")
    # The shipped simulator cart lets any user command (its broker may be anonymous).
    expect(Console(SIM).send("anyone", "marker", "m1", text="x"), "ok")


# --------------------------------------------------------------------------- cart file


def _cart(tmp_path: Path, **sections: Any) -> Path:
    yaml = YAML(typ="safe", pure=True)
    data = yaml.load(Path("config/sim.yaml").read_text())
    data.update(sections)
    out = tmp_path / "cart.yaml"
    with out.open("w") as f:
        yaml.dump(data, f)
    return out


def test_command_limits_come_from_the_cart_file(tmp_path: Path) -> None:
    cfg = load_config(
        _cart(
            tmp_path,
            commands={
                "slew": {"flow_ml_min": 50},
                "confirm": {"window_s": 5, "flow_step_ml_min": 20},
            },
        )
    )
    c = Console(cfg)
    expect(
        c.send("u", "setpoint", "s1", flow_ml_min=560.0),
        "rejected",
        "out_of_range",
        "slew limit of 50",
    )
    asked = c.send("u", "setpoint", "s2", flow_ml_min=530.0)
    expect(asked, "confirm_required", None, "more than 20 in one step")
    assert asked.confirm_within_s == 5.0
    c.t_s += 5.1
    expect(c.confirm("u", "k1", asked.token), "rejected", "expired", "within 5 s")


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        (
            {"commands": {"slew": {"flow_ml_min": 5000}}},
            "commands.slew.flow_ml_min: Input should be less than or equal to 1000",
        ),
        (
            {"commands": {"confirm": {"window_s": 600}}},
            "commands.confirm.window_s: Input should be less than or equal to 60",
        ),
        ({"commands": {"rate_per_s": 0}}, "commands.rate_per_s: Input should be greater than"),
        ({"commands": {"burst": 0}}, "commands.burst: Input should be greater than or equal to 1"),
        ({"commands": {"slew": {"pressure": 2}}}, "commands.slew.pressure: unknown key"),
        ({"operators": {"bob": "admin"}}, "operators.bob: Input should be 'monitor', 'assistant'"),
        (
            {"simulated": False, "operators": {"*": "operator"}},
            "operators.*: a wildcard is only allowed on a simulated cart",
        ),
        (
            {
                "mqtt": {"host": "127.0.0.1", "username": "ilupd"},
                "operators": {"ilupd": "operator"},
            },
            "operators.ilupd: the daemon's own user (mqtt.username) sends no commands",
        ),
    ],
)
def test_bad_command_settings_name_the_key_path(
    tmp_path: Path, sections: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_cart(tmp_path, **sections))
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems
