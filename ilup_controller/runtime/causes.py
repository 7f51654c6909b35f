"""The likely cause of a device that does not answer, from the link's last error: every message
about an unreachable device names it, so the reader knows where to look first."""

from __future__ import annotations


def likely_cause(error: str, device: str) -> str:
    e = error.lower()
    where = f"devices.{device}"
    if not e or "connect" in e or "refused" in e or "unreachable" in e or "no route" in e:
        return (
            "nothing answers at its address: the device is off or not yet booted, its network "
            f"cable or RS-485 wiring is out, or {where}.host/port (serial.port) is wrong"
        )
    if "no reply" in e or "no response" in e or "no result" in e or "timed out" in e:
        return (
            "it is reachable but does not reply in time: wrong unit_id, wrong serial settings "
            f"(baud rate, parity), or a device slower than {where}.timeout_s"
        )
    if "exception 2" in e or "illegal_address" in e or "illegal data address" in e:
        return "it answers but refuses the register: check the signals' table and address"
    if "exception" in e:
        return "it answers with a Modbus exception: check the register map (device manual)"
    return f"check its power, cabling and {where} (last error: {error})"
