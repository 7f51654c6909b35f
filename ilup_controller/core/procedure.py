"""Procedure phases: idle -> priming -> perfusion (drug phase) -> washout -> complete, and a
safe-stop reachable from every phase. Transitions are validated; each is an event with its
reason. The drug-phase timer counts only time at target."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ilup_controller.config.models import Procedure as ProcedureConfig


class Phase(StrEnum):
    idle = "idle"
    priming = "priming"
    perfusion = "perfusion"
    washout = "washout"
    complete = "complete"
    safe_stop = "safe_stop"


# Phases in which the pump runs and the heater may heat.
RUNNING = frozenset({Phase.priming, Phase.perfusion, Phase.washout})

_ALLOWED: dict[Phase, frozenset[Phase]] = {
    Phase.idle: frozenset({Phase.priming}),
    Phase.priming: frozenset({Phase.perfusion}),
    Phase.perfusion: frozenset({Phase.washout}),
    Phase.washout: frozenset({Phase.complete}),
    Phase.complete: frozenset(),
    Phase.safe_stop: frozenset(),
}


@dataclass(frozen=True, slots=True)
class PhaseEvent:
    t_s: float
    from_phase: Phase
    to_phase: Phase
    reason: str
    operator: str | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str


class Procedure:
    def __init__(self, cfg: ProcedureConfig, t0_s: float) -> None:
        self._cfg = cfg
        self.phase = Phase.idle
        self.entered_s = t0_s
        self.resume_to: Phase | None = None  # where a safe-stop returns to
        self.drug_elapsed_s = 0.0
        self.drug_done = False
        self.drug_counting = False  # the drug timer ran in the last tick
        self.washout_elapsed_s = 0.0

    @property
    def drug_remaining_s(self) -> float:
        return max(0.0, self._cfg.drug_phase_s - self.drug_elapsed_s)

    def request(
        self,
        to: Phase,
        t_s: float,
        reason: str,
        *,
        blockers: tuple[str, ...] = (),
        operator: str | None = None,
    ) -> PhaseEvent | Refusal:
        """Ask for a transition; ``blockers`` are interlocks that forbid starting the pump."""
        if to is Phase.safe_stop:
            if self.phase is Phase.safe_stop:
                return Refusal("already in safe_stop")
            self.resume_to = self.phase if self.phase in RUNNING else None
            return self._enter(to, t_s, reason, operator)
        if to not in _ALLOWED[self.phase]:
            return Refusal(f"{to} is not allowed from {self.phase}")
        if to in RUNNING and blockers:
            return Refusal(f"{to} refused: interlock active: {', '.join(blockers)}")
        return self._enter(to, t_s, reason, operator)

    def resume(
        self, t_s: float, blockers: tuple[str, ...], operator: str | None = None
    ) -> PhaseEvent | Refusal:
        if self.phase is not Phase.safe_stop:
            return Refusal("resume is only possible from safe_stop")
        if self.resume_to is None:
            return Refusal("nothing to resume: safe_stop was entered while not running")
        if blockers:
            return Refusal(f"resume refused: interlock active: {', '.join(blockers)}")
        to, self.resume_to = self.resume_to, None
        return self._enter(to, t_s, "resumed from safe_stop", operator)

    def restore(self, t_s: float, phase: Phase, drug_elapsed_s: float, reason: str) -> PhaseEvent:
        """After a restart: safe_stop, resuming to the phase the record last showed."""
        self.drug_elapsed_s = drug_elapsed_s
        self.drug_done = drug_elapsed_s >= self._cfg.drug_phase_s
        self.phase = phase
        return self.request(Phase.safe_stop, t_s, reason)  # type: ignore[return-value]

    def hold(self, t_s: float, reason: str) -> PhaseEvent:
        """Start in safe_stop when what happened before cannot be known; resume goes to idle."""
        event = self._enter(Phase.safe_stop, t_s, reason)
        self.resume_to = Phase.idle
        return event

    def tick(self, t_s: float, dt_s: float, *, at_target: bool) -> list[PhaseEvent]:
        """Advance timers; returns the automatic transitions taken (only with auto_advance)."""
        events: list[PhaseEvent] = []
        self.drug_counting = False
        if self.phase is Phase.perfusion and not self.drug_done:
            self.drug_counting = at_target
            if at_target:
                self.drug_elapsed_s += dt_s
            if self.drug_elapsed_s >= self._cfg.drug_phase_s - 1e-9:
                self.drug_done = True
                if self._cfg.auto_advance:
                    events.append(self._enter(Phase.washout, t_s, "drug phase complete"))
        elif self.phase is Phase.washout:
            self.washout_elapsed_s += dt_s
            if self._cfg.auto_advance and self.washout_elapsed_s >= self._cfg.washout_s - 1e-9:
                events.append(self._enter(Phase.complete, t_s, "washout complete"))
        elif (
            self.phase is Phase.priming
            and self._cfg.auto_advance
            and t_s - self.entered_s >= self._cfg.priming_s - 1e-9
        ):
            events.append(self._enter(Phase.perfusion, t_s, "priming time elapsed"))
        return events

    def _enter(self, to: Phase, t_s: float, reason: str, operator: str | None = None) -> PhaseEvent:
        ev = PhaseEvent(t_s, self.phase, to, reason, operator)
        self.phase = to
        self.entered_s = t_s
        return ev
