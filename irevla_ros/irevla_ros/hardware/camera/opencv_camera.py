"""OpenCV camera backend: V4L2 devices (index or /dev/videoN) and video files.

Devices are read by a background thread so `read` returns the newest frame without waiting for the next
exposure; stamps are `time.time()` when the frame was grabbed.

Files are deterministic by default: each `read` returns the next frame of the file (nothing is skipped), with
stamp = frames returned so far / the file's fps (media time, continuing across loops). With
`realtime=True` a file behaves like a live camera instead: frames become due at the file's fps counted from
`open`, `read` returns the newest due frame and skips the ones that were not read in time.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from irevla_ros.hardware.camera.base import (
    DEFAULT_FRAME_ID,
    CameraBackend,
    CameraError,
    CameraFrame,
    CameraInfoData,
    InvalidCameraParameterError,
)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class OpenCVCamera(CameraBackend):
    """A V4L2 device or a video file through cv2.VideoCapture.

    `width`/`height` are the delivered size (frames of another size are resized; 0 keeps the source size).
    `fps` is requested from devices, and is the pace of files that do not report one. `loop` restarts a file
    at its end. `hfov_deg` > 0 gives an ideal-pinhole calibration; otherwise `info` is all zeros, which ROS
    reads as uncalibrated.
    """

    def __init__(
        self,
        source: str | int,
        width: int = 640,
        height: int = 480,
        fps: float = 30.0,
        loop: bool = False,
        realtime: bool = False,
        hfov_deg: float = 0.0,
        frame_id: str = DEFAULT_FRAME_ID,
    ) -> None:
        if width < 0 or height < 0 or (width == 0) != (height == 0):
            raise InvalidCameraParameterError(
                f"width and height must both be positive (or both 0: source size), got {width}x{height}"
            )
        if not (math.isfinite(fps) and fps > 0):
            raise InvalidCameraParameterError(f"fps must be positive, got {fps}")
        if not (math.isfinite(hfov_deg) and 0.0 <= hfov_deg < 180.0):
            raise InvalidCameraParameterError(f"hfov_deg must be in [0, 180), got {hfov_deg}")
        self._source = source
        self._device = self._device_of(source)
        self._width, self._height = int(width), int(height)
        self._fps = float(fps)
        self._loop = loop
        self._realtime = realtime
        self._hfov_deg = hfov_deg
        self._frame_id = frame_id
        self._cap: cv2.VideoCapture | None = None
        self._out_size: tuple[int, int] = (self._width, self._height)
        # file state
        self._file_fps = self._fps
        self._position = 0  # index of the next frame the capture will decode, counted across loops
        self._pass_frames = 0
        self._finished = False
        self._t_open = 0.0
        # device state
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._latest: CameraFrame | None = None
        self._last_returned = -1
        self._error: str | None = None

    # ---- public --------------------------------------------------------------------------------------------

    @property
    def is_device(self) -> bool:
        return self._device is not None

    @property
    def finished(self) -> bool:
        """A file without `loop` has delivered its last frame."""
        return self._finished

    @property
    def info(self) -> CameraInfoData:
        width, height = self._out_size
        if self._hfov_deg <= 0.0 or width == 0:
            return CameraInfoData(width, height, 0.0, 0.0, 0.0, 0.0, frame_id=self._frame_id)
        f = (width / 2.0) / math.tan(math.radians(self._hfov_deg) / 2.0)
        return CameraInfoData(
            width, height, f, f, (width - 1) / 2.0, (height - 1) / 2.0, frame_id=self._frame_id
        )

    def open(self) -> None:
        if self._cap is not None:
            return
        self._cap = self._open_capture()
        if self._device is not None:
            self._configure_device(self._cap)
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._grab_loop, name=f"opencv-camera-{self._source}", daemon=True
            )
            self._thread.start()
        else:
            reported = self._cap.get(cv2.CAP_PROP_FPS)
            self._file_fps = float(reported) if math.isfinite(reported) and reported > 0 else self._fps
            native = (
                int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            )
            self._out_size = (self._width, self._height) if self._width else native
            self._position = self._pass_frames = 0
            self._finished = False
            self._t_open = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def read(self, timeout: float = 0.0) -> CameraFrame | None:
        if self._cap is None:
            raise CameraError(f"camera {self._source!r} is not open")
        if self._device is not None:
            return self._read_device(timeout)
        if self._realtime:
            return self._read_file_realtime(timeout)
        return self._read_file_next()

    # ---- opening -------------------------------------------------------------------------------------------

    @staticmethod
    def _device_of(source: str | int) -> int | str | None:
        if isinstance(source, bool) or not isinstance(source, (str, int)):
            raise InvalidCameraParameterError(
                f"source must be a device index, /dev/videoN or a file path, got {source!r}"
            )
        if isinstance(source, int):
            return source
        if source.strip().isdigit():
            return int(source)
        if source.startswith("/dev/"):
            return source
        return None

    def _open_capture(self) -> cv2.VideoCapture:
        if self._device is None:
            path = Path(os.path.expanduser(str(self._source)))
            if not path.is_file():
                raise CameraError(f"video file {str(self._source)!r} does not exist")
            cap = cv2.VideoCapture(str(path))
        else:
            cap = cv2.VideoCapture(self._device, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            kind = "video file" if self._device is None else "video device"
            raise CameraError(f"OpenCV could not open {kind} {self._source!r}")
        return cap

    def _configure_device(self, cap: cv2.VideoCapture) -> None:
        if self._width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, self._width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self._height)
        cap.set(cv2.CAP_PROP_FPS, self._fps)
        # A one-frame driver queue keeps the newest exposure at the head instead of a stale backlog.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        native = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        self._out_size = (self._width, self._height) if self._width else native

    def _convert(self, image: np.ndarray) -> np.ndarray:
        rgb = _to_rgb(image)
        width, height = self._out_size
        if width and (rgb.shape[1], rgb.shape[0]) != (width, height):
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(rgb)

    # ---- devices -------------------------------------------------------------------------------------------

    def _grab_loop(self) -> None:
        cap = self._cap
        assert cap is not None
        number = 0
        while not self._stop.is_set():
            ok, image = cap.read()
            stamp = time.time()
            if not ok:
                with self._cond:
                    self._error = f"video device {self._source!r} stopped delivering frames"
                    self._cond.notify_all()
                return
            frame = CameraFrame(color=self._convert(image), depth=None, stamp=stamp, frame_number=number)
            number += 1
            with self._cond:
                self._latest = frame
                self._cond.notify_all()

    def _read_device(self, timeout: float) -> CameraFrame | None:
        def fresh() -> bool:
            return self._error is not None or (
                self._latest is not None and self._latest.frame_number > self._last_returned
            )

        with self._cond:
            self._cond.wait_for(fresh, timeout=max(0.0, timeout))
            if self._error is not None:
                raise CameraError(self._error)
            if self._latest is None or self._latest.frame_number <= self._last_returned:
                return None
            self._last_returned = self._latest.frame_number
            return self._latest

    # ---- files ---------------------------------------------------------------------------------------------

    def _restart_file(self) -> None:
        if self._pass_frames == 0:
            raise CameraError(f"video file {self._source!r} has no decodable frames")
        assert self._cap is not None
        self._cap.release()
        # Reopening is more reliable than seeking to frame 0 across containers and codecs.
        self._cap = self._open_capture()
        self._pass_frames = 0

    def _decode(self, retrieve: bool) -> np.ndarray | None:
        """Advance the file by one frame (looping if configured); the image only when `retrieve`."""
        assert self._cap is not None
        for _attempt in range(2):
            if retrieve:
                ok, image = self._cap.read()
            else:
                ok, image = self._cap.grab(), None
            if ok:
                self._position += 1
                self._pass_frames += 1
                return image if retrieve else np.empty(0)
            if not self._loop:
                self._finished = True
                return None
            self._restart_file()
        return None

    def _read_file_next(self) -> CameraFrame | None:
        if self._finished:
            return None
        image = self._decode(retrieve=True)
        if image is None:
            return None
        return self._file_frame(image, self._position - 1)

    def _read_file_realtime(self, timeout: float) -> CameraFrame | None:
        if self._finished:
            return None
        due = int((time.monotonic() - self._t_open) * self._file_fps)
        if due < self._position:
            wait = (self._position / self._file_fps) - (time.monotonic() - self._t_open)
            if wait > timeout:
                return None
            time.sleep(max(0.0, wait))
            due = self._position
        while self._position < due:
            if self._decode(retrieve=False) is None:
                return None
        image = self._decode(retrieve=True)
        if image is None:
            return None
        return self._file_frame(image, self._position - 1)

    def _file_frame(self, image: np.ndarray, index: int) -> CameraFrame:
        return CameraFrame(
            color=self._convert(image), depth=None, stamp=index / self._file_fps, frame_number=index
        )
