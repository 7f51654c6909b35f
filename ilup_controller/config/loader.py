"""Load a cart configuration from YAML and turn every problem into a message with its key path."""

from __future__ import annotations

import difflib
import types
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from ilup_controller.config.models import CartConfig, Signal


class ConfigError(Exception):
    """A configuration file that cannot be used; ``problems`` holds one line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def report(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} configuration error(s)"]
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


def _key_path(loc: Sequence[int | str], skip: Collection[str] = ()) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item not in skip:  # a discriminated union's tag: the data names it already
            parts.append(("." if parts else "") + item)
    return "".join(parts)


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model whose fields hold the key at ``loc`` (None where a union leaves it open)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = _optional_of(field.annotation)
        elif get_origin(current) in (dict, list, tuple):  # ``part`` is a key or an index
            current = _optional_of(get_args(current)[-1])
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _optional_of(tp: Any) -> Any:
    """X from ``X | None``; None for a union of several types (the data says which)."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return tp


def _unknown_key(model: type[BaseModel] | None, loc: Sequence[int | str]) -> str:
    """'unknown key', with the nearest known key when the name looks like a typo of it."""
    holder = None if model is None or not loc else _model_at(model, loc)
    key = loc[-1] if loc else None
    if holder is None or not isinstance(key, str):
        return "unknown key"
    near = difflib.get_close_matches(key, list(holder.model_fields), n=1, cutoff=0.75)
    return f"unknown key (did you mean {near[0]}?)" if near else "unknown key"


def format_validation_error(
    err: ValidationError,
    *,
    union_tags: Sequence[str] = (),
    what: str = "kind",
    model: type[BaseModel] | None = None,
) -> list[str]:
    """One line per error, each prefixed with its key path. ``union_tags`` are the values of
    a discriminated union's ``kind`` field, for errors that name a missing or unknown one;
    ``model`` (the validated model) lets an unknown key name the known key it is closest to."""
    problems: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        kind = e["type"]
        msg = str(e["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = _unknown_key(model, loc)
        elif kind == "missing":
            msg = "required key is missing"
        elif kind == "union_tag_not_found":
            loc, msg = (*loc, "kind"), f"required key is missing (one of: {', '.join(union_tags)})"
        elif kind == "union_tag_invalid":
            tag = (e.get("ctx") or {}).get("tag")
            loc, msg = (*loc, "kind"), f"unknown {what} {tag!r}; known: {', '.join(union_tags)}"
        path = _key_path(loc, union_tags)
        if not path:
            # Cross-reference checks already name their key paths, joined by "; ".
            problems.extend(part.strip() for part in msg.split("; "))
        else:
            problems.append(f"{path}: {msg}")
    return problems


def parse_yaml(text: str, source: str) -> Any:
    yaml = YAML(typ="safe", pure=True)  # YAML 1.2; duplicate keys are an error
    try:
        return yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(source, [f"{where}{e.problem or e}"]) from None
    except YAMLError as e:
        raise ConfigError(source, [f"invalid YAML: {e}"]) from None


def config_from_data(data: Any, source: str = "<config>") -> CartConfig:
    if not isinstance(data, dict):
        raise ConfigError(source, ["the top level must be a mapping of keys"])
    try:
        cfg = CartConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e, model=CartConfig)) from None
    problems = written_value_problems(cfg)
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _fmt(x: float) -> str:
    return f"{x:g}"


def _range_text(r: tuple[float, float]) -> str:
    return f"[{_fmt(r[0])}, {_fmt(r[1])}]"


