"""A family of healthy plants: named variants of the simulated circuit, and seeded random ones.

Real carts differ from the reference simulator in ordinary ways: steady, quantised digital
sensors, a flow meter that reads exactly 0.0 at rest, a pressure transducer zeroed 2 mmHg off,
another heater, bath, exchanger or tubing length, a colder prime, another lung, a pump whose true
stroke volume is not the configured one or that slips under afterload. Each :class:`Variant` is
one such circuit, **fault-free**: a controller must run it through a full procedure with zero
alarms. A variant is data (plant settings, register resolutions, derived quantities) and
:func:`apply` turns it into a full :class:`CartConfig` from any base cart file: the plant section
changes, and so do the register scales in ``signals`` the controller reads (a 0.1 degC register is
part of the cart file, not of the plant).

Used by tests, by ``make bench`` (the family table), by ``ilup sim --variant NAME`` and by
docs/plant_family.md, generated from this module: ``python -m sim.family --docs`` (``--check``
compares).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ilup_controller.config.models import CartConfig, SimPlant
from ilup_controller.docgen import generated_doc_main
from sim.plant import SENSOR_UNITS, NumericSensorChannel

__all__ = [
    "RANDOM_RANGES",
    "START_TEMPERATURES_C",
    "VARIANTS",
    "Variant",
    "apply",
    "by_name",
    "random_variants",
    "render",
    "write_config",
]

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "plant_family.md"
COMMAND = "python -m sim.family --docs"

# Every sensor noise of the plant: a noise-free variant sets them all to 0.
NOISE_FIELDS: tuple[str, ...] = (
    "pressure_noise_mmhg",
    "flow_noise_ml_min",
    "temperature_noise_c",
    "water_temperature_noise_c",
    "pump_speed_noise_rpm",
    "reservoir_volume_noise_ml",
)
NOISE_FREE: Mapping[str, float] = MappingProxyType(dict.fromkeys(NOISE_FIELDS, 0.0))

START_TEMPERATURES_C: tuple[float, ...] = (25.0, 30.0, 34.0, 36.0)


@dataclass(frozen=True)
class Variant:
    """One healthy circuit, as an overlay on a base cart configuration.

    ``plant``: ``simulator.plant`` fields to set. ``registers``: per instrument channel, fields of
    the signal that carries it (``scale``, ``data_type``), found through ``simulator.bindings`` so
    the overlay fits any cart file. The derived settings are relative to the base: ``start_c``
    sets the initial perfusate and water temperature, ``probe_delay_s`` sets the tubing volume to
    that delay at the base's flow target, ``stroke_volume_factor`` sets the true stroke volume to
    that multiple of the one the controller is configured with.
    """

    name: str
    description: str
    plant: Mapping[str, float | None] = field(default_factory=dict)
    registers: Mapping[NumericSensorChannel, Mapping[str, Any]] = field(default_factory=dict)
    start_c: float | None = None
    probe_delay_s: float | None = None
    stroke_volume_factor: float | None = None

    def settings(self) -> dict[str, str]:
        """Every setting this variant changes, as 'key': 'value' text (for docs and tables)."""
        out: dict[str, str] = {}
        if self.start_c is not None:
            out["start"] = f"{self.start_c:g} degC"
        if self.probe_delay_s is not None:
            out["probe delay"] = f"{self.probe_delay_s:g} s at target flow"
        if self.stroke_volume_factor is not None:
            out["true stroke volume"] = f"x{self.stroke_volume_factor:g} of configured"
        noise_free = all(self.plant.get(k) == 0.0 for k in NOISE_FIELDS)
        if noise_free:
            out["noise"] = "0 on every sensor"
        for key, value in self.plant.items():
            if noise_free and key in NOISE_FIELDS:
                continue
            out[key] = "None" if value is None else f"{value:g}"
        for channel, sig in self.registers.items():
            parts = [f"{k} {v}" for k, v in sig.items()]
            out[f"{channel} register"] = ", ".join(parts) + f" ({SENSOR_UNITS[channel]})"
        return out


def apply(variant: Variant, base: CartConfig) -> CartConfig:
    """The full cart configuration of ``variant`` on ``base`` (validated; ``base`` unchanged)."""
    if base.simulator is None:
        raise ValueError("the base configuration has no 'simulator' section")
    data = base.model_dump()
    plant: dict[str, Any] = data["simulator"]["plant"]
    unknown = sorted(set(variant.plant) - set(SimPlant.model_fields))
    if unknown:
        raise ValueError(f"variant {variant.name}: unknown simulator.plant field(s) {unknown}")
    plant.update(variant.plant)
    flow = base.control.flow
    if variant.start_c is not None:
        plant["initial_perfusate_c"] = variant.start_c
        plant["initial_water_c"] = variant.start_c
    if variant.probe_delay_s is not None:
        plant["tubing_volume_ml"] = variant.probe_delay_s * flow.target_ml_min / 60.0
    if variant.stroke_volume_factor is not None:
        plant["stroke_volume_ml_per_rev"] = (
            variant.stroke_volume_factor * flow.stroke_volume_ml_per_rev
        )
    bindings = data["simulator"]["bindings"]
    for channel, changes in variant.registers.items():
        name = bindings.get(channel)
        if name is None:
            raise ValueError(f"variant {variant.name}: the base binds no signal to {channel!r}")
        data["signals"][name].update(changes)
    return CartConfig.model_validate(data)


def changed(base: CartConfig, changes: Mapping[str, Any]) -> CartConfig:
    """``base`` with values replaced by dotted key (``{"control.tick_period_s": 0.02}``),
    validated as a cart file would be."""
    data = base.model_dump()
    for key, value in changes.items():
        *path, leaf = key.split(".")
        node = data
        for part in path:
            node = node[part]
        node[leaf] = value
    return CartConfig.model_validate(data)


def write_config(cfg: CartConfig, path: str | Path) -> None:
    """Write ``cfg`` as a cart YAML file that ``load_config`` reads back equal."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    with Path(path).open("w", encoding="utf-8") as f:
        f.write(f"# Plant-family variant written by `ilup sim --variant` ({cfg.cart_id}).\n")
        yaml.dump(cfg.model_dump(mode="json"), f)


