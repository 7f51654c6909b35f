"""Pending two-step changes: at most one per operator, each with a token and a deadline.

Pure: time is the core's time ``t_s`` passed in by the caller (virtual in tests), tokens come
from an injectable factory. The processor (commands/processor.py) decides what needs
confirmation (commands/policy.py), asks here for a token, and settles a confirm against the
pending change of its sender:

- the same operator, the right token, within the window: the change is handed back to apply;
- a wrong token from that operator: the change is cancelled;
- another operator's confirm naming the token: refused, and the owner's change is cancelled
  (only the operator who asked may confirm);
- any other command from that operator cancels it first; the window passing cancels it
  (``expire``, called every tick, so the record shows the expiry when it happens).

Every ending is remembered per operator (the last one) so that a late or repeated confirm is
told exactly what became of its change.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from ilup_controller.commands.models import AnyCommand, CommandName

MAX_PENDING_USERS: Final = 256  # a pending change per operator; the oldest goes beyond this

Ending = Literal["confirmed", "cancelled", "expired"]


def new_token() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class Pending:
    sender: str
    name: CommandName
    command: AnyCommand
    change: str  # what will change, old -> new
    token: str
    requested_s: float
    deadline_s: float

    @property
    def label(self) -> str:
        return f"{self.name} {self.command.command_id}"


@dataclass(frozen=True, slots=True)
class Ended:
    pending: Pending
    how: Ending
    why: str  # e.g. "cancelled by marker m7", "not confirmed within 10 s"


class Confirmations:
    def __init__(self, window_s: float, token_factory: Callable[[], str] = new_token) -> None:
        self.window_s = window_s
        self._new_token = token_factory
        self._pending: dict[str, Pending] = {}
        self._ended: dict[str, Ended] = {}

    def request(
        self, sender: str, name: CommandName, cmd: AnyCommand, change: str, t_s: float
    ) -> Pending:
        """A new pending change for ``sender`` (its previous one must have been ended)."""
        if len(self._pending) >= MAX_PENDING_USERS:
            oldest = min(self._pending.values(), key=lambda p: p.requested_s)
            self.end(oldest.sender, "cancelled", "too many pending changes")
        p = Pending(sender, name, cmd, change, self._new_token(), t_s, t_s + self.window_s)
        self._pending[sender] = p
        return p

    def pending(self, sender: str) -> Pending | None:
        return self._pending.get(sender)

    def owner_of(self, token: str) -> Pending | None:
        for p in self._pending.values():
            if secrets.compare_digest(p.token, token):
                return p
        return None

    def end(self, sender: str, how: Ending, why: str) -> Ended | None:
        p = self._pending.pop(sender, None)
        if p is None:
            return None
        ended = self._ended[sender] = Ended(p, how, why)
        if len(self._ended) > MAX_PENDING_USERS:
            del self._ended[next(iter(self._ended))]
        return ended

    def last_ended(self, sender: str, token: str) -> Ended | None:
        """How ``sender``'s change with this token ended, if it was the last one to end."""
        e = self._ended.get(sender)
        return e if e is not None and secrets.compare_digest(e.pending.token, token) else None

    def expire(self, t_s: float) -> list[Ended]:
        """End every change whose window has passed at ``t_s``."""
        late = [p for p in self._pending.values() if t_s > p.deadline_s + 1e-9]
        ended: list[Ended] = []
        for p in late:
            e = self.end(p.sender, "expired", f"not confirmed within {self.window_s:g} s")
            if e is not None:
                ended.append(e)
        return ended
