"""Exit codes of the ``ilup`` command: the one table, also rendered in the README (a test
checks that the README shows exactly this table)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses of every `ilup` subcommand (MEANING says what each one means)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    REFUSED = 3
    CONFIG = 4
    REJECTED = 5
    OFFLINE = 6
    BROKER_AUTH = 7


MEANING: dict[ExitCode, str] = {
    ExitCode.OK: "done; a command was accepted (`ok`)",
    ExitCode.FAILURE: (
        "runtime failure: no reply in time, broker unreachable, record unreadable; "
        "`ilup verify`: the record has no hash chain (format 1)"
    ),
    ExitCode.USAGE: "usage error: unknown subcommand, flag or argument (argparse)",
    ExitCode.REFUSED: "start refused: a start-up safety check failed, or the cart is in use",
    ExitCode.CONFIG: "configuration error: every error with its key path; a port already taken",
    ExitCode.REJECTED: (
        "the daemon rejected the command (the reply names the reason); "
        "`ilup verify`: the record is tampered or damaged"
    ),
    ExitCode.OFFLINE: "the cart is offline: its retained status says `online: false`, or none",
    ExitCode.BROKER_AUTH: "the broker refused the credentials (user name or password)",
}


def markdown_table() -> str:
    """The README's exit code table."""
    rows = ["| exit | name | meaning |", "|---|---|---|"]
    rows += [f"| {c.value} | `{c.name.lower()}` | {MEANING[c]} |" for c in ExitCode]
    return "\n".join(rows) + "\n"
