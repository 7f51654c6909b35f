"""docs/asyncapi.yaml is generated from the models and must be kept in step with them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from ilup_controller.commands.models import COMMAND_MODELS, Reply
from ilup_controller.mqtt.asyncapi import COMMAND, DOC_PATH, build, main, payload_schema, render
from ilup_controller.mqtt.messages import GuardReply, GuardReset
from ilup_controller.mqtt.topics import TOPIC_SPECS

REPO_DOC = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"


def load(text: str) -> dict[str, Any]:
    doc: dict[str, Any] = YAML(typ="safe", pure=True).load(text)
    return doc


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_committed_file_is_up_to_date() -> None:
    assert REPO_DOC == DOC_PATH
    assert REPO_DOC.read_text(encoding="utf-8") == render(), (
        f"docs/asyncapi.yaml is out of date with the models: run `{COMMAND}` and commit it"
    )


def test_yaml_is_the_built_document() -> None:
    assert load(render()) == build()


def test_every_topic_and_command_has_a_channel_with_the_models_schema() -> None:
    doc = load(REPO_DOC.read_text(encoding="utf-8"))
    assert doc["asyncapi"] == "3.0.0"
    by_address = {c["address"]: c for c in doc["channels"].values()}
    expected: dict[str, Any] = {f"{{prefix}}/{{cart_id}}/{s.name}": s.payload for s in TOPIC_SPECS}
    for name, model in COMMAND_MODELS.items():
        expected[f"{{prefix}}/{{cart_id}}/cmd/{{user}}/{name}"] = model
        expected[f"{{prefix}}/{{cart_id}}/cmd/{{user}}/{name}/reply"] = Reply
    # The guard's own command (ilup guard, not the daemon) and its reply.
    expected["{prefix}/{cart_id}/guard/cmd/{user}/reset"] = GuardReset
    expected["{prefix}/{cart_id}/guard/cmd/{user}/reset/reply"] = GuardReply
    assert set(by_address) == set(expected)
    for address, model in expected.items():
        (message_ref,) = (m["$ref"] for m in by_address[address]["messages"].values())
        payload = resolve(doc, message_ref)["payload"]
        assert resolve(doc, payload["$ref"]) == payload_schema(model), address


def test_qos_and_retain_follow_the_topic_specs() -> None:
    doc = build()
    for spec in TOPIC_SPECS:
        op = doc["operations"][f"send{spec.name.capitalize()}"]
        assert op["action"] == "send"
        assert op["bindings"]["mqtt"]["qos"] == spec.qos
        assert op["bindings"]["mqtt"]["retain"] is spec.retained
    for name in COMMAND_MODELS:
        op = doc["operations"][f"receive{name.capitalize()}"]
        assert op["action"] == "receive"
        assert op["bindings"]["mqtt"] == {"qos": 1, "retain": False, "bindingVersion": "0.2.0"}
        assert op["reply"]["channel"] == {"$ref": f"#/channels/{name}Reply"}


def test_every_reference_resolves_and_every_parameter_is_declared() -> None:
    doc = load(REPO_DOC.read_text(encoding="utf-8"))
    for ref in refs(doc):
        assert resolve(doc, ref) is not None, ref
    for name, channel in doc["channels"].items():
        used = set(re.findall(r"{(\w+)}", channel["address"]))
        assert used == set(channel.get("parameters", {})), name


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "asyncapi.yaml"
    stale.write_text("asyncapi: 3.0.0\n", encoding="utf-8")
    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--output", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == render()
    done = subprocess.run(
        [sys.executable, "-m", "ilup_controller.mqtt.asyncapi", "--check", "--output", str(stale)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
