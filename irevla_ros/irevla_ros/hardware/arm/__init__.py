"""Arm backends behind one interface; `make_arm` builds one by name (registry `ARMS`) and imports its client library
lazily."""

from __future__ import annotations

from typing import Any

from irevla_ros.hardware.arm.base import ArmBackend, ArmConnectionError, ArmError, ArmMotionAborted, ArmState
from irevla_ros.registry import Registry


class UnknownArmError(ValueError):
    """The requested arm kind is not one of KNOWN_KINDS."""


# kind -> the backend class, constructed with the kind's keyword parameters (not connected). Modules are imported
# only when their kind is asked for, so that a machine without franky or ur_rtde can still run the simulator.
ARMS: Registry[ArmBackend] = Registry(
    "arm kind",
    {
        "sim": "irevla_ros.hardware.arm.sim:SimArm",
        "franky": "irevla_ros.hardware.arm.franky_arm:FrankyArm",
        "ur_rtde": "irevla_ros.hardware.arm.ur_rtde_arm:UrRtdeArm",
        # An arm run by its own ROS 2 driver + MoveIt Servo; takes the node's ROS transport (`needs_transport`).
        "servo": "irevla_ros.hardware.arm.servo_arm:ServoArm",
    },
    UnknownArmError,
)
KNOWN_KINDS: tuple[str, ...] = ARMS.names


def make_arm(kind: str, **params: Any) -> ArmBackend:
    """An unconnected backend of `kind` with that backend class's keyword parameters (SimArm, FrankyArm,
    UrRtdeArm, ServoArm: the last also takes the node's `transport`)."""
    return ARMS.make(kind, **params)


__all__ = [
    "ARMS",
    "KNOWN_KINDS",
    "ArmBackend",
    "ArmConnectionError",
    "ArmError",
    "ArmMotionAborted",
    "ArmState",
    "UnknownArmError",
    "make_arm",
]
