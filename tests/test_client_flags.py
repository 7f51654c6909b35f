"""The operator CLI's broker flags (client.py): every flag says what it is and which environment
variable sets it, and a password that starts with '-' goes through as --password=VALUE (a CI
failure: `--password -x...` was taken for an option)."""

from __future__ import annotations

import argparse

import pytest

from ilup_controller.client import _KEYS, add_connection_flags, settings_from


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ilup status")
    add_connection_flags(p)
    return p


def test_every_connection_flag_has_help_naming_its_environment_variable() -> None:
    actions = {a.dest: a for a in _parser()._actions}
    for key in _KEYS:
        action = actions[f"conn_{key}"]
        assert action.help, key
        assert f"env ILUP_MQTT_{key.upper()}" in action.help, action.help
        assert action.metavar == key.upper()


def test_a_password_starting_with_a_dash_needs_the_equals_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ILUP_MQTT_PASSWORD", raising=False)
    args = _parser().parse_args(["--password=-x9Kq", "--username", "assistant"])
    s = settings_from(args)
    assert (s.username, s.password) == ("assistant", "-x9Kq")
    with pytest.raises(SystemExit):
        _parser().parse_args(["--password", "-x9Kq"])
