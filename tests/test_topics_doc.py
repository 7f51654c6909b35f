"""docs/topics.md is generated from the MQTT models and must be kept in step with them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from ilup_controller.mqtt.docs import COMMAND, DOC_PATH, main, render
from ilup_controller.mqtt.messages import State, Status
from ilup_controller.mqtt.topics import TOPIC_SPECS

REPO_DOC = Path(__file__).resolve().parents[1] / "docs" / "topics.md"


def test_committed_doc_is_up_to_date() -> None:
    assert REPO_DOC == DOC_PATH
    assert REPO_DOC.read_text(encoding="utf-8") == render(), (
        f"docs/topics.md is out of date with the MQTT models: run `{COMMAND}` and commit it"
    )


def test_doc_lists_every_topic_and_field() -> None:
    text = render()
    for spec in TOPIC_SPECS:
        row = f"| `<prefix>/<cart_id>/{spec.name}` | `{spec.payload.__name__}` |"
        assert row in text
        assert f"| {spec.qos} | {'yes' if spec.retained else 'no'} |" in text
    for model in (State, Status):
        for field in model.model_fields:
            assert f"| `{field}` |" in text, field
    # Nested objects get their own tables (Measured's fields are not State's).
    assert "### `Measured`" in text
    assert "| `flow_ml_min` |" in text


def test_embedded_json_schemas_are_the_models_schemas() -> None:
    blocks = re.findall(r"```json\n(.*?)\n```", render(), flags=re.DOTALL)
    schemas = [json.loads(b) for b in blocks]
    assert schemas == [spec.payload.model_json_schema() for spec in TOPIC_SPECS]


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "topics.md"
    stale.write_text("# old\n", encoding="utf-8")
    assert main(["--check", "--output", str(stale)]) == 1
    assert main(["--output", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == render()
    done = subprocess.run(
        [sys.executable, "-m", "ilup_controller.mqtt.docs", "--check", "--output", str(stale)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
