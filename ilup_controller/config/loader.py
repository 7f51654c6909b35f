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


def load_config(path: str | Path) -> CartConfig:
    data, source = read_yaml_file(path)
    return config_from_data(data, source)
