"""Intel RealSense backend on librealsense's pipeline: colour, and depth aligned to colour.

Stamps are librealsense frame timestamps (milliseconds in the device's timestamp domain, converted to
seconds). Depth is delivered in millimetres whatever the device's depth unit (D405 reports 0.1 mm).

A recording (`playback_file`, rosbag2 .db3 or ROS 1 .bag as this librealsense supports) plays with the
streams and resolution it holds; `profile` is still validated but the recording decides the image size.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import cv2
import numpy as np
import pyrealsense2 as rs

from irevla_ros.hardware.camera.base import (
    DEFAULT_FRAME_ID,
    CameraBackend,
    CameraError,
    CameraFrame,
    CameraInfoData,
    InvalidCameraParameterError,
    parse_profile,
)

_MM_PER_METRE = 1000.0

# librealsense distortion models that ROS calls "equidistant"; the Brown-Conrady family is "plumb_bob".
_EQUIDISTANT = ("kannala_brandt4", "ftheta")


def _camera_info(intr: rs.intrinsics, frame_id: str) -> CameraInfoData:
    equidistant = str(intr.model).rsplit(".", 1)[-1] in _EQUIDISTANT
    model, n_coeffs = ("equidistant", 4) if equidistant else ("plumb_bob", 5)
    return CameraInfoData(
        width=intr.width,
        height=intr.height,
        fx=intr.fx,
        fy=intr.fy,
        cx=intr.ppx,
        cy=intr.ppy,
        distortion_model=model,
        distortion=tuple(float(c) for c in intr.coeffs[:n_coeffs]),
        frame_id=frame_id,
    )


def _color_to_rgb(frame: rs.video_frame) -> np.ndarray:
    data = np.asanyarray(frame.get_data())
    fmt = frame.get_profile().format()
    if fmt == rs.format.rgb8:
        return data.copy()
    if fmt == rs.format.bgr8:
        return cv2.cvtColor(data, cv2.COLOR_BGR2RGB)
    if fmt == rs.format.rgba8:
        return cv2.cvtColor(data, cv2.COLOR_RGBA2RGB)
    if fmt == rs.format.bgra8:
        return cv2.cvtColor(data, cv2.COLOR_BGRA2RGB)
    if fmt == rs.format.yuyv:
        return cv2.cvtColor(data.reshape(frame.get_height(), frame.get_width(), 2), cv2.COLOR_YUV2RGB_YUYV)
    raise CameraError(
        f"RealSense colour format {fmt} is not supported (use rgb8, bgr8, rgba8, bgra8 or yuyv)"
    )


class RealSenseCamera(CameraBackend):
    """A RealSense device chosen by `serial` (empty: the first one), or the recording `playback_file`.

    `profile` / `depth_profile` are 'WIDTHxHEIGHTxFPS' (depth defaults to the colour profile).
    `playback_realtime=False` plays a recording as fast as it is read, frame by frame, without dropping any:
    each `read` then returns the next frame rather than the newest.
    `initial_reset` resets the device (`hardware_reset`, as realsense-ros' initial_reset does) before starting it
    and waits up to `reset_timeout` s for it to enumerate again: a camera left in a bad state by a crashed
    process comes back clean. It does nothing for a recording.
    `depth_wanted` (set at any time, e.g. by the camera node from its depth topic's subscriber count) skips the
    alignment and the depth image while nobody consumes them: alignment is the costly part, and the depth
    stream stays on so that wanting it again needs no pipeline restart (which drops frames).
    """

    def __init__(
        self,
        serial: str = "",
        profile: str = "640x480x30",
        enable_depth: bool = True,
        playback_file: str = "",
        depth_profile: str = "",
        playback_repeat: bool = False,
        playback_realtime: bool = True,
        frame_id: str = DEFAULT_FRAME_ID,
        initial_reset: bool = False,
        reset_timeout: float = 10.0,
    ) -> None:
        if not (math.isfinite(reset_timeout) and reset_timeout > 0.0):
            raise InvalidCameraParameterError(f"reset_timeout must be positive, got {reset_timeout}")
        self._serial = str(serial)
        self._initial_reset = bool(initial_reset)
        self._reset_timeout = float(reset_timeout)
        self._color_profile = parse_profile(profile)
        self._depth_profile = parse_profile(depth_profile) if depth_profile else self._color_profile
        self._enable_depth = bool(enable_depth)
        self._playback_file = str(playback_file)
        self._playback_repeat = bool(playback_repeat)
        self._playback_realtime = bool(playback_realtime)
        self._frame_id = frame_id
        self._pipeline: rs.pipeline | None = None
        self._align: rs.align | None = None
        self._depth_to_mm = 1.0
        self._info: CameraInfoData | None = None
        self._playback: rs.playback | None = None
        self.depth_wanted = True

    # ---- public --------------------------------------------------------------------------------------------

    @property
    def has_depth(self) -> bool:
        return self._enable_depth

    @property
    def info(self) -> CameraInfoData:
        if self._info is None:
            width, height, _ = self._color_profile
            return CameraInfoData(width, height, 0.0, 0.0, 0.0, 0.0, frame_id=self._frame_id)
        return self._info

    @property
    def finished(self) -> bool:
        """A recording played without repeat has reached its end."""
        return self._playback is not None and self._playback.current_status() == rs.playback_status.stopped

    def open(self) -> None:
        if self._pipeline is not None:
            return
        config = rs.config()
        source = self._configure(config)
        pipeline = rs.pipeline()
        try:
            active = pipeline.start(config)
        except RuntimeError as exc:
            raise CameraError(f"RealSense {source} could not start: {exc}") from exc
        try:
            self._after_start(active, source)
        except Exception:
            pipeline.stop()
            raise
        self._pipeline = pipeline

    def close(self) -> None:
        if self._pipeline is not None:
            # librealsense may already have stopped it (end of a recording).
            with contextlib.suppress(RuntimeError):
                self._pipeline.stop()
            self._pipeline = None
            self._playback = None

    def read(self, timeout: float = 0.0) -> CameraFrame | None:
        if self._pipeline is None:
            raise CameraError("RealSense camera is not open")
        frames = self._pipeline.poll_for_frames()
        if frames and not self._sequential:
            # Keep the newest frameset: a live consumer wants the current scene, not a backlog.
            while newer := self._pipeline.poll_for_frames():
                frames = newer
        if not frames and timeout > 0.0:
            ok, frames = self._pipeline.try_wait_for_frames(max(1, math.ceil(timeout * 1000.0)))
            if not ok:
                return None
        if not frames:
            return None
        return self._to_frame(frames)

    # ---- internals -----------------------------------------------------------------------------------------

    @property
    def _sequential(self) -> bool:
        return self._playback is not None and not self._playback_realtime

    def _configure(self, config: rs.config) -> str:
        if self._playback_file:
            path = Path(self._playback_file).expanduser()
            if not path.is_file():
                raise CameraError(f"RealSense recording {self._playback_file!r} does not exist")
            config.enable_device_from_file(str(path), repeat_playback=self._playback_repeat)
            # No stream requests: the recording's own streams play (explicit requests must match it exactly).
            return f"recording {self._playback_file!r}"
        serials = self._connected()
        if not serials:
            wanted = f" (wanted serial {self._serial!r})" if self._serial else ""
            raise CameraError(f"no RealSense device is connected{wanted}")
        if self._serial and self._serial not in serials:
            raise CameraError(f"RealSense serial {self._serial!r} is not connected; connected: {serials}")
        serial = self._serial or serials[0]
        if self._initial_reset:
            self._reset(serial)
        config.enable_device(serial)
        width, height, fps = self._color_profile
        config.enable_stream(rs.stream.color, width, height, rs.format.rgb8, fps)
        if self._enable_depth:
            width, height, fps = self._depth_profile
            config.enable_stream(rs.stream.depth, width, height, rs.format.z16, fps)
        return f"device {serial!r}"

    @staticmethod
    def _connected() -> list[str]:
        return [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]

    def _reset(self, serial: str) -> None:
        device = next(
            d for d in rs.context().query_devices() if d.get_info(rs.camera_info.serial_number) == serial
        )
        try:
            device.hardware_reset()
        except RuntimeError as exc:
            raise CameraError(f"RealSense {serial!r}: initial reset failed: {exc}") from exc
        # The device drops off the bus and enumerates again; starting it before that opens the old handle.
        deadline = time.monotonic() + self._reset_timeout
        gone = False
        while time.monotonic() < deadline:
            present = serial in self._connected()
            gone = gone or not present
            if gone and present:
                return
            time.sleep(0.1)
        raise CameraError(
            f"RealSense {serial!r} did not enumerate again within {self._reset_timeout:g} s of its initial reset"
            + ("" if gone else " (it never dropped off the bus)")
        )

    def _after_start(self, active: rs.pipeline_profile, source: str) -> None:
        device = active.get_device()
        if device.is_playback():
            self._playback = device.as_playback()
            self._playback.set_real_time(self._playback_realtime)
        streams = {s.stream_type() for s in active.get_streams()}
        if rs.stream.color not in streams:
            raise CameraError(f"RealSense {source} has no colour stream")
        if self._enable_depth and rs.stream.depth not in streams:
            raise CameraError(
                f"RealSense {source} has no depth stream (set enable_depth false for colour only)"
            )
        color = active.get_stream(rs.stream.color).as_video_stream_profile()
        self._info = _camera_info(color.get_intrinsics(), self._frame_id)
        if self._enable_depth:
            self._align = rs.align(rs.stream.color)
            self._depth_to_mm = self._depth_scale(device) * _MM_PER_METRE

    @staticmethod
    def _depth_scale(device: rs.device) -> float:
        try:
            return float(device.first_depth_sensor().get_depth_scale())
        except RuntimeError:
            return 1.0 / _MM_PER_METRE  # librealsense's default unit when a recording lacks the option

    def _to_frame(self, frames: rs.composite_frame) -> CameraFrame | None:
        with_depth = self._enable_depth and self.depth_wanted
        if self._align is not None and with_depth:
            frames = self._align.process(frames)
        color = frames.get_color_frame()
        if not color:
            return None
        depth_image = None
        if with_depth:
            depth = frames.get_depth_frame()
            if depth:
                raw = np.asanyarray(depth.get_data())
                if abs(self._depth_to_mm - 1.0) < 1e-9:
                    depth_image = raw.copy()
                else:
                    depth_image = np.clip(np.rint(raw * self._depth_to_mm), 0, 65535).astype(np.uint16)
        return CameraFrame(
            color=_color_to_rgb(color),
            depth=depth_image,
            stamp=color.get_timestamp() / 1000.0,
            frame_number=int(color.get_frame_number()),
        )
