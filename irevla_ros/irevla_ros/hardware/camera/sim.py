"""A camera rendering a MetaWorldCell: stamps are simulation time, calibration is the MuJoCo camera's."""

from __future__ import annotations

import time

from irevla_ros.hardware.camera.base import CameraBackend, CameraError, CameraFrame, CameraInfoData
from irevla_ros.sim.cell import MetaWorldCell

# How often a waiting read looks at the simulation clock; the cell steps at 80 Hz.
_POLL_S = 0.002


class SimCamera(CameraBackend):
    """Renders `camera` of a shared cell.

    `stamp` is `cell.sim_time`. With `skip_unchanged` (default) `read` returns None while simulation time has
    not advanced since the last frame, so a paused simulation yields no duplicate stamps; the first read after
    `open` always yields a frame.
    """

    def __init__(
        self, cell: MetaWorldCell, camera: str = "corner", frame_id: str = "", skip_unchanged: bool = True
    ) -> None:
        self._cell = cell
        self._camera = camera
        fovy = cell.camera_fovy(camera)  # validates the camera name now rather than at the first frame
        self._info = CameraInfoData.from_vertical_fov(
            cell.width, cell.height, fovy, frame_id or f"sim_{camera}_optical_frame"
        )
        self._skip_unchanged = skip_unchanged
        self._opened = False
        self._last_stamp: float | None = None
        self._frame_number = 0

    @property
    def info(self) -> CameraInfoData:
        return self._info

    def open(self) -> None:
        self._opened = True
        self._last_stamp = None

    def close(self) -> None:
        self._opened = False

    def read(self, timeout: float = 0.0) -> CameraFrame | None:
        if not self._opened:
            raise CameraError(f"sim camera {self._camera!r} is not open")
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._cell.lock:
                stamp = self._cell.sim_time
                if not (self._skip_unchanged and stamp == self._last_stamp):
                    image = self._cell.render(self._camera)
                    break
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)
        self._last_stamp = stamp
        frame = CameraFrame(color=image, depth=None, stamp=stamp, frame_number=self._frame_number)
        self._frame_number += 1
        return frame
