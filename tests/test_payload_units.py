"""Units and descriptions in the generated JSON Schemas, docs/topics.md and the AsyncAPI
document, and the AsyncAPI licence (before: no units anywhere, no info.license)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from ilup_controller.mqtt.asyncapi import build
from ilup_controller.mqtt.messages import State

REPO = Path(__file__).resolve().parent.parent


def _numeric_fields(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for model, obj in [("State", schema), *schema.get("$defs", {}).items()]:
        for name, prop in obj.get("properties", {}).items():
            types = {prop.get("type"), *(a.get("type") for a in prop.get("anyOf", []))}
            if types & {"number", "integer"} and name != "seq":
                out.append((model, name, prop))
    return out


def test_every_number_in_the_state_has_units_and_a_description() -> None:
    fields = _numeric_fields(State.model_json_schema())
    # measured 6, targets 5, outputs 2, loop 2, drug phase 2, timing 3, calibration 2
    assert len(fields) == 22
    missing = [(m, n) for m, n, p in fields if not p.get("x-units") or not p.get("description")]
    assert missing == []
    units = {(m, n): p["x-units"] for m, n, p in fields}
    assert units[("Measured", "pressure_mmhg")] == "mmHg"
    assert units[("Measured", "flow_ml_min")] == "mL/min"
    assert units[("Outputs", "heater_pct")] == "%"
    assert units[("DrugPhase", "remaining_s")] == "s"
    assert units[("Calibration", "pressure_zero_mmhg")] == "mmHg"
    assert units[("Calibration", "stroke_volume_ml_per_rev")] == "mL/rev"


def test_generated_documents_carry_the_units_and_the_licence() -> None:
    topics = (REPO / "docs" / "topics.md").read_text()
    assert "| `pressure_mmhg` | number or null | mmHg | yes |" in topics
    doc = build()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert doc["info"]["license"] == {"name": project["license"]}
    measured = doc["components"]["schemas"]["Measured"]["properties"]
    assert measured["temperature_c"]["x-units"] == "degC"
    assert "x-units" in (REPO / "docs" / "asyncapi.yaml").read_text()
