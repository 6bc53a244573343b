"""Camera backends against real sources: a video file written here, a MuJoCo cell, and librealsense's own
software device recorded to rosbag2 and played back through its pipeline."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
import pytest

from irevla_ros.hardware.camera import (
    CAMERA_KINDS,
    CameraError,
    CameraFrame,
    InvalidCameraParameterError,
    UnknownCameraKindError,
    make_camera,
    parse_profile,
)
from irevla_ros.hardware.camera.opencv_camera import OpenCVCamera

VIDEO_FRAMES, VIDEO_FPS, VIDEO_W, VIDEO_H = 20, 20.0, 64, 48
# MJPG is lossy: flat colours come back within a few levels.
CODEC_TOLERANCE = 12.0


def video_colour(i: int) -> np.ndarray:
    """RGB colour of frame i of the test video."""
    return np.array([12 * i, 255 - 12 * i, 40 + 5 * i], dtype=np.float64)


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "colours.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, (VIDEO_W, VIDEO_H))
    assert writer.isOpened()
    for i in range(VIDEO_FRAMES):
        rgb = np.empty((VIDEO_H, VIDEO_W, 3), np.uint8)
        rgb[:] = video_colour(i).astype(np.uint8)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def assert_video_frame(frame: CameraFrame, index: int, size: tuple[int, int] = (VIDEO_W, VIDEO_H)) -> None:
    assert frame.frame_number == index
    assert frame.color.shape == (size[1], size[0], 3) and frame.color.dtype == np.uint8
    assert frame.depth is None
    mean = frame.color.reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(mean - video_colour(index)) < CODEC_TOLERANCE), (index, mean)


# ---- registry and profiles -------------------------------------------------------------------------------


def test_registry_names_known_kinds():
    assert set(CAMERA_KINDS) == {"sim", "opencv", "realsense"}
    with pytest.raises(
        UnknownCameraKindError,
        match="unknown camera kind 'kinect'; known camera kinds: sim, opencv, realsense",
    ):
        make_camera("kinect")


def test_parse_profile():
    assert parse_profile("640x480x30") == (640, 480, 30)
    assert parse_profile("1280,720,15") == (1280, 720, 15)
    for bad in ("640x480", "640x480x0", "axbxc", "", "640x480x30x2"):
        with pytest.raises(InvalidCameraParameterError):
            parse_profile(bad)
    assert issubclass(InvalidCameraParameterError, ValueError)


# ---- OpenCV ----------------------------------------------------------------------------------------------


def test_opencv_plays_a_file_in_order(video_file):
    with make_camera("opencv", source=str(video_file), width=VIDEO_W, height=VIDEO_H) as cam:
        assert isinstance(cam, OpenCVCamera) and not cam.is_device
        frames = [cam.read() for _ in range(VIDEO_FRAMES)]
        for i, frame in enumerate(frames):
            assert frame is not None
            assert_video_frame(frame, i)
            assert frame.stamp == pytest.approx(i / VIDEO_FPS)
        assert cam.read() is None and cam.finished
        assert (cam.info.width, cam.info.height) == (VIDEO_W, VIDEO_H)
        assert not cam.info.calibrated


def test_opencv_resizes_and_loops(video_file):
    cam = OpenCVCamera(str(video_file), width=32, height=24, loop=True, hfov_deg=90.0)
    cam.open()
    try:
        frames = [cam.read() for _ in range(VIDEO_FRAMES + 3)]
    finally:
        cam.close()
    assert all(f is not None for f in frames)
    for k, frame in enumerate(frames):
        assert frame.frame_number == k  # numbering and stamps continue across the loop
        assert frame.stamp == pytest.approx(k / VIDEO_FPS)
        assert frame.color.shape == (24, 32, 3)
        mean = frame.color.reshape(-1, 3).mean(axis=0)
        assert np.all(np.abs(mean - video_colour(k % VIDEO_FRAMES)) < CODEC_TOLERANCE)
    assert cam.info.fx == pytest.approx(16.0) and cam.info.cx == pytest.approx(15.5)


def test_opencv_realtime_file_skips_to_the_newest_due_frame(video_file):
    with OpenCVCamera(str(video_file), width=0, height=0, realtime=True) as cam:
        first = cam.read(timeout=1.0)
        assert first is not None
        time.sleep(0.3)  # six frame periods at 20 fps
        later = cam.read(timeout=1.0)
    assert later is not None
    assert later.frame_number >= first.frame_number + 4
    assert_video_frame(later, later.frame_number)


def test_opencv_sources_that_cannot_open_are_named(tmp_path):
    missing = tmp_path / "nope.avi"
    with pytest.raises(CameraError, match=r"nope\.avi"):
        OpenCVCamera(str(missing)).open()
    not_video = tmp_path / "text.avi"
    not_video.write_text("not a video")
    with pytest.raises(CameraError, match=r"text\.avi"):
        OpenCVCamera(str(not_video)).open()
    with pytest.raises(CameraError, match="/dev/video97"):
        OpenCVCamera("/dev/video97").open()
    with pytest.raises(InvalidCameraParameterError):
        OpenCVCamera(0, width=-1)
    with pytest.raises(CameraError, match="not open"):
        OpenCVCamera(str(missing)).read()


# ---- simulation ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")
def test_sim_camera_frames_follow_simulation_time():
    from irevla_ros.sim.cell import MetaWorldCell

    cell = MetaWorldCell(tasks=("button-press-v3",), width=80, height=60, cameras=("corner", "topview"))
    try:
        cam = make_camera("sim", cell=cell, camera="corner")
        published: list[int] = []
        cam.on_frame = lambda: published.append(1)  # what the camera node sets: publish on arrival
        with cam:
            assert cam.read() is None  # nothing rendered yet
            cam.capture()  # render + offer: in sim_cell_node, the cell's thread after each period
            first = cam.read()
            assert first is not None and published == [1]
            assert first.color.shape == (60, 80, 3) and first.color.dtype == np.uint8 and first.depth is None
            assert first.stamp == cell.sim_time
            np.testing.assert_array_equal(first.color, cell.render("corner"))
            assert cam.read() is None  # a frame is returned once
            cell.apply_action(np.array([0.0, 1.0, 0.0, 0.0]))
            cam.offer(cam.render(stamp=12.5))  # the cell node stamps with its period's /clock time
            second = cam.read()
            assert second is not None and published == [1, 1]
            assert second.stamp == 12.5
            assert second.frame_number == first.frame_number + 1
            assert not np.array_equal(second.color, first.color)  # the arm moved
        info = cam.info
        fy = 30.0 / math.tan(math.radians(cell.camera_fovy("corner")) / 2.0)
        assert (info.width, info.height) == (80, 60)
        assert info.fy == pytest.approx(fy) and info.fx == pytest.approx(fy)
        assert (info.cx, info.cy) == (39.5, 29.5)
        with pytest.raises(ValueError, match="topview"):
            make_camera("sim", cell=cell, camera="no-such-camera")
    finally:
        cell.close()


# ---- RealSense through librealsense's software device ----------------------------------------------------

RS_FRAMES, RS_FPS = 10, 30
COLOR_W, COLOR_H, COLOR_F = 64, 48, 50.0
# Depth at half the colour resolution with the same field of view: alignment must resample it.
DEPTH_W, DEPTH_H, DEPTH_F = 32, 24, 25.0


def rs_colour(i: int) -> np.ndarray:
    return np.array([20 * i, 100, 255 - 20 * i], dtype=np.uint8)


def rs_depth_mm(i: int) -> int:
    return 500 + 10 * i


def record_software_device(path: str) -> None:
    """Record RS_FRAMES colour+depth framesets from an rs.software_device into a rosbag2 file."""
    import pyrealsense2 as rs

    def stream(kind, fmt, bpp, uid, width, height, focal):
        intr = rs.intrinsics()
        intr.width, intr.height, intr.fx, intr.fy = width, height, focal, focal
        intr.ppx, intr.ppy = (width - 1) / 2.0, (height - 1) / 2.0
        intr.model, intr.coeffs = rs.distortion.brown_conrady, [0.0] * 5
        vs = rs.video_stream()
        vs.type, vs.index, vs.uid, vs.fmt, vs.bpp, vs.fps = kind, 0, uid, fmt, bpp, RS_FPS
        vs.width, vs.height, vs.intrinsics = width, height, intr
        return vs

    device = rs.software_device()
    depth_sensor, color_sensor = device.add_sensor("Depth"), device.add_sensor("Color")
    depth_profile = depth_sensor.add_video_stream(
        stream(rs.stream.depth, rs.format.z16, 2, 0, DEPTH_W, DEPTH_H, DEPTH_F)
    )
    color_profile = color_sensor.add_video_stream(
        stream(rs.stream.color, rs.format.rgb8, 3, 1, COLOR_W, COLOR_H, COLOR_F)
    )
    depth_sensor.add_read_only_option(rs.option.depth_units, 0.001)
    identity = rs.extrinsics()
    identity.rotation, identity.translation = [1, 0, 0, 0, 1, 0, 0, 0, 1], [0, 0, 0]
    depth_profile.register_extrinsics_to(color_profile, identity)
    device.create_matcher(rs.matchers.default)

    recorder = rs.recorder(path, device)
    sensors = recorder.query_sensors()
    for sensor in sensors:
        sensor.open(sensor.get_stream_profiles()[0])
        sensor.start(lambda frame: None)
    buffers = []  # librealsense reads the pixels after on_video_frame returns
    for i in range(RS_FRAMES):
        depth = np.full((DEPTH_H, DEPTH_W), rs_depth_mm(i), np.uint16)
        colour = np.empty((COLOR_H, COLOR_W, 3), np.uint8)
        colour[:] = rs_colour(i)
        for sensor, profile, image, bpp in (
            (depth_sensor, depth_profile, depth, 2),
            (color_sensor, color_profile, colour, 3),
        ):
            frame = rs.software_video_frame()
            buffers.append(image.tobytes())
            frame.pixels, frame.bpp, frame.stride = buffers[-1], bpp, image.shape[1] * bpp
            frame.timestamp, frame.frame_number = i * 1000.0 / RS_FPS, i
            frame.domain = rs.timestamp_domain.hardware_clock
            frame.profile = profile.as_video_stream_profile()
            if sensor is depth_sensor:
                frame.depth_units = 0.001
            sensor.on_video_frame(frame)
        time.sleep(1.0 / RS_FPS)
    time.sleep(0.1)
    for sensor in sensors:
        sensor.stop()
        sensor.close()
    del recorder, sensors  # the recorder writes and closes the file when released


@pytest.fixture(scope="module")
def rs_recording(tmp_path_factory):
    pytest.importorskip("pyrealsense2")
    path = tmp_path_factory.mktemp("realsense") / "software.db3"
    record_software_device(str(path))
    assert path.stat().st_size > 0
    return path


def read_all(cam, limit: int = 3 * RS_FRAMES) -> list[CameraFrame]:
    frames = []
    for _ in range(limit):
        frame = cam.read(timeout=0.5)
        if frame is None:
            break
        frames.append(frame)
    return frames


def test_realsense_playback_colour_and_aligned_depth(rs_recording):
    cam = make_camera("realsense", playback_file=str(rs_recording), playback_realtime=False)
    with cam:
        frames = read_all(cam)
        assert cam.finished
        info = cam.info
    assert len(frames) >= RS_FRAMES // 2, f"only {len(frames)} of {RS_FRAMES} framesets came back"
    numbers = [f.frame_number for f in frames]
    assert numbers == sorted(set(numbers)) and set(numbers) <= set(range(RS_FRAMES))
    for frame in frames:
        i = frame.frame_number
        assert frame.color.shape == (COLOR_H, COLOR_W, 3) and frame.color.dtype == np.uint8
        assert np.all(frame.color == rs_colour(i))
        assert frame.stamp == pytest.approx(i / RS_FPS, abs=1e-6)
        # Aligned to colour: colour resolution, and the constant plane keeps its distance in millimetres.
        assert frame.depth is not None and frame.depth.shape == (COLOR_H, COLOR_W)
        assert frame.depth.dtype == np.uint16
        measured = frame.depth[frame.depth > 0]
        assert measured.size > 0.9 * frame.depth.size
        assert np.all(measured == rs_depth_mm(i))
    assert (info.width, info.height, info.fx, info.fy) == (COLOR_W, COLOR_H, COLOR_F, COLOR_F)
    assert (info.cx, info.cy) == ((COLOR_W - 1) / 2, (COLOR_H - 1) / 2)
    assert info.distortion_model == "plumb_bob" and info.distortion == (0.0,) * 5


def test_realsense_playback_colour_only_in_real_time(rs_recording):
    with make_camera("realsense", playback_file=str(rs_recording), enable_depth=False) as cam:
        frames = read_all(cam)
    assert frames, "real-time playback delivered no frame"
    for frame in frames:
        assert frame.depth is None
        assert np.all(frame.color == rs_colour(frame.frame_number))


def test_realsense_errors_name_what_was_wrong(tmp_path):
    pytest.importorskip("pyrealsense2")
    from irevla_ros.hardware.camera.realsense_camera import RealSenseCamera

    with pytest.raises(ValueError, match="640x480"):
        RealSenseCamera(profile="640x480")
    with pytest.raises(CameraError, match=r"missing\.db3"):
        RealSenseCamera(playback_file=str(tmp_path / "missing.db3")).open()
    with pytest.raises(CameraError, match="0000000000"):
        RealSenseCamera(serial="0000000000").open()  # no camera has this serial
    # initial_reset checks the serial before resetting anything (no device here: the same error)
    with pytest.raises(CameraError, match="0000000000"):
        RealSenseCamera(serial="0000000000", initial_reset=True).open()
    with pytest.raises(InvalidCameraParameterError, match="reset_timeout"):
        RealSenseCamera(initial_reset=True, reset_timeout=0.0)


def test_realsense_initial_reset_does_nothing_for_a_recording(rs_recording):
    # A recording has no device to reset (realsense-ros ignores initial_reset for rosbags too): it just plays.
    cam = make_camera(
        "realsense", playback_file=str(rs_recording), playback_realtime=False, initial_reset=True
    )
    with cam:
        frames = read_all(cam)
    assert frames and all(np.all(f.color == rs_colour(f.frame_number)) for f in frames)


def test_realsense_depth_only_while_wanted(rs_recording):
    # The camera node sets depth_wanted from its depth topic's subscriber count: no consumer, no alignment.
    cam = make_camera("realsense", playback_file=str(rs_recording), playback_realtime=False)
    with cam:
        assert cam.has_depth
        cam.depth_wanted = False
        first = [cam.read(timeout=0.5) for _ in range(3)]
        cam.depth_wanted = True
        later = read_all(cam)
    first = [f for f in first if f is not None]
    assert first and later
    for frame in first:
        assert frame.depth is None and np.all(frame.color == rs_colour(frame.frame_number))
    for frame in later:
        assert frame.depth is not None and frame.depth.shape == (COLOR_H, COLOR_W)
        assert np.all(frame.depth[frame.depth > 0] == rs_depth_mm(frame.frame_number))


def test_camera_node_aligns_depth_only_while_someone_subscribes(rs_recording, ros_context, spin):
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from irevla_ros.hardware.camera.realsense_camera import RealSenseCamera
    from irevla_ros.nodes.camera_node import CameraNode
    from irevla_ros.nodes.common import SENSOR_QOS

    node = CameraNode(
        backend_factory=lambda _params: RealSenseCamera(
            playback_file=str(rs_recording), playback_realtime=False, playback_repeat=True
        ),
        context=ros_context,
    )
    observer = Node("depth_consumer", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(observer)
    colour: list[Image] = []
    depth: list[Image] = []
    try:
        observer.create_subscription(Image, "/camera/camera/color/image_raw", colour.append, SENSOR_QOS)
        assert spin(executor, lambda: len(colour) >= 3, timeout=30)
        assert node.backend.depth_wanted is False and not depth  # nobody subscribed: not aligned
        observer.create_subscription(
            Image, "/camera/camera/aligned_depth_to_color/image_raw", depth.append, SENSOR_QOS
        )
        assert spin(executor, lambda: len(depth) >= 2, timeout=30)
        assert node.backend.depth_wanted is True
        assert depth[-1].encoding == "16UC1" and (depth[-1].width, depth[-1].height) == (128, 128)
    finally:
        executor.shutdown()
        node.close()
        node.destroy_node()
        observer.destroy_node()