# ------------------------------------------------------------------ the named variants

_QUANTISED_TEMPERATURES: Mapping[NumericSensorChannel, Mapping[str, Any]] = {
    "perfusate_temperature": {"scale": 0.1},
    "water_temperature": {"scale": 0.1},
}


def _variants() -> tuple[Variant, ...]:
    v = Variant
    nf = dict(NOISE_FREE)
    return (
        # ---- reference
        v("reference", "The reference simulator, unchanged (config/sim.yaml)."),
        # ---- sensors
        v("noise_free", "Every sensor noise 0: steady readings at the base registers' resolution.",
          plant=nf),
        v("temp_0p1c", "Noise-free; perfusate and water temperature registers at 0.1 degC.",
          plant=nf, registers=_QUANTISED_TEMPERATURES),
        v("pressure_0p1mmhg", "Noise-free; PA pressure register at 0.1 mmHg.",
          plant=nf, registers={"pa_pressure": {"scale": 0.1}}),
        v("reservoir_1ml", "Noise-free; reservoir level register at 1 mL, reading a steady value.",
          plant=nf, registers={"reservoir_volume": {"scale": 1.0}}),
        v("reservoir_10ml", "Noise-free; reservoir level register at 10 mL.",
          plant=nf, registers={"reservoir_volume": {"scale": 10.0}}),
        v("flow_cutoff_20", "Noise-free flow meter with a low-flow cut-off: reads exactly 0.0 "
          "below 20 mL/min.", plant={**nf, "flow_cutoff_ml_min": 20.0}),
        v("all_quantised", "Noise-free; 0.1 degC, 0.1 mmHg, 10 mL registers, flow as int16 at "
          "1 mL/min, 20 mL/min cut-off.",
          plant={**nf, "flow_cutoff_ml_min": 20.0},
          registers={
              **_QUANTISED_TEMPERATURES,
              "pa_pressure": {"scale": 0.1},
              "reservoir_volume": {"scale": 10.0},
              "flow": {"data_type": "int16", "scale": 1.0},
          }),
        v("pressure_offset_plus2", "Pressure transducer zeroed +2 mmHg off (reads high).",
          plant={"pressure_offset_mmhg": 2.0}),
        v("pressure_offset_minus2", "Pressure transducer zeroed -2 mmHg off (reads low).",
          plant={"pressure_offset_mmhg": -2.0}),
        # ---- thermal
        v("heater_300w", "A weak 300 W heater.", plant={"heater_power_w": 300.0}),
        v("heater_1500w", "A strong 1500 W heater.", plant={"heater_power_w": 1500.0}),
        v("heater_supply_400w", "1500 W element on a supply that delivers at most 400 W: "
          "commands above 27 % saturate.",
          plant={"heater_power_w": 1500.0, "heater_supply_max_w": 400.0}),
        v("water_1p5kg", "A small 1.5 kg water bath (fast water node).",
          plant={"water_mass_kg": 1.5}),
        v("water_8kg", "A large 8 kg water bath (slow water node).", plant={"water_mass_kg": 8.0}),
        v("hx_20", "A weak heat exchanger, 20 W/K.", plant={"hx_ua_w_per_k": 20.0}),
        v("hx_150", "A strong heat exchanger, 150 W/K.", plant={"hx_ua_w_per_k": 150.0}),
        v("probe_delay_0s", "Probe right at the exchanger outlet: no transport delay.",
          probe_delay_s=0.0),
        v("probe_delay_25s", "Long tubing: 25 s transport delay to the probe at target flow.",
          probe_delay_s=25.0),
        v("start_25c", "Cold prime: perfusate and water start at 25 degC.", start_c=25.0),
        v("start_30c", "Cool prime: start at 30 degC.", start_c=30.0),
        v("start_36c", "Warm prime: start at 36 degC, 1 degC to go.", start_c=36.0),
        v("room_18c", "Cold room, 18 degC.", plant={"ambient_c": 18.0}),
        v("room_26c", "Warm room, 26 degC.", plant={"ambient_c": 26.0}),
        # ---- hydraulics
        v("pvr_6wu", "Low vascular resistance, 6 WU.", plant={"pvr_wu": 6.0}),
        v("pvr_40wu", "High vascular resistance, 40 WU (about 22 mmHg at 500 mL/min).",
          plant={"pvr_wu": 40.0}),
        v("compliance_0p3", "Stiff vascular bed, 0.3 mL/mmHg.",
          plant={"compliance_ml_per_mmhg": 0.3}),
        v("compliance_3", "Compliant vascular bed, 3 mL/mmHg.",
          plant={"compliance_ml_per_mmhg": 3.0}),
        v("stroke_plus10", "True stroke volume 10 % above the configured one.",
          stroke_volume_factor=1.1),
        v("stroke_minus10", "True stroke volume 10 % below the configured one.",
          stroke_volume_factor=0.9),
        v("pump_slip", "Under-occluded roller: 0.4 %/mmHg slip, about 6 % of flow lost at "
          "15 mmHg.", plant={"pump_slip_per_mmhg": 0.004}),
        # ---- combinations
        v("small_bath_delay_12s", "1.5 kg bath and a 12 s probe delay (the issue's circuit).",
          plant={"water_mass_kg": 1.5}, probe_delay_s=12.0),
        v("cold_start_weak_hx", "Cold prime at 25 degC through a 20 W/K exchanger.",
          plant={"hx_ua_w_per_k": 20.0}, start_c=25.0),
        v("noise_free_27wu", "Noise-free sensors on a 27 WU lung: the flow ramp read without "
          "noise, then steady (the random sweep's case of a healthy sensor declared stuck).",
          plant={**nf, "pvr_wu": 27.0}),
        v("weak_hx_warm_prime", "A 36 degC prime through a 20 W/K exchanger: the circuit loses "
          "more heat than the first gradient gives, and cools before it warms.",
          plant={"hx_ua_w_per_k": 20.0}, start_c=36.0),
        v("strong_hx_delay_17s", "A 140 W/K exchanger, a 2.2 kg bath and a 17 s probe delay: "
          "the default rate loop oscillates, and the ramp after the cold plug broke the "
          "2-minute limit until the window limit held it; `ilup tune` makes it faster.",
          plant={"hx_ua_w_per_k": 140.0, "water_mass_kg": 2.2, "heater_power_w": 1000.0},
          probe_delay_s=17.0),
        v("late_flat_probe_cool_prime", "A 30 degC prime read late and flat: 0.1 degC "
          "noise-free probes 21 s down the line, 92 W/K, 2.3 kg, 900 W, an 18.5 degC room "
          "(random_2026_16). The rate loop's integral wound up while the probe showed no "
          "warming, and the bursts that followed latched heating_rate, until each burst "
          "halved the integral gain.",
          plant={**nf, "heater_power_w": 900.0, "water_mass_kg": 2.3, "hx_ua_w_per_k": 92.0,
                 "ambient_c": 18.5},
          registers=_QUANTISED_TEMPERATURES, start_c=30.0, probe_delay_s=21.0),
        v("late_flat_probe", "0.1 degC noise-free probes 17 s down the line, 76 W/K, 3.4 kg, "
          "1500 W (random_7_7): the same wind-up in bursts of 0.8 degC/min at the probe, "
          "0.52 degC/min over 2 minutes at the arterial (and 0.36 degC overshoot with the "
          "former 0.47 degC/min ramp).",
          plant={**nf, "heater_power_w": 1500.0, "water_mass_kg": 3.4, "hx_ua_w_per_k": 76.0,
                 "ambient_c": 24.5},
          registers=_QUANTISED_TEMPERATURES, probe_delay_s=17.0),
        v("noise_free_delay_24s_cool_prime", "A 30 degC prime, noise-free sensors, a 1450 W "
          "heater and a 24 s probe delay (random_31_33): the rate loop's limit cycle rose "
          "0.68-0.75 degC/min at the probe, under what counted as a burst (0.3 degC/min over "
          "the ramp), and grew until heating_rate latched at 946 s; bursts count from 0.2 "
          "over the ramp.",
          plant={**nf, "heater_power_w": 1450.0, "water_mass_kg": 3.25, "hx_ua_w_per_k": 61.4,
                 "ambient_c": 21.0, "pvr_wu": 35.0, "pump_slip_per_mmhg": 0.004},
          start_c=30.0, probe_delay_s=24.2, stroke_volume_factor=0.9),
        v("digital_stiff_circuit", "Quantised noise-free sensors, -2 mmHg offset, 30 WU, "
          "0.3 mL/mmHg, slip, stroke volume -10 %.",
          plant={**nf, "flow_cutoff_ml_min": 20.0, "pressure_offset_mmhg": -2.0,
                 "pvr_wu": 30.0, "compliance_ml_per_mmhg": 0.3, "pump_slip_per_mmhg": 0.003},
          registers={**_QUANTISED_TEMPERATURES, "pa_pressure": {"scale": 0.1},
                     "reservoir_volume": {"scale": 10.0}},
          stroke_volume_factor=0.9),
    )  # fmt: skip


