"""The bytes of a command payload up to a JSON value: size, UTF-8, strict JSON, nesting.

Every problem raises ``PayloadError`` with the reply's reason and a specific detail; nothing
else escapes (commands/processor.py turns any other exception into an internal error). The
strict model validation of the value is the processor's job.
"""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn

from ilup_controller.commands.models import ReasonCode

MAX_PAYLOAD_BYTES: Final = 16 * 1024
# A command is one flat object; a little room for what an unknown field might hold. Deeper
# nesting is refused before the model sees it (its own parser has a different limit).
MAX_JSON_DEPTH: Final = 8


class PayloadError(Exception):
    def __init__(self, reason: ReasonCode, detail: str) -> None:
        super().__init__(detail)
        self.reason: ReasonCode = reason
        self.detail = detail


def safe_text(text: str, limit: int = 40) -> str:
    """Untrusted text for a reply: printable (escaped) and at most ``limit`` characters."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def decode(payload: bytes) -> str:
    if not payload:
        raise PayloadError("invalid", "empty payload")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            "invalid", f"payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}"
        )
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("invalid", f"payload is not UTF-8 (byte {exc.start})") from None


def loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity tokens, no repeated keys, at most ``MAX_JSON_DEPTH`` deep."""
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_repeated_keys)
    except json.JSONDecodeError as exc:
        raise PayloadError(
            "invalid", f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise PayloadError("invalid", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise PayloadError("invalid", f"not usable JSON: {safe_text(str(exc), 80)}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise PayloadError("invalid", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def command_id_of(obj: Any) -> str | None:
    """A well-formed ``command_id`` of a decoded payload, for the reply; else None."""
    if not isinstance(obj, dict):
        return None
    value = obj.get("command_id")
    if (
        isinstance(value, str)
        and 0 < len(value) <= 64
        and value.isascii()
        and all(ch.isalnum() or ch in "_-" for ch in value)
    ):
        return value
    return None


def peek_command_id(payload: bytes | bytearray) -> str | None:
    """The command_id of a payload not otherwise parsed, for the reply; None if not found."""
    try:
        return command_id_of(loads(decode(bytes(payload))))
    except Exception:
        return None


def _no_constant(token: str) -> NoReturn:
    raise PayloadError("invalid", f"{token} is not allowed: numbers must be finite")


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise PayloadError("invalid", f"field {safe_text(key)!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest
