"""Arm backends behind one interface; `make_arm` builds one by name and imports its client library lazily."""

from __future__ import annotations

import importlib
from typing import Any

from irevla_ros.hardware.arm.base import ArmBackend, ArmConnectionError, ArmError, ArmState

# kind -> (module, class). Modules are imported only when their kind is asked for, so that a machine without
# franky (or, later, ur_rtde) can still run the simulator.
_BACKENDS: dict[str, tuple[str, str]] = {
    "sim": ("irevla_ros.hardware.arm.sim", "SimArm"),
    "franky": ("irevla_ros.hardware.arm.franky_arm", "FrankyArm"),
}

KNOWN_KINDS: tuple[str, ...] = tuple(_BACKENDS)


class UnknownArmError(ValueError):
    """The requested arm kind is not one of KNOWN_KINDS."""


def make_arm(kind: str, **params: Any) -> ArmBackend:
    """An unconnected backend of `kind` ("sim": params of SimArm, "franky": params of FrankyArm)."""
    if kind not in _BACKENDS:
        raise UnknownArmError(f"unknown arm kind {kind!r}; known kinds: {list(KNOWN_KINDS)}")
    module_name, class_name = _BACKENDS[kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**params)


__all__ = [
    "KNOWN_KINDS",
    "ArmBackend",
    "ArmConnectionError",
    "ArmError",
    "ArmState",
    "UnknownArmError",
    "make_arm",
]
