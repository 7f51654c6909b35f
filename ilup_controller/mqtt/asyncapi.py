"""Generates docs/asyncapi.yaml (AsyncAPI 3.0) from the topic specs and the pydantic models.

``python -m ilup_controller.mqtt.asyncapi`` rewrites the file, and ``--check`` only compares it.
tests/test_asyncapi.py fails when the committed file differs from ``render()``.

Every payload schema is the model's own ``model_json_schema()``, with its ``$defs`` moved to
``components.schemas`` (a ``#/$defs/...`` reference would resolve against the document root).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from ruamel.yaml import YAML
from ruamel.yaml.representer import RoundTripRepresenter

from ilup_controller import __version__
from ilup_controller.commands.models import (
    CMD,
    COMMAND_MODELS,
    MAX_EXPIRES_IN_S,
    REPLY,
    Reply,
)
from ilup_controller.docgen import generated_doc_main
from ilup_controller.mqtt.messages import GuardReply, GuardReset
from ilup_controller.mqtt.topics import GUARD, TOPIC_SPECS, TopicSpec

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"
COMMAND = "python -m ilup_controller.mqtt.asyncapi"
ASYNCAPI_VERSION = "3.0.0"
MQTT_BINDING_VERSION = "0.2.0"
REF_TEMPLATE = "#/components/schemas/{model}"
# The SPDX expression of pyproject.toml's `license` (a test checks they agree).
LICENSE = "LicenseRef-Proprietary"
# Commands: at least once; a repeat is answered from the duplicate cache.
COMMAND_QOS = 1

Doc = dict[str, Any]

_COMMAND_SUMMARY = {
    "setpoint": "Change the flow target, the pressure limit and/or the temperature target.",
    "mode": "Constant flow or constant pressure; automatic or manual output.",
    "phase": "Start priming, perfusion or washout; complete; safe-stop; resume from safe-stop.",
    "alarm": "Acknowledge or reset one alarm, or pause the audio.",
    "marker": "A free-text event for the procedure record ('drug in', 'clamp off').",
    "confirm": "Confirm or cancel this operator's change that was answered confirm_required.",
    "calibrate": "Zero the pressure transducer or set the stroke volume (idle, pump stopped).",
}


def payload_schema(model: type[BaseModel]) -> Doc:
    """The model's JSON schema as it appears in ``components.schemas`` (without ``$defs``)."""
    schema = model.model_json_schema(ref_template=REF_TEMPLATE)
    schema.pop("$defs", None)
    return schema


def _collect_schemas(models: list[type[BaseModel]]) -> Doc:
    schemas: Doc = {}
    for model in models:
        full = model.model_json_schema(ref_template=REF_TEMPLATE)
        defs = full.pop("$defs", {})
        for name, schema in [*defs.items(), (model.__name__, full)]:
            if name in schemas and schemas[name] != schema:
                raise ValueError(f"two different schemas are named {name!r}")
            schemas[name] = schema
    return dict(sorted(schemas.items()))


def _params(*names: str) -> Doc:
    return {n: {"$ref": f"#/components/parameters/{n}"} for n in names}


def _message(model: type[BaseModel], summary: str, bindings: Doc | None = None) -> Doc:
    msg: Doc = {
        "name": model.__name__,
        "title": model.__name__,
        "summary": summary,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{model.__name__}"},
    }
    if bindings is not None:
        msg["bindings"] = bindings
    return msg


def _mqtt_op(qos: int, retain: bool, **extra: Any) -> Doc:
    return {"mqtt": {"qos": qos, "retain": retain, **extra, "bindingVersion": MQTT_BINDING_VERSION}}


def _first_line(text: str | None) -> str:
    return " ".join((text or "").strip().split("\n\n")[0].split())


def _topic_channel(spec: TopicSpec) -> Doc:
    return {
        "address": f"{{prefix}}/{{cart_id}}/{spec.name}",
        "description": spec.when,
        "parameters": _params("prefix", "cart_id"),
        "messages": {
            spec.payload.__name__: {"$ref": f"#/components/messages/{spec.payload.__name__}"}
        },
    }


