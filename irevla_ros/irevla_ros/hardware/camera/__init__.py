"""Camera backends behind one interface, chosen by name.

Backends are imported only when asked for, so a machine without pyrealsense2 (or without MuJoCo) can still
use the others.
"""

from __future__ import annotations

from typing import Any

from irevla_ros.hardware.camera.base import (
    CameraBackend,
    CameraError,
    CameraFrame,
    CameraInfoData,
    InvalidCameraParameterError,
    parse_profile,
)
from irevla_ros.registry import Registry


class UnknownCameraKindError(ValueError):
    """`make_camera` was asked for a backend it does not know."""


# kind -> the backend class, constructed (not opened) with the kind's keyword parameters. "sim" renders a camera
# of a simulated cell (SimCamera(cell, camera)): sim_cell_node builds it, since it owns the cell.
CAMERAS: Registry[CameraBackend] = Registry(
    "camera kind",
    {
        "sim": "irevla_ros.hardware.camera.sim:SimCamera",
        "opencv": "irevla_ros.hardware.camera.opencv_camera:OpenCVCamera",
        "realsense": "irevla_ros.hardware.camera.realsense_camera:RealSenseCamera",
    },
    UnknownCameraKindError,
)
CAMERA_KINDS: tuple[str, ...] = CAMERAS.names


def make_camera(kind: str, **params: Any) -> CameraBackend:
    """Construct (not open) the camera backend `kind` with its keyword parameters."""
    return CAMERAS.make(kind, **params)


__all__ = [
    "CAMERAS",
    "CAMERA_KINDS",
    "CameraBackend",
    "CameraError",
    "CameraFrame",
    "CameraInfoData",
    "InvalidCameraParameterError",
    "UnknownCameraKindError",
    "make_camera",
    "parse_profile",
]
