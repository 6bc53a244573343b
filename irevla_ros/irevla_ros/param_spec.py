"""Parameter schemas and parameter-file validation, without rclpy.

Every node declares its ROS parameters from a `ParamSpec` tuple, and `irevla bringup` validates the
`config/*.yaml` files (ROS parameter format) against the same specs before anything starts, so a typo or an
out-of-range value fails with the file and the key named instead of a node silently using its default.

Settings that a config dataclass holds (safety limits, Stage 1 / Stage 2 / iteration settings) are declared once,
in the dataclass, CleanRL style: each field made with `setting(default, doc, min=, max=, choices=)` (or
`group(...)` for a nested config, `internal(...)` for a field that is no parameter). `parameter_specs(cls)`
derives the ParamSpecs from the fields (a nested config's fields are named `<field>.<name>`, e.g.
`stage1.ppo.lr`) and `from_parameters(cls, values)` builds the dataclass from parameter values, so a default, a
description or a range is written in one place.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

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


# ---- config dataclasses as the source of parameters ------------------------------------------------------------


def setting(
    default: Any,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config dataclass field that is also a node parameter: its default, description and range."""
    meta = {"doc": doc, "min": min, "max": max, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def required(doc: str, parameter_default: Any, **bounds: Any) -> Any:
    """A config field the dataclass requires to be given (no default there), whose node parameter still has a
    default: `parameter_default`, what a node without a parameter file gets."""
    return field(metadata={"doc": doc, "min": None, "max": None, "choices": None, **bounds,
                           "parameter_default": parameter_default})  # fmt: skip


def group(factory: Any, doc: str) -> Any:
    """A nested config dataclass field: its fields are parameters named `<this field>.<their name>`."""
    return field(default_factory=factory, metadata={"doc": doc, "group": True})


def internal(default: Any, doc: str) -> Any:
    """A config field that is no node parameter (no ROS type for it, e.g. None meaning "derive it")."""
    return field(default=default, metadata={"doc": doc, "parameter": False})


def _field_default(f: Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.metadata["parameter_default"]


def parameter_specs(cls: type, prefix: str = "") -> tuple[ParamSpec, ...]:
    """The ParamSpecs of a config dataclass's fields (every field must say what it is: setting/group/internal)."""
    specs: list[ParamSpec] = []
    for f in fields(cls):
        meta = f.metadata
        if "doc" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting(), group() or internal()")
        if meta.get("parameter") is False:
            continue
        default = _field_default(f)
        if meta.get("group"):
            specs.extend(parameter_specs(type(default), f"{prefix}{f.name}."))
            continue
        value = list(default) if isinstance(default, tuple) else default
        specs.append(
            ParamSpec(prefix + f.name, value, meta["doc"], meta["min"], meta["max"], meta["choices"])
        )
    return tuple(specs)


def from_parameters(cls: type[T], values: Mapping[str, Any], prefix: str = "") -> T:
    """Build config dataclass `cls` from parameter values named as `parameter_specs` names them; fields without a
    value keep their defaults, and names that are not fields of `cls` are ignored (a node's other parameters)."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.metadata.get("parameter") is False:
            continue
        name = prefix + f.name
        default = _field_default(f)
        if f.metadata.get("group"):
            kwargs[f.name] = from_parameters(type(default), values, name + ".")
        elif name in values:
            value = values[name]
            kwargs[f.name] = tuple(value) if isinstance(default, tuple) else value
    return cls(**kwargs)
