"""The daemon's MQTT broker password, from wherever the deployment keeps it.

Precedence, first found wins:

1. ``$CREDENTIALS_DIRECTORY/mqtt-password``: systemd's ``LoadCredential=mqtt-password:...``
   (deploy/ilup@.service), readable only by the service;
2. ``$ILUP_MQTT_PASSWORD`` (e.g. from an ``EnvironmentFile=``);
3. the file named by ``mqtt.password_file``;
4. ``mqtt.password`` in the YAML.

A password file holds the password on its first line; the line end is not part of it. The
password is never logged and never recorded (record/recorder.py ``config_json_of`` masks it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ilup_controller.config.loader import ConfigError
from ilup_controller.config.models import CartConfig

CREDENTIAL = "mqtt-password"
ENV_PASSWORD = "ILUP_MQTT_PASSWORD"


def _read_secret(path: Path, key: str, source: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, [f"{key}: cannot read the password file {path}: {e}"]) from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(source, [f"{key}: the password file {path} is empty"])
    return lines[0]


def mqtt_password(
    cfg: CartConfig, environ: Mapping[str, str] | None = None, source: str = "<config>"
) -> tuple[str | None, str]:
    """(password or None, where it came from, for the log: never the password itself)."""
    env = os.environ if environ is None else environ
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL).is_file():
        path = Path(creds) / CREDENTIAL
        return _read_secret(path, f"credential {CREDENTIAL}", source), f"credential {path}"
    if env.get(ENV_PASSWORD):
        return env[ENV_PASSWORD], f"${ENV_PASSWORD}"
    if cfg.mqtt.password_file is not None:
        path = Path(cfg.mqtt.password_file)
        return _read_secret(path, "mqtt.password_file", source), f"file {path}"
    if cfg.mqtt.password is not None:
        return cfg.mqtt.password, "mqtt.password"
    return None, "none"


def with_mqtt_password(
    cfg: CartConfig, environ: Mapping[str, str] | None = None, source: str = "<config>"
) -> tuple[CartConfig, str]:
    """``cfg`` with ``mqtt.password`` set from the first source found, and that source's name."""
    password, where = mqtt_password(cfg, environ, source)
    mqtt = cfg.mqtt.model_copy(update={"password": password})
    return cfg.model_copy(update={"mqtt": mqtt}), where