def _guard_reset(channels: Doc, operations: Doc, messages: Doc) -> None:
    """The guard's own command: not the daemon's intake, not its reply model."""
    messages["GuardReset"] = _message(GuardReset, _first_line(GuardReset.__doc__))
    messages["GuardReply"] = _message(GuardReply, "The guard's answer: ok, or rejected and why.")
    channels["guardResetCommand"] = {
        "address": f"{{prefix}}/{{cart_id}}/{GUARD}/{CMD}/{{user}}/reset",
        "description": (
            "Release the guard's latches once their hazard is gone (`ilup guard-reset`). "
            "Published by operator {user} (broker ACL); read by `ilup guard` only. Never retained."
        ),
        "parameters": _params("prefix", "cart_id", "user"),
        "messages": {"GuardReset": {"$ref": "#/components/messages/GuardReset"}},
    }
    channels["guardResetReply"] = {
        "address": f"{{prefix}}/{{cart_id}}/{GUARD}/{CMD}/{{user}}/reset/{REPLY}",
        "description": "The guard's reply to {user}'s reset. Written by `ilup guard` only.",
        "parameters": _params("prefix", "cart_id", "user"),
        "messages": {"GuardReply": {"$ref": "#/components/messages/GuardReply"}},
    }
    operations["receiveGuardReset"] = {
        "action": "receive",
        "title": "guard reset",
        "summary": "Release the guard's latches.",
        "description": (
            "Refused while the hazard of a latched actuator persists, when older than 10 s, "
            "when retained, or without a UTC offset in issued_at; every reset and refusal is "
            "an event on guard/events."
        ),
        "channel": {"$ref": "#/channels/guardResetCommand"},
        "messages": [{"$ref": "#/channels/guardResetCommand/messages/GuardReset"}],
        "bindings": _mqtt_op(COMMAND_QOS, False),
        "reply": {
            "channel": {"$ref": "#/channels/guardResetReply"},
            "messages": [{"$ref": "#/channels/guardResetReply/messages/GuardReply"}],
        },
    }