VARIANTS: tuple[Variant, ...] = _variants()
_BY_NAME: Mapping[str, Variant] = MappingProxyType({v.name: v for v in VARIANTS})


def by_name(name: str) -> Variant:
    """The named variant, or a random one named ``random_<seed>_<i>``."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    parts = name.split("_")
    if len(parts) == 3 and parts[0] == "random" and parts[1].isdigit() and parts[2].isdigit():
        seed, i = int(parts[1]), int(parts[2])
        return random_variants(seed, i + 1)[i]
    known = ", ".join(_BY_NAME)
    raise KeyError(f"no plant variant named {name!r}; known: {known}, or random_<seed>_<i>")


# ------------------------------------------------------------------ random combinations

# Uniform ranges of the random combinations (the family's ranges, issue 9).
RANDOM_RANGES: Mapping[str, tuple[float, float]] = MappingProxyType(
    {
        "heater_power_w": (300.0, 1500.0),
        "water_mass_kg": (1.5, 8.0),
        "hx_ua_w_per_k": (20.0, 150.0),
        "ambient_c": (18.0, 26.0),
        "pvr_wu": (6.0, 40.0),
        "compliance_ml_per_mmhg": (0.3, 3.0),
        "pressure_offset_mmhg": (-2.0, 2.0),
        "pump_slip_per_mmhg": (0.0, 0.004),
        "probe_delay_s": (0.0, 25.0),
        "stroke_volume_factor": (0.9, 1.1),
    }
)
_DERIVED = ("probe_delay_s", "stroke_volume_factor")


def random_variants(seed: int, n: int) -> list[Variant]:
    """``n`` seeded random combinations inside ``RANDOM_RANGES`` (same seed, same variants).

    Each also draws a start temperature from ``START_TEMPERATURES_C``, noise-free or reference
    sensors, quantised temperature and pressure registers or the base ones, and a 20 mL/min
    flow cut-off or none.
    """
    rng = random.Random(f"plant-family:{seed}")
    out: list[Variant] = []
    for i in range(n):
        drawn = {k: round(rng.uniform(lo, hi), 4) for k, (lo, hi) in RANDOM_RANGES.items()}
        start_c = rng.choice(START_TEMPERATURES_C)
        noise_free = rng.random() < 0.5
        quantised = rng.random() < 0.5
        cutoff = rng.random() < 0.5
        plant: dict[str, float | None] = {k: v for k, v in drawn.items() if k not in _DERIVED}
        if noise_free:
            plant.update(NOISE_FREE)
        if cutoff:
            plant["flow_cutoff_ml_min"] = 20.0
        registers: dict[NumericSensorChannel, Mapping[str, Any]] = {}
        if quantised:
            registers = {**_QUANTISED_TEMPERATURES, "pa_pressure": {"scale": 0.1}}
        description = (
            f"Random {i} of seed {seed}: {drawn['heater_power_w']:.0f} W, "
            f"{drawn['water_mass_kg']:.1f} kg, {drawn['hx_ua_w_per_k']:.0f} W/K, "
            f"delay {drawn['probe_delay_s']:.0f} s, start {start_c:g} degC, "
            f"{drawn['pvr_wu']:.0f} WU"
            + (", noise-free" if noise_free else "")
            + (", quantised" if quantised else "")
            + (", cut-off" if cutoff else "")
        )
        out.append(
            Variant(
                name=f"random_{seed}_{i}",
                description=description,
                plant=plant,
                registers=registers,
                start_c=start_c,
                probe_delay_s=drawn["probe_delay_s"],
                stroke_volume_factor=drawn["stroke_volume_factor"],
            )
        )
    return out


# ------------------------------------------------------------------ docs/plant_family.md


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows() -> Iterator[str]:
    for variant in VARIANTS:
        settings = "; ".join(f"{k} {v}" for k, v in variant.settings().items()) or "(none)"
        yield f"| `{variant.name}` | {_cell(variant.description)} | {_cell(settings)} |"


def render() -> str:
    """The whole of docs/plant_family.md (deterministic)."""
    ranges = [f"| `{k}` | {lo:g} | {hi:g} |" for k, (lo, hi) in RANDOM_RANGES.items()]
    lines = [
        "# Plant family",
        "",
        f"<!-- Generated by `{COMMAND}` from sim/family.py. Do not edit by hand. -->",
        "",
        "Healthy circuits that differ from the reference simulator in ordinary ways. Every"
        " variant is **fault-free**: the controller must run a full procedure on it with zero"
        " alarm onsets and complete the drug phase. A variant is an overlay on a cart file:"
        " `sim.family.apply(variant, base)` returns the full configuration, with the"
        " `simulator.plant` settings and, where a register resolution changes, the `signals`"
        " scale the controller reads.",
        "",
        "```sh",
        "ilup sim -c config/sim.yaml --variant temp_0p1c --variant-config /tmp/cart.yaml",
        "ilup run -c /tmp/cart.yaml        # the controller reads the variant's register map",
        "python -m benchmarks.run --family  # the family table",
        "```",
        "",
        f"{len(VARIANTS)} named variants. Settings are relative to the base cart file: a start"
        " temperature sets the initial perfusate and water temperature, a probe delay sets"
        " `tubing_volume_ml` to that delay at the flow target, a true stroke volume multiplies"
        " the configured `control.flow.stroke_volume_ml_per_rev`.",
        "",
        "| Variant | Description | Settings |",
        "|---|---|---|",
        *_rows(),
        "",
        "## Random combinations",
        "",
        "`sim.family.random_variants(seed, n)` draws `n` circuits, reproducibly for a seed, each"
        " parameter uniform in its range below; each also draws a start temperature from"
        f" {', '.join(f'{t:g}' for t in START_TEMPERATURES_C)} degC, noise-free or reference"
        " sensors, 0.1 degC / 0.1 mmHg registers or the base ones, and a 20 mL/min flow cut-off"
        " or none. `ilup sim --variant random_<seed>_<i>` serves the i-th of seed `seed`.",
        "",
        "| Parameter | Low | High |",
        "|---|---|---|",
        *ranges,
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--docs" in args:
        args.remove("--docs")
    return generated_doc_main(
        args,
        description="Generate docs/plant_family.md from sim/family.py.",
        default_path=DOC_PATH,
        render=render,
        command=COMMAND,
    )


if __name__ == "__main__":
    sys.exit(main())
