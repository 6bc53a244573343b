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
import functools
import math
import numbers
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
    # `min` itself is refused (lr > 0). ROS ranges are inclusive: a node's descriptor carries `min`, and `check`
    # (run on every declared value) refuses the bound.
    min_exclusive: bool = False
    # Settable at run time (`ros2 param set`): the node applies a change between two ticks through the callback
    # it hands to `declare_parameters`. Every other parameter is read-only (read once, at start).
    runtime: bool = False

    @property
    def type_name(self) -> str:
        return _type_name(self.default)

    def check(self, value: Any, where: str) -> ParamValue:
        """Return `value` converted to this parameter's type, or raise ConfigError naming `where`."""
        converted, problem = self.convert(value)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        return converted

    def convert(self, value: Any) -> tuple[Any, str | None]:
        """`value` converted to this parameter's type (an int given for a double becomes a float, a numpy scalar
        the Python number), and what is wrong with it: None, or a phrase that names the value and the bound."""
        expected = self.type_name
        if isinstance(value, list):
            value = [_as_type(v, expected.removesuffix("[]")) for v in value]
        else:
            value = _as_type(value, expected)
        actual = expected if isinstance(value, list) and not value else _type_name(value)
        if actual != expected:
            return value, f"expected {expected}, got {actual} ({value!r})"
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                return value, f"{item!r} is not a finite number"
            if isinstance(item, (int, float)) and not isinstance(item, bool):
                if self.min is not None and self.min_exclusive and item <= self.min:
                    return value, f"{item!r} is not above the exclusive minimum {self.min}"
                if self.min is not None and item < self.min:
                    return value, f"{item!r} is below the minimum {self.min}"
                if self.max is not None and item > self.max:
                    return value, f"{item!r} is above the maximum {self.max}"
            if self.choices is not None and item not in self.choices:
                return value, f"{item!r} is not one of {', '.join(self.choices)}"
        return value, None


def _as_type(value: Any, expected: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    if expected == "double":
        return float(value)
    if expected == "integer" and isinstance(value, numbers.Integral):
        return int(value)
    return value


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "integer"
    if isinstance(value, numbers.Real):
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
        if isinstance(value, list) and not value:
            # rcl's parameter-file reader cannot type an empty sequence: the node gets no value and keeps the default.
            raise ConfigError(
                f"{where}: an empty list, which ROS reads from a parameter file as no value at all (the node "
                f"would keep its default {spec.default!r})"
            )
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
    min_exclusive: bool = False,
    choices: tuple[str, ...] | None = None,
    runtime: bool = False,
) -> Any:
    """A config dataclass field that is also a node parameter: its default, description and range (`min_exclusive`:
    the value must lie above `min`, e.g. a learning rate). The dataclass's `__post_init__` enforces them with
    `check_settings`, a parameter file with `ParamSpec.check`: one declaration, both checks. `runtime`: the
    parameter may be changed while the node runs (see `ParamSpec.runtime`)."""
    meta = {"doc": doc, "min": min, "max": max, "min_exclusive": min_exclusive, "choices": choices,
            "runtime": runtime}  # fmt: skip
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def required(doc: str, parameter_default: Any, **bounds: Any) -> Any:
    """A config field the dataclass requires to be given (no default there), whose node parameter still has a
    default: `parameter_default`, what a node without a parameter file gets."""
    return field(metadata={"doc": doc, "min": None, "max": None, "min_exclusive": False, "choices": None,
                           "runtime": False, **bounds, "parameter_default": parameter_default})  # fmt: skip


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


def _spec(f: Field[Any], name: str) -> ParamSpec:
    default = _field_default(f)
    meta = f.metadata
    value = list(default) if isinstance(default, tuple) else default
    return ParamSpec(
        name,
        value,
        meta["doc"],
        meta["min"],
        meta["max"],
        meta["choices"],
        meta["min_exclusive"],
        meta["runtime"],
    )


def parameter_specs(cls: type, prefix: str = "") -> tuple[ParamSpec, ...]:
    """The ParamSpecs of a config dataclass's fields (every field must say what it is: setting/group/internal)."""
    specs: list[ParamSpec] = []
    for f in fields(cls):
        meta = f.metadata
        if "doc" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with setting(), group() or internal()")
        if meta.get("parameter") is False:
            continue
        if meta.get("group"):
            specs.extend(parameter_specs(type(_field_default(f)), f"{prefix}{f.name}."))
            continue
        specs.append(_spec(f, prefix + f.name))
    return tuple(specs)


@functools.cache
def _declared(cls: type) -> tuple[tuple[str, ParamSpec | type, bool], ...]:
    """Per checked field of `cls`: its name, its ParamSpec (a group: its config class), whether it is a tuple."""
    out: list[tuple[str, ParamSpec | type, bool]] = []
    for f in fields(cls):
        if "doc" not in f.metadata or f.metadata.get("parameter") is False:
            continue
        if f.metadata.get("group"):
            out.append((f.name, type(_field_default(f)), False))
        else:
            out.append((f.name, _spec(f, f.name), isinstance(_field_default(f), tuple)))
    return tuple(out)


def check_settings(config: Any, error: type[Exception], label: str) -> None:
    """Check every setting of config dataclass instance `config` against its field's declaration: type (a bool is
    no int; an int is accepted for a float), finite, min/max, choices, each item of a tuple; a group must hold its
    config class. Each value is stored converted to its declared type (int -> float, list -> tuple); the first
    bad one raises `error`, e.g. "PPO lr 0.0 is not above the exclusive minimum 0.0 (PPOConfig.lr)".

    Each config's `__post_init__` calls this, so a single-field range is written once, in the field, and a
    parameter file (`ParamSpec.check`) and the dataclass cannot disagree about it; `__post_init__` keeps only
    what relates fields to each other."""
    cls = type(config)
    for name, spec, is_tuple in _declared(cls):
        value = getattr(config, name)
        where = f"({cls.__name__}.{name})"
        if isinstance(spec, type):
            if not isinstance(value, spec):
                raise error(f"{label} {name}: expected {spec.__name__}, got {type(value).__name__} {where}")
            continue
        converted, problem = spec.convert(list(value) if isinstance(value, tuple) else value)
        if problem is not None:
            raise error(f"{label} {name} {problem} {where}")
        # object.__setattr__: frozen config dataclasses (SafetyLimits) are built here too.
        object.__setattr__(config, name, tuple(converted) if is_tuple else converted)


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
