"""Camera backend `sim`: a camera of a MetaWorldCell; stamps are simulation time, calibration is the MuJoCo
camera's.

Rendering and reading happen on different threads. `render()` draws the camera and must run where the cell's
OpenGL context lives: in `sim_cell_node`, the cell's own thread, after every control period, while it holds the
cell's lock (one consistent world state for all cameras, the arm state and the success signal of that period).
`offer()` then hands the frame over and calls `on_frame`, which the camera node sets to publish it at once,
before /clock moves on: the policy's tick at time t sees the frame of time t. `read()` (the camera node, any
thread) returns the newest frame offered and not returned before. `capture()` is render + offer, for a caller
that owns the cell alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from irevla_ros.hardware.camera.base import CameraBackend, CameraError, CameraFrame, CameraInfoData
from irevla_ros.sim.cell import MetaWorldCell


class SimCamera(CameraBackend):
    """Renders `camera` of `cell` (the cell's own camera names; the constructor refuses any other)."""

    def __init__(self, cell: MetaWorldCell, camera: str = "corner", frame_id: str = "") -> None:
        self._cell = cell
        self._camera = camera
        fovy = cell.camera_fovy(camera)  # validates the camera name now rather than at the first frame
        self._info = CameraInfoData.from_vertical_fov(
            cell.width, cell.height, fovy, frame_id or f"sim_{camera}_optical_frame"
        )
        self._lock = threading.Lock()
        self._frame: CameraFrame | None = None
        self._returned: int | None = None
        self._frame_number = 0
        self._opened = False
        # Called after each offer (set by the camera node: a push source is published on arrival).
        self.on_frame: Callable[[], None] | None = None

    @property
    def camera(self) -> str:
        return self._camera

    @property
    def info(self) -> CameraInfoData:
        return self._info

    def open(self) -> None:
        self._opened = True
        self._returned = None

    def close(self) -> None:
        self._opened = False

    def render(self, stamp: float | None = None) -> CameraFrame:
        """Draw the camera now (on the cell's rendering thread); `stamp` defaults to the cell's simulation time."""
        with self._cell.lock:
            image = self._cell.render(self._camera)
            when = self._cell.sim_time if stamp is None else stamp
        frame = CameraFrame(color=image, depth=None, stamp=when, frame_number=self._frame_number)
        self._frame_number += 1
        return frame

    def offer(self, frame: CameraFrame) -> None:
        """Make `frame` the newest one and tell the reader (outside the cell's lock: publishing may block)."""
        with self._lock:
            self._frame = frame
        if self.on_frame is not None:
            self.on_frame()

    def capture(self, stamp: float | None = None) -> CameraFrame:
        frame = self.render(stamp)
        self.offer(frame)
        return frame

    def read(self, timeout: float = 0.0) -> CameraFrame | None:
        if not self._opened:
            raise CameraError(f"sim camera {self._camera!r} is not open")
        with self._lock:
            frame = self._frame
            if frame is None or frame.frame_number == self._returned:
                return None
            self._returned = frame.frame_number
            return frame
