"""The daemon's broker password from a systemd credential, the environment, a file or the YAML
(issue 10, deliverable 2), in that order; never in the record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from ilup_controller.config.loader import ConfigError, config_from_data
from ilup_controller.config.models import CartConfig
from ilup_controller.config.secrets import with_mqtt_password
from ilup_controller.record.recorder import config_json_of

SECRET_FILE = "s3cret-from-file"
SECRET_ENV = "s3cret-from-env"
SECRET_CRED = "s3cret-from-credential"
SECRET_YAML = "s3cret-from-yaml"


def _cfg(**mqtt: Any) -> CartConfig:
    data = YAML(typ="safe", pure=True).load(Path("config/sim.yaml").read_text(encoding="utf-8"))
    data["mqtt"].update(mqtt)
    return config_from_data(data, "cart.yaml")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    pw = tmp_path / "cart1.mqtt-password"
    pw.write_text(SECRET_FILE + "\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text(SECRET_CRED + "\r\n")
    return {"file": pw, "creds": creds}


def test_precedence_credential_env_file_yaml(files: dict[str, Path]) -> None:
    with_file = _cfg(username="cart", password_file=str(files["file"]))
    with_yaml = _cfg(username="cart", password=SECRET_YAML)
    env = {"ILUP_MQTT_PASSWORD": SECRET_ENV, "CREDENTIALS_DIRECTORY": str(files["creds"])}
    cases = [
        (with_yaml, {}, SECRET_YAML, "mqtt.password"),
        (with_file, {}, SECRET_FILE, f"file {files['file']}"),
        (with_file, {"ILUP_MQTT_PASSWORD": SECRET_ENV}, SECRET_ENV, "$ILUP_MQTT_PASSWORD"),
        (with_yaml, {"ILUP_MQTT_PASSWORD": SECRET_ENV}, SECRET_ENV, "$ILUP_MQTT_PASSWORD"),
        (with_file, env, SECRET_CRED, f"credential {files['creds'] / 'mqtt-password'}"),
        # A credentials directory without our credential (other credentials only): next source.
        (with_file, {"CREDENTIALS_DIRECTORY": str(files["file"].parent)}, SECRET_FILE, "file"),
        (_cfg(), {}, None, "none"),
    ]
    for cfg, environ, expected, source in cases:
        resolved, where = with_mqtt_password(cfg, environ)
        assert resolved.mqtt.password == expected, (environ, source)
        assert where.startswith(source)
        assert resolved.mqtt.username == cfg.mqtt.username
        assert resolved.cart_id == cfg.cart_id
        for secret in (SECRET_FILE, SECRET_ENV, SECRET_CRED, SECRET_YAML):
            assert secret not in where
            assert secret not in config_json_of(resolved)  # never recorded


def test_password_file_problems_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(password="x", password_file="/etc/ilup/p")
    assert e.value.problems == [
        "mqtt.password_file: set either mqtt.password or mqtt.password_file, not both"
    ]
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as e:
        with_mqtt_password(_cfg(password_file=str(missing)), {}, "cart.yaml")
    assert e.value.source == "cart.yaml"
    assert e.value.problems[0].startswith(
        f"mqtt.password_file: cannot read the password file {missing}"
    )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as e:
        with_mqtt_password(_cfg(password_file=str(empty)), {})
    assert e.value.problems == [f"mqtt.password_file: the password file {empty} is empty"]