def written_value_problems(cfg: CartConfig) -> list[str]:
    """Every value the controller writes must fit its register, proven here with the real codec.

    Command signals carry 0 (the safe value) up to their configured maximum; watchdog registers
    carry their timeout, never as raw 0 (which devices read as "watchdog off"). These checks
    need the codec, which imports config.models: a cross-reference check on the loaded config
    rather than a model validator, so config.models does not depend on modbus/.
    """
    # Imported here: codec imports config.models, whose package __init__ imports this module.
    from ilup_controller.modbus import codec

    def fits(sig: Signal, value: float) -> str | None:
        try:
            if codec.is_bit_signal(sig):
                codec.encode_bit(sig, value)
            else:
                codec.encode(sig, value)
        except codec.CodecError as e:
            return str(e)
        return None

    problems: list[str] = []
    c = cfg.control
    for cmd, max_path, max_value in (
        (c.flow.command, "control.flow.speed_max_rpm", c.flow.speed_max_rpm),
        (c.temperature.command, "control.temperature.heater_max_pct", c.temperature.heater_max_pct),
    ):
        sig = cfg.signals[cmd]
        at = f"signals.{cmd}"
        # The raw value is linear in the engineering value and each register type's raw range
        # is one interval: if 0 and the maximum encode, so does everything between them.
        why = fits(sig, 0.0)
        if why is not None:
            key = "offset" if sig.offset != 0.0 else "data_type"
            problems.append(f"{at}.{key}: command signal cannot encode its safe value 0: {why}")
        why = fits(sig, max_value)
        if why is not None:
            key = "data_type" if codec.is_bit_signal(sig) else "scale"
            problems.append(
                f"{at}.{key}: command signal cannot encode {max_path} = {_fmt(max_value)}: {why}"
            )
        if sig.range is not None:
            low, high = sig.range
            if not low <= 0.0 <= high:
                problems.append(
                    f"{at}.range: {_range_text(sig.range)} does not contain the safe value 0"
                )
            if not low <= max_value <= high:
                problems.append(
                    f"{at}.range: {_range_text(sig.range)} does not contain "
                    f"{max_path} = {_fmt(max_value)}"
                )
    for dev_name, dev in cfg.devices.items():
        wd = dev.watchdog
        if wd is None:
            continue
        at = f"devices.{dev_name}.watchdog.timeout_s"
        sig = cfg.signals[wd.signal]
        timeout = wd.timeout_s
        if codec.is_bit_signal(sig):
            problems.append(f"{at}: signal {wd.signal!r} is a bit; it cannot hold seconds")
            continue
        where = (
            f"signal {wd.signal!r} ({sig.data_type}, scale {_fmt(sig.scale)}, "
            f"offset {_fmt(sig.offset)})"
        )
        try:
            registers = codec.encode(sig, timeout)
            back = codec.decode(sig, registers)
        except codec.CodecError as e:
            problems.append(f"{at}: {_fmt(timeout)} s does not fit signal {wd.signal!r}: {e}")
            continue
        step = codec.resolution(sig, timeout)
        if not any(registers):
            hint = (
                f"; the smallest timeout it can hold is {_fmt(sig.scale)} s"
                if sig.offset == 0.0 and sig.scale > 0.0
                else ""
            )
            problems.append(
                f"{at}: {_fmt(timeout)} s encodes to raw 0 in {where}: the device would read "
                f"its watchdog as off{hint}"
            )
        elif back <= 0.0 or abs(back - timeout) > step:
            problems.append(
                f"{at}: {_fmt(timeout)} s is held as {_fmt(back)} s by {where}, not within one "
                f"register step ({_fmt(step)} s)"
            )
        if sig.range is not None and not sig.range[0] <= timeout <= sig.range[1]:
            problems.append(
                f"signals.{wd.signal}.range: {_range_text(sig.range)} does not contain "
                f"{at} = {_fmt(timeout)} s"
            )
    return problems


def read_yaml_file(path: str | Path, error: type[ConfigError] = ConfigError) -> tuple[Any, str]:
    """Parsed YAML of ``path`` and the path as text; ``error`` names what went wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(str(p), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(str(p), [f"cannot read: {e}"]) from None
    try:
        return parse_yaml(text, str(p)), str(p)
    except ConfigError as e:
        raise error(e.source, e.problems) from None


def _deep_merge(
    base: dict[str, Any], overlay: dict[str, Any], source: str, at: str, problems: list[str]
) -> dict[str, Any]:
    """``overlay`` over ``base`` key by key; mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        path = f"{at}.{key}" if at else str(key)
        old = base.get(key)
        if isinstance(value, dict):
            if old is None or isinstance(old, dict):
                out[key] = _deep_merge(old or {}, value, source, path, problems)
            else:
                problems.append(f"{source}: {path}: a mapping cannot replace a single value")
        elif isinstance(old, dict):
            problems.append(f"{source}: {path}: a single value cannot replace a mapping")
        else:
            out[key] = value
    return out


def _set_in(data: Any, path: str) -> bool:
    """Whether the key path (``a.b[2].c``) leads into ``data``: the overlay set that key."""
    node = data
    for part in path.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("["):
            return node is not None  # a list the overlay replaced as a whole
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_config(path: str | Path, overlays: Sequence[str | Path] = ()) -> CartConfig:
    """The cart file with each overlay deep-merged over it in order (README: Overlays).

    An error in a key an overlay sets is reported with that overlay's file name.
    """
    data, source = read_yaml_file(path)
    if not overlays:
        return config_from_data(data, source)
    if not isinstance(data, dict):
        raise ConfigError(source, ["the top level must be a mapping of keys"])
    layers: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    for overlay_path in overlays:
        layer, layer_source = read_yaml_file(overlay_path)
        if layer is None:
            continue  # an empty overlay changes nothing
        if not isinstance(layer, dict):
            problems.append(f"{layer_source}: the top level must be a mapping of keys")
            continue
        data = _deep_merge(data, layer, layer_source, "", problems)
        layers.append((layer_source, layer))
    where = " + ".join([source, *(s for s, _ in layers)])
    if problems:
        raise ConfigError(where, problems)
    try:
        return config_from_data(data, where)
    except ConfigError as e:
        named: list[str] = []
        for problem in e.problems:
            key = problem.split(":", 1)[0]
            owner = next((s for s, layer in reversed(layers) if _set_in(layer, key)), source)
            named.append(f"{owner}: {problem}")
        raise ConfigError(where, named) from None
