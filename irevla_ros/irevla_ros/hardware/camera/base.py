"""What every camera backend provides: frames (colour, optional aligned depth) and their calibration.

Backends are plain Python; the camera node turns frames into sensor_msgs/Image and CameraInfo.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from types import TracebackType

import numpy as np

# realsense-ros names for the colour optical frame of the default camera.
DEFAULT_FRAME_ID = "camera_color_optical_frame"

_PROFILE_RE = re.compile(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*[xX,]\s*(\d+)\s*")


class CameraError(RuntimeError):
    """A camera source could not be opened, configured or read; the message names the source."""


class InvalidCameraParameterError(ValueError):
    """A camera parameter (profile string, size, frame rate...) is malformed or out of range."""


@dataclass(frozen=True)
class CameraInfoData:
    """Pinhole calibration of the colour image, in ROS CameraInfo terms (all zeros: uncalibrated)."""

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float
    distortion_model: str = "plumb_bob"
    distortion: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0)
    frame_id: str = DEFAULT_FRAME_ID

    @property
    def calibrated(self) -> bool:
        return self.fx > 0.0 and self.fy > 0.0

    def k(self) -> list[float]:
        """Row-major 3x3 intrinsic matrix."""
        return [self.fx, 0.0, self.cx, 0.0, self.fy, self.cy, 0.0, 0.0, 1.0]

    def p(self) -> list[float]:
        """Row-major 3x4 projection matrix of a monocular camera."""
        return [self.fx, 0.0, self.cx, 0.0, 0.0, self.fy, self.cy, 0.0, 0.0, 0.0, 1.0, 0.0]

    @staticmethod
    def from_vertical_fov(
        width: int, height: int, fovy_deg: float, frame_id: str = DEFAULT_FRAME_ID
    ) -> CameraInfoData:
        """An ideal pinhole with square pixels and a centred principal point (pixel centres at integers)."""
        if not 0.0 < fovy_deg < 180.0:
            raise InvalidCameraParameterError(
                f"vertical field of view must be in (0, 180) degrees, got {fovy_deg}"
            )
        f = (height / 2.0) / np.tan(np.radians(fovy_deg) / 2.0)
        return CameraInfoData(
            width=width,
            height=height,
            fx=float(f),
            fy=float(f),
            cx=(width - 1) / 2.0,
            cy=(height - 1) / 2.0,
            frame_id=frame_id,
        )


@dataclass(eq=False)
class CameraFrame:
    """One colour image, the depth aligned to it (if the backend has depth) and when it was captured."""

    color: np.ndarray  # (H, W, 3) uint8, RGB
    depth: np.ndarray | None  # (H, W) uint16 millimetres, pixel-aligned to `color`; 0 = no measurement
    stamp: float  # seconds on the backend's clock (see each backend)
    frame_number: int

    def __post_init__(self) -> None:
        c = self.color
        if not (isinstance(c, np.ndarray) and c.dtype == np.uint8 and c.ndim == 3 and c.shape[2] == 3):
            desc = f"{c.dtype} array of shape {c.shape}" if isinstance(c, np.ndarray) else type(c).__name__
            raise ValueError(f"CameraFrame.color must be an (H, W, 3) uint8 array, got {desc}")
        d = self.depth
        if d is not None and not (
            isinstance(d, np.ndarray) and d.dtype == np.uint16 and d.shape == c.shape[:2]
        ):
            desc = f"{d.dtype} array of shape {d.shape}" if isinstance(d, np.ndarray) else type(d).__name__
            raise ValueError(f"CameraFrame.depth must be a {c.shape[:2]} uint16 array or None, got {desc}")


class CameraBackend(abc.ABC):
    """A source of frames: `read` waits at most its timeout and never returns the same frame twice."""

    @abc.abstractmethod
    def open(self) -> None:
        """Acquire the device or file; raises CameraError naming the source when that fails."""

    @abc.abstractmethod
    def read(self, timeout: float = 0.0) -> CameraFrame | None:
        """The newest frame not returned before, waiting at most `timeout` seconds; None if there is none."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device or file. Safe to call twice."""

    @property
    @abc.abstractmethod
    def info(self) -> CameraInfoData:
        """Calibration of the colour image as delivered by `read` (valid after `open`)."""

    @property
    def has_depth(self) -> bool:
        return False

    def __enter__(self) -> CameraBackend:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def parse_profile(profile: str) -> tuple[int, int, int]:
    """'640x480x30' -> (640, 480, 30). realsense-ros also accepts commas, so do we."""
    match = _PROFILE_RE.fullmatch(profile) if isinstance(profile, str) else None
    if match is None:
        raise InvalidCameraParameterError(f"profile {profile!r} is not WIDTHxHEIGHTxFPS, e.g. '640x480x30'")
    width, height, fps = (int(g) for g in match.groups())
    if width <= 0 or height <= 0 or fps <= 0:
        raise InvalidCameraParameterError(f"profile {profile!r} must have positive width, height and fps")
    return width, height, fps