def build() -> Doc:
    """The AsyncAPI document as plain data (deterministic: no dates, no local paths)."""
    channels: Doc = {}
    operations: Doc = {}
    messages: Doc = {}

    for spec in TOPIC_SPECS:
        payload = spec.payload.__name__
        key = spec.name.replace("/", "_")  # a channel id, usable in a $ref
        publisher = spec.direction.split(" ")[0]
        channels[key] = _topic_channel(spec)
        messages[payload] = _message(spec.payload, _first_line(spec.payload.__doc__))
        operations[f"send{spec.name.capitalize()}"] = {
            "action": "send",
            "title": f"Publish {spec.name}",
            "summary": f"The {publisher} publishes on {spec.name} ({spec.direction}).",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{payload}"}],
            "bindings": _mqtt_op(spec.qos, spec.retained),
        }

    messages["Reply"] = _message(
        Reply,
        "The daemon's answer: ok, or rejected with a reason code and a specific detail.",
        {
            "mqtt": {
                "correlationData": {
                    "type": "string",
                    "description": "The command's MQTT v5 correlation data, copied unchanged.",
                },
                "bindingVersion": MQTT_BINDING_VERSION,
            }
        },
    )
    for name, model in COMMAND_MODELS.items():
        cmd_channel, reply_channel = f"{name}Command", f"{name}Reply"
        messages[model.__name__] = _message(
            model,
            _COMMAND_SUMMARY[name],
            {
                "mqtt": {
                    "responseTopic": {
                        "type": "string",
                        "description": (
                            "Optional MQTT v5 response topic. Honoured only at least two levels "
                            f"below {{prefix}}/{{cart_id}}/{CMD}/{{user}}/ (the sender's own "
                            "reply space, written by the daemon only); any other is rejected "
                            f"'invalid' and answered on {{prefix}}/{{cart_id}}/{CMD}/{{user}}/"
                            f"{name}/{REPLY}."
                        ),
                    },
                    "correlationData": {
                        "type": "string",
                        "description": "Optional MQTT v5 correlation data, copied to the reply.",
                    },
                    "bindingVersion": MQTT_BINDING_VERSION,
                }
            },
        )
        channels[cmd_channel] = {
            "address": f"{{prefix}}/{{cart_id}}/{CMD}/{{user}}/{name}",
            "description": (
                f"{_COMMAND_SUMMARY[name]} Published by operator {{user}}: the broker ACL lets a "
                f"user publish under {CMD}/<its own username>/ only, and monitors not at all. "
                "Never retained."
            ),
            "parameters": _params("prefix", "cart_id", "user"),
            "messages": {model.__name__: {"$ref": f"#/components/messages/{model.__name__}"}},
        }
        channels[reply_channel] = {
            "address": f"{{prefix}}/{{cart_id}}/{CMD}/{{user}}/{name}/{REPLY}",
            "description": (
                f"Replies to {{user}}'s {name} commands when the command named no usable MQTT v5 "
                "response topic. Written by the daemon only."
            ),
            "parameters": _params("prefix", "cart_id", "user"),
            "messages": {"Reply": {"$ref": "#/components/messages/Reply"}},
        }
        operations[f"receive{name.capitalize()}"] = {
            "action": "receive",
            "title": f"{name} command",
            "summary": _COMMAND_SUMMARY[name],
            "description": (
                "Each command is answered once per command_id: a repeat gets the first reply "
                "and is not applied again; a command older than expires_in_s (at most "
                f"{MAX_EXPIRES_IN_S:g} s) is rejected 'expired' (phase safe_stop and alarm "
                "pause_audio never expire and are never rate-limited). A safety-relevant change "
                "is answered 'confirm_required' and applied only by the same user's confirm "
                "command. A rejected command changes nothing. Every command and its outcome is "
                "also an event on the events topic."
            ),
            "channel": {"$ref": f"#/channels/{cmd_channel}"},
            "messages": [{"$ref": f"#/channels/{cmd_channel}/messages/{model.__name__}"}],
            "bindings": _mqtt_op(COMMAND_QOS, False),
            "reply": {
                "channel": {"$ref": f"#/channels/{reply_channel}"},
                "messages": [{"$ref": f"#/channels/{reply_channel}/messages/Reply"}],
            },
        }

    _guard_reset(channels, operations, messages)
    models: list[type[BaseModel]] = [s.payload for s in TOPIC_SPECS]
    models += [*COMMAND_MODELS.values(), Reply, GuardReset, GuardReply]
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "ilup-controller MQTT interface",
            "version": __version__,
            "description": (
                f"Generated by `{COMMAND}` from ilup_controller/mqtt/topics.py, "
                "ilup_controller/mqtt/messages.py and ilup_controller/commands/models.py. "
                "Do not edit by hand. Every topic of a cart is <prefix>/<cart_id>/<name>; "
                "payloads are UTF-8 JSON objects. Broker security: docs/security.md."
            ),
            "license": {"name": LICENSE},
        },
        "defaultContentType": "application/json",
        "servers": {
            "cart": {
                "host": "{host}:8883",
                "protocol": "secure-mqtt",
                "protocolVersion": "5",
                "description": (
                    "The cart's Mosquitto (config/mosquitto/mosquitto.conf): TLS only, no "
                    "anonymous access, ACL roles operator and monitor."
                ),
                "variables": {"host": {"default": "localhost", "description": "Broker host."}},
                "security": [
                    {"$ref": "#/components/securitySchemes/password"},
                    {"$ref": "#/components/securitySchemes/clientCertificate"},
                ],
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _collect_schemas(models),
            "messages": messages,
            "parameters": {
                "prefix": {"default": "ilup", "description": "mqtt.topic_prefix of the cart."},
                "cart_id": {"description": "cart_id of the cart."},
                "user": {
                    "description": (
                        "MQTT username of the sender, as authenticated by the broker. The "
                        "daemon takes the sender's identity from this level, never from the "
                        "payload."
                    )
                },
            },
            "securitySchemes": {
                "password": {
                    "type": "userPassword",
                    "description": "Username and password from the broker's password file.",
                },
                "clientCertificate": {
                    "type": "X509",
                    "description": (
                        "Optional client certificate signed by the cart's CA "
                        "(require_certificate true)."
                    ),
                },
            },
        },
    }


def _represent_none(representer: RoundTripRepresenter, _: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def render() -> str:
    yaml = YAML(typ="rt", pure=True)
    yaml.default_flow_style = False
    yaml.width = 4096  # no folding: a folded line would end in a space
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), _represent_none)
    out = io.StringIO()
    out.write(f"# Generated by `{COMMAND}`. Do not edit by hand.\n")
    yaml.dump(build(), out)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    return generated_doc_main(
        argv,
        description="Generate docs/asyncapi.yaml from the models.",
        default_path=DOC_PATH,
        render=render,
        command=COMMAND,
    )


if __name__ == "__main__":
    sys.exit(main())
