"""The one place where the core is wired to its edges.

Tasks: one :class:`DeviceLink` per Modbus device (each owns its connection), the MQTT link, and
the control loop. The control loop never awaits I/O: it reads the latest readings from a plain
dict, steps the core, drops the commands into each link's mailbox and offers state, alarms and
events to the MQTT link. Whatever ends the run (a stop request, a crash in any task), ``finally``
drives every actuator to its safe state before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from ilup_controller import __version__
from ilup_controller.commands.models import Reply, command_filter
from ilup_controller.commands.processor import CommandEvent
from ilup_controller.config.models import CartConfig
from ilup_controller.core.cart import CartCore, Restored, TickResult
from ilup_controller.core.monitor import silent_devices
from ilup_controller.core.types import Reading
from ilup_controller.modbus.link import DeviceLink, LinkHealth, build_links
from ilup_controller.mqtt.link import Incoming, MqttLink
from ilup_controller.mqtt.messages import Event
from ilup_controller.mqtt.topics import ALARMS, EVENTS, GUARD, Topics
from ilup_controller.record.recorder import Recorder, RecorderError
from ilup_controller.runtime.commands import CommandIntake, PendingReply
from ilup_controller.runtime.commissioning import CommissioningEdge
from ilup_controller.runtime.guardwatch import GuardWatch
from ilup_controller.runtime.notify import Notifier
from ilup_controller.runtime.recovery import open_procedure
from ilup_controller.runtime.safe import drive_safe, safe_outputs
from ilup_controller.runtime.state import build_alarms, build_event, build_state
from ilup_controller.runtime.ticker import Ticker
from ilup_controller.runtime.watchdog import StartRefused, arm_watchdogs

log = logging.getLogger("ilup.daemon")


class Daemon:
    def __init__(
        self,
        cfg: CartConfig,
        *,
        on_tick: Callable[[float, float, float], None] | None = None,
        cart_file: str | None = None,
    ) -> None:
        """``on_tick(deadline_s, started_s, finished_s)`` is for benchmarks (loop clock);
        ``cart_file``: where the commissioning file is looked for (commissioning/results.py).
        """
        self.cfg = cfg
        self.commissioning = CommissioningEdge(cfg, cart_file)
        self._on_tick = on_tick
        self.store: dict[str, Reading] = {}
        self.ticker = Ticker(cfg.control.tick_period_s)
        self.links: dict[str, DeviceLink] = {}
        self.mqtt: MqttLink | None = None
        self.core: CartCore | None = None
        self.recorder: Recorder | None = None
        self._acks: set[asyncio.Task[None]] = set()
        self._event_seq = 0
        self._dropped_seen = 0
        self._link_up: dict[str, bool] = {}
        self._device_events: list[str] = []
        self.alarm_onsets = 0  # for benchmarks and soak checks: a healthy run has none
        self._alarm_signature: tuple[object, ...] | None = None
        self.notify = Notifier()  # systemd Type=notify; a no-op without $NOTIFY_SOCKET
        self._guard_topic = Topics(cfg.mqtt.topic_prefix, cfg.cart_id).name(GUARD)
        self.guard = GuardWatch(cfg.guard, 0.0)  # started again in run(), on the loop clock
        g = cfg.guard
        self._heartbeat = None if g is None else g.heartbeat_register

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises if a task crashed (after the safe shutdown)."""
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        # RTU lines: one shared bus each. The control loop sets every command every tick, so a
        # command older than its device's watchdog timeout is a stalled loop's: not written.
        self.links = build_links(cfg, self.store, loop.time, expire_outputs=True)
        self.intake = CommandIntake(cfg, self._send_reply)
        self.guard = GuardWatch(cfg.guard, loop.time())
        self.mqtt = MqttLink(
            cfg.mqtt,
            cfg.cart_id,
            simulated=cfg.simulated,
            version=__version__,
            subscribe=(command_filter(cfg.mqtt.topic_prefix, cfg.cart_id),)
            + ((self._guard_topic,) if cfg.guard is not None else ()),
            on_message=self._on_message,
        )
        # Commands start safe in every mailbox, so the very first cycle writes zeros.
        for sig, value in safe_outputs(cfg).items():
            self._link_of(sig).set_output(sig, value)

        background = [
            asyncio.create_task(link.run(), name=f"modbus:{n}") for n, link in self.links.items()
        ]
        background.append(asyncio.create_task(self.mqtt.run(), name="mqtt"))
        control: asyncio.Task[None] | None = None
        stopper = asyncio.create_task(stop.wait(), name="stop")
        crashed: BaseException | None = None
        try:
            # Device-side dead-man first: no actuator is commanded before its watchdog is armed.
            await arm_watchdogs(cfg, self.links)
            try:
                opening = await asyncio.to_thread(open_procedure, cfg)
                recorder, restored = opening.recorder, opening.restored
                await asyncio.to_thread(recorder.start)
            except RecorderError as e:
                raise StartRefused(f"cannot write the procedure record: {e}") from e
            self.recorder = recorder
            log.info("recording to %s", recorder.path)
            self.core = CartCore(cfg, t0_s=loop.time())
            if restored is not None:
                self.core.restore(loop.time(), restored)
            if opening.unreadable is not None:
                self.core.hold_for_unreadable_record(loop.time(), *opening.unreadable)
            recorder.event(self._daemon_event("daemon started", restored))
            for text in self.commissioning.start(self.core, loop.time()):
                recorder.event(self._record_note("commissioning", text))
            # Start-up's objects (imports, config, models) leave the collector's view: with
            # them in the oldest generation, each full collection walked them all. In a
            # command flood on a slow 2-core VM those came every 1.5-2 s and took 43-88 ms,
            # and with the MQTT callbacks around them the tick started a period late
            # (tick_overrun in 2 of 3 runs of the flood test); frozen, one of 31 ms in the
            # flood, and 1 overrun in 12 runs.
            gc.collect()
            gc.freeze()
            control = asyncio.create_task(self._control_loop(), name="control")
            log.info(
                "daemon started cart_id=%s devices=%s tick=%.3fs",
                cfg.cart_id,
                ",".join(self.links),
                cfg.control.tick_period_s,
            )
            done, _ = await asyncio.wait(
                {control, stopper, *background}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception() is not None:
                    crashed = task.exception()
                    log.critical(
                        "task %s crashed: %r; driving actuators safe", task.get_name(), crashed
                    )
        except StartRefused as e:
            crashed = e
            log.critical("refusing to start: %s", e)
        except BaseException as e:  # cancelled from outside, or a bug here: still go safe
            crashed = e
            log.critical("daemon failed: %r; driving actuators safe", e)
            raise
        finally:
            await self._shutdown(stopper, control, background, crashed)
        if crashed is not None:
            raise crashed

    async def _shutdown(
        self,
        stopper: asyncio.Task[bool],
        control: asyncio.Task[None] | None,
        background: list[asyncio.Task[None]],
        crashed: BaseException | None,
    ) -> None:
        """Actuators safe first, then the record says why, then the links close. Each step is
        guarded on its own: a failure in one (e.g. the exception that crashed the control
        task) never skips the safe writes or the record."""
        self.notify.stopping()
        stopper.cancel()
        if control is not None:
            control.cancel()
            # gather, not await: a crashed task would re-raise its exception right here.
            await asyncio.gather(control, return_exceptions=True)
        try:
            await self._drive_safe()
        except Exception:
            log.exception("driving actuators safe failed; relying on the device watchdogs")
        if self._acks:
            await asyncio.wait(self._acks, timeout=2.0)
        if self.recorder is not None:
            stop_note = "daemon stopped" if crashed is None else f"daemon crashed: {crashed!r}"
            try:
                await self.recorder.commit(self._daemon_event(stop_note, None))
            except Exception as e:
                log.error("could not record %r: %s", stop_note, e)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.recorder.close)
            sealed = self.recorder.sealed_head
            if sealed is not None and self.mqtt is not None:
                # A copy of the chain head outside the record: whoever keeps the events can
                # tell a record rewritten later, hashes and all, from the one sealed here.
                rows, head = sealed
                seq, self._event_seq = self._event_seq, self._event_seq + 1
                self.mqtt.publish_event(
                    EVENTS,
                    Event(
                        t=datetime.now(UTC),
                        seq=seq,
                        cart_id=self.cfg.cart_id,
                        kind="record",
                        message=f"record sealed: {self.recorder.path.name}: {rows} rows, "
                        f"chain head {head}",
                    ),
                )
        if self.mqtt is not None:
            with contextlib.suppress(Exception):
                await self.mqtt.close()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self.notify.close()
        log.info(
            "daemon stopped ticks=%d overruns=%d",
            self.ticker.stats.ticks,
            self.ticker.stats.overruns,
        )

    def _on_message(self, message: Incoming) -> None:
        if message.topic == self._guard_topic:
            self.guard.on_status(message.payload, message.retain, asyncio.get_running_loop().time())
        else:
            self.intake.on_message(message)

    def _send_reply(self, topic: str, reply: Reply, correlation: bytes | None) -> None:
        assert self.mqtt is not None
        self.mqtt.publish_to(topic, reply, correlation_data=correlation)

    def _link_of(self, signal: str) -> DeviceLink:
        return self.links[self.cfg.signals[signal].device]

    async def _drive_safe(self) -> None:
        """Pump to zero and heater off, written directly; each device independently."""
        await drive_safe(self.cfg, self.links)

    def _devices_down(self, t_s: float, health: dict[str, LinkHealth]) -> tuple[str, ...]:
        for name, h in health.items():  # link changes go to the events topic and the record
            if self._link_up.get(name) != h.connected:
                self._link_up[name] = h.connected
                what = "link up" if h.connected else f"link down ({h.last_error or 'no reply'})"
                self._device_events.append(f"device {name}: {what}")
        return silent_devices(
            t_s,
            {n: (h.last_ok_t, h.last_error) for n, h in health.items()},
            self.cfg.control.stale_after_s,
        )

    async def _control_loop(self) -> None:
        assert self.core is not None
        assert self.mqtt is not None
        core, mqtt, cfg = self.core, self.mqtt, self.cfg
        loop = asyncio.get_running_loop()
        wall0, mono0 = datetime.now(UTC), loop.time()

        def utc_of(t_s: float) -> datetime:
            return wall0 + timedelta(seconds=t_s - mono0)

        seq = 0
        on_tick = self._on_tick
        async for t_s in self.ticker.ticks():
            started_s = time.monotonic() if on_tick is not None else 0.0
            replies, command_events = self.intake.apply_pending(
                core, t_s, record_problem=self._record_unwritable()
            )
            health = {name: link.health for name, link in self.links.items()}  # one snapshot
            r = core.step(
                t_s,
                self.store,
                devices_down=self._devices_down(t_s, health),
                overruns_total=self.ticker.stats.overruns,
                remote_ok=mqtt.connected,
                recorder_problem=self._recorder_problem(),
                last_write_ok_s={n: h.last_write_ok_t for n, h in health.items()},
                identity_clash=mqtt.identity_clash,
                guard_problem=self.guard.problem(t_s),
            )
            for sig, value in r.outputs.items():
                self._link_of(sig).set_output(sig, value)
            if self._heartbeat is not None:  # `ilup guard` watches this counter move
                self._link_of(self._heartbeat).set_output(self._heartbeat, seq % 65536)
            for link in self.links.values():
                link.request_cycle()
            calibration, gate = self.commissioning.state(core)
            state = build_state(
                cfg,
                r,
                seq=seq,
                utc_of=utc_of,
                stats=self.ticker.stats,
                calibration=calibration,
                commissioning=gate,
            )
            mqtt.offer_state(state)
            assert self.recorder is not None
            self.recorder.sample(state, t_mono_s=t_s)
            self._publish_command_events(command_events, replies)
            self._publish_alarms_and_events(r, utc_of)
            self._notify_systemd(r, first=seq == 0, now_s=loop.time())
            seq += 1
            if on_tick is not None:
                on_tick(t_s, started_s, time.monotonic())

    def _notify_systemd(self, r: TickResult, *, first: bool, now_s: float) -> None:
        """READY=1 after the first tick (watchdogs armed before it), then STATUS= on change
        and WATCHDOG=1 from this loop only, so a hung control task stops the pings."""
        assert self.core is not None
        high = sum(1 for a in r.alarms if a.priority == "high")
        status = f"phase {r.phase.value}, {len(r.alarms)} active alarm(s), {high} high"
        if first:
            self.notify.notify_ready(status)
        else:
            self.notify.status(status)
        self.notify.tick(now_s, self.core.continuity.gap_limit_s)

    def _publish_command_events(
        self, events: list[CommandEvent], replies: list[PendingReply]
    ) -> None:
        assert self.mqtt is not None
        assert self.recorder is not None
        for text in self._device_events:
            self._emit(
                Event(
                    t=datetime.now(UTC),
                    seq=self._event_seq,
                    cart_id=self.cfg.cart_id,
                    kind="device",
                    message=text,
                )
            )
        self._device_events.clear()
        limited: dict[str, int] = {}
        for e in events:
            if e.reason == "rate_limited":  # a flood is summarised, not echoed message by message
                limited[e.sender] = limited.get(e.sender, 0) + 1
                continue
            self._emit(
                Event(
                    t=e.t,
                    seq=self._event_seq,
                    cart_id=self.cfg.cart_id,
                    kind=e.kind,
                    message=e.message,
                    operator=e.sender,
                )
            )
        for sender, n in limited.items():
            self._emit(
                Event(
                    t=datetime.now(UTC),
                    seq=self._event_seq,
                    cart_id=self.cfg.cart_id,
                    kind="command",
                    operator=sender,
                    message=f"{n} command(s) from {sender} rejected: rate_limited",
                )
            )
        if replies:
            # Acknowledged only once on disk: the commit is queued behind the events above.
            task = asyncio.create_task(self._ack_after_commit(replies))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    def _emit(self, event: Event) -> None:
        """An event to the events topic and the record."""
        assert self.mqtt is not None
        assert self.recorder is not None
        self.mqtt.publish_event(EVENTS, event)
        self.recorder.event(event)
        self._event_seq += 1

    async def _ack_after_commit(self, replies: list[PendingReply]) -> None:
        assert self.recorder is not None
        ids = ", ".join(str(r.command_id) for _, r, _ in replies)
        note = Event(
            t=datetime.now(UTC),
            seq=self._event_seq,
            cart_id=self.cfg.cart_id,
            kind="acknowledged",
            message=f"replies sent for commands {ids}",
        )
        self._event_seq += 1
        problem = ""
        try:
            await self.recorder.commit(note)
        except RecorderError as e:
            problem = f" (NOT RECORDED: {e})"
            log.error("commands %s acknowledged without a durable record: %s", ids, e)
        for topic, reply, correlation in replies:
            if problem and reply.reason != "recorder_failed":  # that one says so already
                reply = reply.model_copy(update={"detail": (reply.detail + problem)[:500]})
            self._send_reply(topic, reply, correlation)

    def _record_unwritable(self) -> str:
        """Why a command's event cannot be committed now, "" while it can. A slow disk (rows
        dropped) is not enough: commit() still waits for its row and fails if it is not written.
        """
        rec = self.recorder
        if rec is None or rec.failed is None:
            return ""
        return f"recorder failed: {rec.failed}"

    def _recorder_problem(self) -> str:
        rec = self.recorder
        if rec is None:
            return ""
        if rec.failed:
            return f"writer failed: {rec.failed}"
        if rec.dropped > self._dropped_seen:
            self._dropped_seen = rec.dropped
            return f"{rec.dropped} rows dropped (queue full: the disk is too slow)"
        return ""

    def _record_note(self, kind: str, message: str) -> Event:
        seq, self._event_seq = self._event_seq, self._event_seq + 1
        return Event(
            t=datetime.now(UTC), seq=seq, cart_id=self.cfg.cart_id, kind=kind, message=message
        )

    def _daemon_event(self, what: str, restored: Restored | None) -> Event:
        message = f"{what}: ilup {__version__}, cart {self.cfg.cart_id}"
        if restored is not None:
            message += (
                f"; continuing the procedure after {restored.outage_s:.1f} s, in "
                f"safe_stop (resume to {restored.phase})"
            )
        seq, self._event_seq = self._event_seq, self._event_seq + 1
        return Event(
            t=datetime.now(UTC), seq=seq, cart_id=self.cfg.cart_id, kind="daemon", message=message
        )

    def _publish_alarms_and_events(
        self, r: TickResult, utc_of: Callable[[float], datetime]
    ) -> None:
        assert self.mqtt is not None
        for e in r.events:
            event = build_event(self.cfg, e, seq=self._event_seq, utc_of=utc_of)
            if event.kind == "onset":
                self.alarm_onsets += 1
            level = logging.WARNING if event.kind in ("onset", "refused") else logging.INFO
            log.log(
                level,
                "event kind=%s alarm=%s priority=%s operator=%s: %s",
                event.kind,
                event.alarm_id or "-",
                event.priority or "-",
                event.operator or "-",
                event.message,
            )
            self.mqtt.publish_event(EVENTS, event)
            assert self.recorder is not None
            self.recorder.event(event)
            self._event_seq += 1
        signature: tuple[object, ...] = (
            r.audio_paused_until_s,
            *((a.alarm_id, a.presence, a.acknowledged, a.audible) for a in r.alarms),
        )
        if signature != self._alarm_signature:
            self._alarm_signature = signature
            self.mqtt.publish_event(ALARMS, build_alarms(self.cfg, r, utc_of=utc_of), retain=True)
