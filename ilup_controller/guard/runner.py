"""``ilup guard -c CART``: the process around the pure decision (decide.py).

Each cycle (``guard.cycle_s``, drift-free deadlines) it reads the safety sensors, the actuator
commands and the enables over Modbus connections of its own (one per device, TCP only: an
RS-485 line has one master, the controller), decides, and acts:

- strong form: it writes the enable output (pump drive run-enable / safe torque off, heater
  contactor) that the controller never drives, whenever its read-back differs from the
  decision. Only on a change, so its writes never feed a device watchdog;
- weaker form (no enable configured): while an actuator is latched it writes the actuator's
  safe value (0) to its command register itself every cycle, against whatever the controller
  writes.

It publishes a retained status on ``<prefix>/<cart_id>/guard`` and events on ``guard/events``
through an MQTT task that the cycle never waits for, logs every event, and takes reset
commands on ``guard/cmd/<user>/reset`` (the broker ACL proves the user). An enable found off at
start-up stays off (latched) until an operator resets it: a restarted guard never releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import aiomqtt
from pymodbus.client import AsyncModbusTcpClient

from ilup_controller.aio import raise_if_cancelling
from ilup_controller.config.models import CartConfig, Device, Signal, Table
from ilup_controller.guard.decide import ACTUATORS, Actuator, Decision, Inputs, Limits, State
from ilup_controller.guard.decide import decide as decide_step
from ilup_controller.guard.decide import reset as reset_step
from ilup_controller.modbus.codec import encode, encode_bit
from ilup_controller.modbus.plan import decode_block, plan_reads
from ilup_controller.mqtt.link import client_protocol, client_tls
from ilup_controller.mqtt.messages import GuardEvent, GuardReply, GuardReset, GuardStatus
from ilup_controller.mqtt.topics import GUARD, GUARD_EVENTS, Topics

log = logging.getLogger("ilup.guard")

STATUS_PERIOD_S = 0.5
RESET_MAX_AGE_S = 10.0
Values = dict[str, float | bool]


def limits_of(cfg: CartConfig) -> Limits:
    """The guard's limits: its own section, each unset value taken from the control limits."""
    g, c = cfg.guard, cfg.control
    assert g is not None

    def own(mine: float | None, control: float) -> float:
        return control if mine is None else mine

    low = own(g.reservoir_low_ml, cfg.alarms.reservoir_low_ml)
    return Limits(
        pressure_stop_mmhg=own(g.pressure_stop_mmhg, c.pressure.stop_mmhg),
        perfusate_max_c=own(g.perfusate_max_c, c.temperature.max_c),
        water_max_c=own(g.water_max_c, c.temperature.water_cap_c),
        reservoir_low_ml=low if c.reservoir_measured is not None else None,
        air=c.air_measured is not None,
        budget_s=own(g.budget_s, c.tick_period_s + 0.1),
        unreadable_s=g.unreadable_s,
        heartbeat_s=g.heartbeat_s,
    )


class _Modbus:
    """The guard's own connection to one device: read its signals, write one."""

    def __init__(self, name: str, device: Device, signals: Mapping[str, Signal]) -> None:
        self.name, self.device = name, device
        self.blocks = plan_reads(signals)
        self.client: AsyncModbusTcpClient | None = None

    async def read(self) -> Values:
        """Every signal that read and decoded; {} when the device did not answer in time."""
        try:
            async with asyncio.timeout(self.device.timeout_s * 2):
                client = await self._client()
                out: Values = {}
                for b in self.blocks:
                    unit = self.device.unit_id
                    match b.table:
                        case Table.input:
                            rr = await client.read_input_registers(
                                b.start, count=b.count, device_id=unit
                            )
                        case Table.holding:
                            rr = await client.read_holding_registers(
                                b.start, count=b.count, device_id=unit
                            )
                        case Table.discrete:
                            rr = await client.read_discrete_inputs(
                                b.start, count=b.count, device_id=unit
                            )
                        case Table.coil:
                            rr = await client.read_coils(b.start, count=b.count, device_id=unit)
                    if not rr.isError():
                        out.update(decode_block(b, rr.bits if b.is_bits else rr.registers).values)
                return out
        except Exception as e:  # a device that fails is unreadable this cycle, never a value
            self._drop(f"read failed: {e!r}")
            return {}

    async def write(self, signal: Signal, value: float | bool) -> bool:
        unit = self.device.unit_id
        try:
            async with asyncio.timeout(self.device.timeout_s * 2):
                client = await self._client()
                if signal.table is Table.coil:
                    rsp = await client.write_coil(
                        signal.address, encode_bit(signal, value), device_id=unit
                    )
                else:
                    rsp = await client.write_registers(
                        signal.address, encode(signal, float(value)), device_id=unit
                    )
                return not rsp.isError()
        except Exception as e:
            self._drop(f"write failed: {e!r}")
            return False

    async def _client(self) -> AsyncModbusTcpClient:
        if self.client is None:
            d = self.device
            self.client = AsyncModbusTcpClient(d.host, port=d.port, timeout=d.timeout_s, retries=0)
        if not self.client.connected and not await self.client.connect():
            raise ConnectionError(f"{self.device.where} not reachable")
        return self.client

    def _drop(self, why: str) -> None:
        log.debug("device %s: %s", self.name, why)
        if self.client is not None:
            self.client.close()
            self.client = None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


