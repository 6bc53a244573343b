"""Parameter schemas and parameter-file validation, without rclpy.

Every node declares its ROS parameters from a `ParamSpec` tuple, and `irevla bringup` validates the
`config/*.yaml` files (ROS parameter format) against the same specs before anything starts, so a typo or an
out-of-range value fails with the file and the key named instead of a node silently using its default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ParamValue = bool | int | float | str | list[bool] | list[int] | list[float] | list[str]


class ConfigError(ValueError):
    """A parameter file or value is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: ParamValue
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def type_name(self) -> str:
        return _type_name(self.default)

    def check(self, value: Any, where: str) -> ParamValue:
        """Return `value` converted to this parameter's type, or raise ConfigError naming `where`."""
        expected = self.type_name
        if expected == "double" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if expected == "double[]" and isinstance(value, list):
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        actual = _type_name(value) if value != [] else expected
        if actual != expected:
            raise ConfigError(f"{where}: expected {expected}, got {actual} ({value!r})")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{where}: {item!r} is not a finite number")
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if self.min is not None and item < self.min:
                    raise ConfigError(f"{where}: {item!r} is below the minimum {self.min}")
                if self.max is not None and item > self.max:
                    raise ConfigError(f"{where}: {item!r} is above the maximum {self.max}")
            if self.choices is not None and item not in self.choices:
                raise ConfigError(f"{where}: {item!r} is not one of {', '.join(self.choices)}")
        return value


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        inner = {_type_name(v) for v in value}
        if inner == {"integer", "double"}:
            inner = {"double"}
        if len(inner) == 1:
            return next(iter(inner)) + "[]"
        return "mixed[]" if inner else "empty[]"
    return type(value).__name__


# ROS parameters every node accepts without declaring them.
BUILTIN_PARAMETERS = frozenset({"use_sim_time", "start_type_description_service"})


def load_parameter_file(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a ROS 2 parameter file into {node key: {dotted parameter name: value}}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{at}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of node names to 'ros__parameters'")
    result: dict[str, dict[str, Any]] = {}
    for node_key, body in data.items():
        if not isinstance(body, dict) or set(body) != {"ros__parameters"}:
            raise ConfigError(f"{path}: {node_key}: expected exactly one key 'ros__parameters'")
        params = body["ros__parameters"]
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: {node_key}.ros__parameters: expected a mapping")
        result[str(node_key)] = dict(_flatten(params))
    return result


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def node_key_matches(node_key: str, fully_qualified_name: str) -> bool:
    """Does a parameter-file node key ('/ns/name', 'name', '/**', '/**/name') select this node?"""
    key = node_key if node_key.startswith("/") else "/" + node_key
    if key in ("/**", "/*"):
        return True
    if key.startswith("/**/"):
        return fully_qualified_name.endswith("/" + key[len("/**/") :])
    return key == fully_qualified_name


def validate_parameters(
    file: Path, node_key: str, values: Mapping[str, Any], specs: Iterable[ParamSpec]
) -> dict[str, ParamValue]:
    by_name = {spec.name: spec for spec in specs}
    checked: dict[str, ParamValue] = {}
    for name, value in values.items():
        where = f"{file}: {node_key}.ros__parameters.{name}"
        if name in BUILTIN_PARAMETERS:
            checked[name] = value
            continue
        spec = by_name.get(name)
        if spec is None:
            known = ", ".join(sorted(by_name)) or "(none)"
            raise ConfigError(f"{where}: unknown parameter (known: {known})")
        checked[name] = spec.check(value, where)
    return checked


def defaults(specs: Iterable[ParamSpec]) -> dict[str, ParamValue]:
    return {spec.name: spec.default for spec in specs}
