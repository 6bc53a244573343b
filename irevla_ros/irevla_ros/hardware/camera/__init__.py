"""Camera backends behind one interface, chosen by name.

Backends are imported only when asked for, so a machine without pyrealsense2 (or without MuJoCo) can still
use the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from irevla_ros.hardware.camera.base import (
    CameraBackend,
    CameraError,
    CameraFrame,
    CameraInfoData,
    InvalidCameraParameterError,
    parse_profile,
)

CAMERA_KINDS: dict[str, str] = {
    "sim": "irevla_ros.hardware.camera.sim:SimCamera",
    "opencv": "irevla_ros.hardware.camera.opencv_camera:OpenCVCamera",
    "realsense": "irevla_ros.hardware.camera.realsense_camera:RealSenseCamera",
}


class UnknownCameraKindError(ValueError):
    """`make_camera` was asked for a backend it does not know."""


def make_camera(kind: str, **params: Any) -> CameraBackend:
    """Construct (not open) the camera backend `kind` with its keyword parameters."""
    if kind not in CAMERA_KINDS:
        raise UnknownCameraKindError(f"unknown camera kind {kind!r}; known kinds: {sorted(CAMERA_KINDS)}")
    module_name, class_name = CAMERA_KINDS[kind].split(":")
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    return backend_cls(**params)


__all__ = [
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