@dataclass
class _Outbox:
    """What the cycle hands to the MQTT task: the latest status and a bounded event queue."""

    status: GuardStatus | None = None
    events: deque[tuple[str, str, bool]] = field(default_factory=lambda: deque(maxlen=500))
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # everything handed was sent


class Guard:
    """The guard process (see the module docstring)."""

    def __init__(self, cfg: CartConfig) -> None:
        if cfg.guard is None:
            raise ValueError("the configuration has no 'guard' section")
        self.cfg, self.g, self.lim = cfg, cfg.guard, limits_of(cfg)
        c = cfg.control
        self.names: dict[str, str | None] = {
            "pressure": c.pressure.measured,
            "perfusate": c.temperature.measured,
            "water": c.temperature.water_measured,
            "air": c.air_measured,
            "reservoir": c.reservoir_measured,
            "pump_cmd": c.flow.command,
            "tacho": c.flow.speed_measured,
            "heater_cmd": c.temperature.command,
            "heartbeat": self.g.heartbeat_signal if self.g.heartbeat == "modbus" else None,
            "pump_enable": self.g.pump_enable,
            "heater_enable": self.g.heater_enable,
        }
        wanted = {n for n in self.names.values() if n is not None}
        by_device: dict[str, dict[str, Signal]] = {}
        for n in sorted(wanted):
            by_device.setdefault(cfg.signals[n].device, {})[n] = cfg.signals[n]
        self.devices = {d: _Modbus(d, cfg.devices[d], s) for d, s in by_device.items()}
        self.enable: dict[Actuator, str | None] = {
            "pump": self.g.pump_enable,
            "heater": self.g.heater_enable,
        }
        self.command: dict[Actuator, str] = {
            "pump": c.flow.command,
            "heater": c.temperature.command,
        }
        self.topics = Topics(cfg.mqtt.topic_prefix, cfg.cart_id)
        self.state = State()
        self.outbox = _Outbox()
        self.instance = secrets.token_hex(6)
        self.since = datetime.now(UTC)
        self.resets: list[tuple[str, GuardReset]] = []
        self.mqtt_seq: int | None = None  # heartbeat: mqtt
        self.cycle_s: list[float] = []
        self.checked: set[Actuator] = set()  # actuators whose enable was read at least once
        self._seq = 0

    # ----------------------------------------------------------------------- one cycle

    def _value(self, values: Values, key: str) -> float | bool | None:
        name = self.names[key]
        v = values.get(name) if name is not None else None
        if v is None or name is None:
            return None
        rng = self.cfg.signals[name].range
        if rng is not None and not isinstance(v, bool) and not rng[0] <= v <= rng[1]:
            return None  # out of its plausible range: a sensor fault, not a value
        return v

    def inputs(self, values: Values, t_s: float) -> Inputs:
        def num(key: str) -> float | None:
            v = self._value(values, key)
            return None if v is None else float(v)

        pump_cmd, tacho, heater_cmd = num("pump_cmd"), num("tacho"), num("heater_cmd")
        air = self._value(values, "air")
        hb = num("heartbeat") if self.g.heartbeat == "modbus" else self.mqtt_seq
        return Inputs(
            t_s=t_s,
            pressure_mmhg=num("pressure"),
            perfusate_c=num("perfusate"),
            water_c=num("water"),
            air=None if air is None else bool(air),
            reservoir_ml=num("reservoir"),
            pump_on=pump_cmd is None or pump_cmd > 0.0 or (tacho is not None and tacho > 0.5),
            heater_on=heater_cmd is None or heater_cmd > 0.0,
            heartbeat=None if hb is None else int(hb),
        )

    async def cycle(self, t_s: float) -> Decision:
        reads = await asyncio.gather(*(d.read() for d in self.devices.values()))
        values: Values = {k: v for r in reads for k, v in r.items()}
        x = self.inputs(values, t_s)
        # An enable found off stays off: a restarted guard never releases a latch. Until its
        # enable has been read once, the guard neither judges nor writes it.
        for a, name in self.enable.items():
            if name is not None and a not in self.checked and name in values:
                self.checked.add(a)
                if values[name] is False:
                    why = "held off when the guard started (enable found off)"
                    self.state = replace(self.state, latched={**self.state.latched, a: why})
        for user, cmd in self.resets:
            self.state, refused = reset_step(self.state, x, self.lim)
            self._event("refused" if refused else "reset", refused or "latches released", user)
            self._reply(user, cmd, refused)
        self.resets.clear()
        d = decide_step(self.state, x, self.lim)
        self.state = d.state
        for text in d.events:
            self._event("latched", text, None)
        for a in ACTUATORS:
            enable = self.enable[a]
            if enable is not None:
                if a in self.checked and values.get(enable) is not d.enabled[a]:
                    await self.devices[self.cfg.signals[enable].device].write(
                        self.cfg.signals[enable], d.enabled[a]
                    )
            elif not d.enabled[a]:
                sig = self.cfg.signals[self.command[a]]
                await self.devices[sig.device].write(sig, 0.0)
        return d

    def status(self, d: Decision | None, *, online: bool, cycle_ms: float | None) -> GuardStatus:
        return GuardStatus(
            online=online,
            cart_id=self.cfg.cart_id,
            t=datetime.now(UTC),
            instance=self.instance,
            since=self.since,
            form={a: "command" if self.enable[a] is None else "enable" for a in ACTUATORS},
            enabled=dict(d.enabled) if d is not None else {},
            latched=dict(self.state.latched),
            hazards=dict(d.hazards) if d is not None else {},
            cycle_ms=None if cycle_ms is None else round(cycle_ms, 2),
        )

    def _event(self, kind: str, message: str, operator: str | None) -> None:
        level = logging.WARNING if kind in ("latched", "refused") else logging.INFO
        log.log(level, "guard %s%s: %s", kind, f" by {operator}" if operator else "", message)
        ev = GuardEvent(
            t=datetime.now(UTC),
            seq=self._seq,
            cart_id=self.cfg.cart_id,
            kind=kind,
            message=message,
            operator=operator,
        )
        self._seq += 1
        self.outbox.events.append((self.topics.name(GUARD_EVENTS), ev.model_dump_json(), False))
        self.outbox.wake.set()

    def _reply(self, user: str, cmd: GuardReset, refused: str) -> None:
        reply = GuardReply(
            command_id=cmd.command_id, result="rejected" if refused else "ok", detail=refused
        )
        where = self.topics.name(f"{GUARD}/cmd/{user}/reset/reply")
        self.outbox.events.append((where, reply.model_dump_json(), False))

    # ----------------------------------------------------------------------- the process

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        mqtt = asyncio.create_task(self._mqtt(), name="guard-mqtt")
        self._event("started", f"guard of cart {self.cfg.cart_id}: {self._describe()}", None)
        period, t0, k = self.g.cycle_s, loop.time(), 0
        d: Decision | None = None
        last_status = -1.0
        try:
            while not stop.is_set():
                started = loop.time()
                before = (dict(self.state.latched), tuple(d.hazards) if d else ())
                d = await self.cycle(started)
                took = loop.time() - started
                self.cycle_s.append(took)
                changed = before != (dict(self.state.latched), tuple(d.hazards))
                if changed or started - last_status >= STATUS_PERIOD_S:
                    self.outbox.status = self.status(d, online=True, cycle_ms=took * 1000.0)
                    self.outbox.wake.set()
                    last_status = started
                k += 1
                deadline = t0 + k * period
                if deadline < loop.time():  # late: skip the missed cycles, keep the grid
                    k = int((loop.time() - t0) / period) + 1
                    deadline = t0 + k * period
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), deadline - loop.time())
        finally:
            self._event("stopped", self._stats(), None)
            self.outbox.status = self.status(d, online=False, cycle_ms=None)
            self.outbox.idle.clear()
            self.outbox.wake.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.outbox.idle.wait(), 2.0)
            mqtt.cancel()
            await asyncio.gather(mqtt, return_exceptions=True)
            for dev in self.devices.values():
                dev.close()

    def _describe(self) -> str:
        forms = ", ".join(
            f"{a} by {self.enable[a] or f'writing {self.command[a]} = 0 (weaker form)'}"
            for a in ACTUATORS
        )
        lim = self.lim
        return (
            f"stops {forms}; limits pressure {lim.pressure_stop_mmhg:g} mmHg, perfusate "
            f"{lim.perfusate_max_c:g} degC, water {lim.water_max_c:g} degC; budget "
            f"{lim.budget_s:g} s, cycle {self.g.cycle_s:g} s, heartbeat {self.g.heartbeat} "
            f"{lim.heartbeat_s:g} s"
        )

    def _stats(self) -> str:
        if not self.cycle_s:
            return "no cycle ran"
        ms = sorted(x * 1000.0 for x in self.cycle_s)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        return (
            f"{len(ms)} cycles, cycle time median {statistics.median(ms):.2f} ms, "
            f"p99 {p99:.2f} ms, max {ms[-1]:.2f} ms"
        )

    # ----------------------------------------------------------------------- MQTT

    async def _mqtt(self) -> None:
        m = self.cfg.mqtt
        status_topic = self.topics.name(GUARD)
        will = GuardStatus(online=False, cart_id=self.cfg.cart_id, instance=self.instance)
        while True:
            try:
                async with aiomqtt.Client(
                    m.host,
                    m.port,
                    identifier=f"ilup-guard-{self.cfg.cart_id}",
                    username=m.username,
                    password=m.password,
                    protocol=client_protocol(m),
                    tls_params=client_tls(m),
                    keepalive=m.keepalive_s,
                    timeout=3,
                    will=aiomqtt.Will(status_topic, will.model_dump_json(), qos=1, retain=True),
                ) as client:
                    await client.subscribe(f"{status_topic}/cmd/+/reset", qos=1)
                    if self.g.heartbeat == "mqtt":
                        await client.subscribe(self.topics.state, qos=0)
                    receiver = asyncio.create_task(self._receive(client))
                    try:
                        await self._publish(client, status_topic)
                    finally:
                        receiver.cancel()
            except aiomqtt.MqttError as e:
                log.warning("broker %s:%d: %s; retrying in 1 s", m.host, m.port, e)
            except Exception:  # publishing must never end: log it and start afresh
                log.exception("guard MQTT task failed; retrying in 1 s")
            raise_if_cancelling()  # leaving on a cancel can raise MqttError instead (aio.py)
            await asyncio.sleep(1.0)

    async def _publish(self, client: aiomqtt.Client, status_topic: str) -> None:
        box = self.outbox
        while True:
            await box.wake.wait()
            box.wake.clear()
            while box.events:
                where, payload, retain = box.events[0]
                await client.publish(where, payload, qos=1, retain=retain, timeout=3)
                box.events.popleft()
            status, box.status = box.status, None
            if status is not None:
                await client.publish(status_topic, status.model_dump_json(), qos=1, retain=True)
            if not box.events and box.status is None:
                box.idle.set()

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for msg in client.messages:
            if not isinstance(msg.payload, bytes):
                continue
            topic = msg.topic.value
            if topic == self.topics.state:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    self.mqtt_seq = int(json.loads(msg.payload)["seq"])
                continue
            user = topic.split("/")[-2]
            try:
                cmd = GuardReset.model_validate_json(msg.payload)
            except ValueError as e:  # pydantic's ValidationError included
                log.warning("reset from %s refused: invalid payload (%s)", user, e)
                continue
            age_s = abs((datetime.now(UTC) - cmd.issued_at).total_seconds())
            if msg.retain or age_s > RESET_MAX_AGE_S:
                self._event("refused", f"reset {cmd.command_id}: expired ({age_s:.0f} s)", user)
                self._reply(user, cmd, "refused: expired")
                self.outbox.wake.set()
                continue
            self.resets.append((user, cmd))  # applied by the next cycle, with its readings


def setup_log(cfg: CartConfig) -> None:
    """The guard's own log file, beside stderr."""
    if cfg.guard is not None and cfg.guard.log_file:
        handler = logging.FileHandler(cfg.guard.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        logging.getLogger("ilup.guard").addHandler(handler)


async def run_guard(cfg: CartConfig, stop: asyncio.Event) -> None:
    setup_log(cfg)
    guard = Guard(cfg)
    log.info("guard starting: %s", guard._describe())
    await guard.run(stop)
