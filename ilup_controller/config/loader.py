"""Load a cart configuration from YAML and turn every problem into a message with its key path."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from ilup_controller.config.models import CartConfig


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


def format_validation_error(
    err: ValidationError, *, union_tags: Sequence[str] = (), what: str = "kind"
) -> list[str]:
    """One line per error, each prefixed with its key path. ``union_tags`` are the values of
    a discriminated union's ``kind`` field, for errors that name a missing or unknown one."""
    problems: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        kind = e["type"]
        msg = str(e["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = "unknown key"
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
        return CartConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, format_validation_error(e)) from None


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
