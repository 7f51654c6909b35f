"""The commissioning checklist as data: each step's id, title and what it does. The runner
(runner.py) measures; evaluate.py judges; the fix comes with the verdict."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    id: str
    title: str
    does: str
    drives: bool = False  # runs an actuator: skipped after a failed safety step


STEPS: tuple[Step, ...] = (
    Step("devices", "Every device answers", "reads every signal of every device"),
    Step(
        "signals",
        "Every signal decodes inside its range",
        "samples every configured signal for a second and checks each value against its range",
    ),
    Step(
        "readback",
        "Writable signals read back what was written",
        "writes the safe value (0) to each actuator command, then reads it back",
    ),
    Step(
        "pressure_zero",
        "Pressure zero",
        "pump stopped, transducer open to atmosphere: mean pressure over the zero window",
    ),
    Step(
        "sensor_noise",
        "Sensor noise and resolution",
        "noise of each safety sensor at rest, as the sensor diagnostics estimate it",
    ),
    Step(
        "watchdog",
        "Every actuator watchdog trips",
        "arms each watchdog, writes a small command, stops writing and watches the actuator's "
        "own feedback fall to 0 within the timeout + one tick",
        drives=True,
    ),
    Step(
        "stroke_volume",
        "Stroke volume",
        "pump at two low speeds under the pressure limit: flow / speed against "
        "control.flow.stroke_volume_ml_per_rev",
        drives=True,
    ),
    Step(
        "pump_step",
        "Pump step response",
        "the step between the two speeds: flow and pressure must rise with a plausible gain",
        drives=True,
    ),
    Step(
        "heater_pulse",
        "Heater pulse",
        "flow proven, heater power on under every cap: the water temperature must rise",
        drives=True,
    ),
    Step(
        "bubble_reservoir",
        "Bubble detector and reservoir",
        "the bubble detector reads no air with a primed line, the reservoir level reads "
        "plausibly above its low alarm",
    ),
    Step(
        "operator",
        "Operator-confirmed items",
        "what software cannot see, each confirmed by name",
    ),
)

OPERATOR_ITEMS: tuple[tuple[str, str], ...] = (
    ("primed", "circuit primed with saline and de-aired"),
    ("clamps", "clamps placed and checked (inflow and outflow lines)"),
    ("labelled", "lines and cannulas labelled"),
    ("transducer_open", "pressure transducer open to atmosphere for the zero, then closed"),
)
