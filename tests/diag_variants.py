"""Fault-free plant variants for the sensor-diagnostics tests: the reference cart with its
simulated sensors made noise-free, quantised on coarse registers, or reading exactly 0.0 at
rest. Built from config/sim.yaml only through the cart file's own fields (plant noise and
register scale), as a new user would configure a real circuit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ilup_controller.config import load_config
from ilup_controller.config.models import CartConfig
from ilup_controller.core.alarms import AlarmEvent
from sim.virtual import Sample, VirtualCart

NOISE_FIELDS = (
    "pressure_noise_mmhg",
    "flow_noise_ml_min",
    "temperature_noise_c",
    "pump_speed_noise_rpm",
    "water_temperature_noise_c",
    "reservoir_volume_noise_ml",
)
# 30 s priming + 30 min drug phase (after the 3-min ramp and rewarming) + 10 min washout + rest
PROCEDURE_S = 30.0 + 1800.0 + 600.0 + 600.0


def variant(
    *,
    noise_free: bool = False,
    scales: dict[str, float] | None = None,
    plant: dict[str, Any] | None = None,
) -> CartConfig:
    """config/sim.yaml with its plant noise set to 0 and/or its registers coarsened."""
    cfg = load_config("config/sim.yaml")
    data = cfg.model_dump()
    sim = data["simulator"]["plant"]
    if noise_free:
        for name in NOISE_FIELDS:
            sim[name] = 0.0
    sim.update(plant or {})
    for signal, scale in (scales or {}).items():
        sig = data["signals"][signal]
        sig["scale"] = scale
        if sig["data_type"] == "float32":  # a float register has no resolution to coarsen
            sig["data_type"] = "int16"
    return CartConfig.model_validate(data)


# 0.1 degC, 0.1 mmHg, 1 mL/min flow and 10 mL reservoir registers
COARSE = {
    "perfusate_temp": 0.1,
    "heater_water_temp": 0.1,
    "pa_pressure": 0.1,
    "flow": 1.0,
    "reservoir_volume": 10.0,
}

VARIANTS: dict[str, Callable[[], CartConfig]] = {
    "reference": lambda: variant(),
    "noise_free": lambda: variant(noise_free=True),
    "coarse_registers": lambda: variant(scales=COARSE),
    "coarse_noise_free": lambda: variant(noise_free=True, scales=COARSE),
    # a reservoir reading a steady 1500.0 mL and a flow meter reading exactly 0.0 at rest (the
    # meter's low-flow cut-off emulated by zero noise: the true flow at rest is exactly 0)
    "steady_reservoir_zero_flow": lambda: variant(
        plant={
            "reservoir_volume_ml": 1500.0,
            "reservoir_volume_noise_ml": 0.0,
            "flow_noise_ml_min": 0.0,
        },
        scales={"reservoir_volume": 1.0},
    ),
}


def onsets(samples: list[Sample]) -> list[AlarmEvent]:
    return [
        e
        for s in samples
        for e in s.decision.events
        if isinstance(e, AlarmEvent) and e.kind == "onset"
    ]


def run_procedure(cfg: CartConfig, seconds: float = PROCEDURE_S) -> list[Sample]:
    cart = VirtualCart(cfg)
    samples: list[Sample] = []
    cart.run_for(seconds, samples.append)
    return samples
