"""Camera node: a camera backend (sim, opencv, realsense) -> sensor_msgs/Image + CameraInfo, realsense-ros style.

Topics (node `camera` in namespace `camera`): ~/color/image_raw, ~/color/camera_info,
~/aligned_depth_to_color/image_raw, ~/aligned_depth_to_color/camera_info: reliable, keep-last (REP-2003: drivers
publish reliable, consumers subscribe best-effort), and /diagnostics ("<name>: frames": the publish rate against
`fps`, the newest frame's age, backend errors, an ended file; thresholds in `irevla_ros.diagnostics`).
A frame is published once: when the backend has no new frame the node publishes nothing (a stale camera shows up
as missing frames, never as a silently repeated one). Depth (enable_depth) is aligned and published only while
its topic has a subscriber (a backend with `depth_wanted`, the RealSense one): nothing in the graph consumes it
today, so by default no CPU goes to aligning it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cv2
from rclpy.node import Node
from rclpy.time import Time
from sensor_msgs.msg import CameraInfo, Image

from irevla_ros.diagnostics import RATE_WINDOW, CameraSnapshot, EventWindow, Status, camera_status
from irevla_ros.hardware.camera import CameraBackend, CameraInfoData, make_camera
from irevla_ros.node_parameters import CAMERA
from irevla_ros.nodes.common import DRIVER_QOS, declare_parameters, image_to_msg, run_nodes
from irevla_ros.nodes.diagnostics_publisher import DiagnosticsPublisher
from irevla_ros.observation import resize_area
from irevla_ros.param_spec import ParamValue


class CameraNode(Node):
    def __init__(
        self,
        backend_factory: Callable[[dict[str, ParamValue]], CameraBackend] | None = None,
        name: str = "camera",
        namespace: str = "camera",
        **kwargs: object,
    ) -> None:
        super().__init__(name, namespace=namespace, **kwargs)  # type: ignore[arg-type]
        self.params = declare_parameters(self, CAMERA)
        self.backend = backend_factory(self.params) if backend_factory else self._make_backend()
        self.backend.open()
        self._size = (int(self.params["width"]), int(self.params["height"]))
        self._color_pub = self.create_publisher(Image, "~/color/image_raw", DRIVER_QOS)
        self._color_info_pub = self.create_publisher(CameraInfo, "~/color/camera_info", DRIVER_QOS)
        self._depth_pub = self._depth_info_pub = None
        if self.backend.has_depth:
            self._depth_pub = self.create_publisher(Image, "~/aligned_depth_to_color/image_raw", DRIVER_QOS)
            self._depth_info_pub = self.create_publisher(
                CameraInfo, "~/aligned_depth_to_color/camera_info", DRIVER_QOS
            )
        self.frames_published = 0
        # Diagnostics: stamps (ROS s) of the published frames, and the newest read error with its ROS time.
        self._published = EventWindow(RATE_WINDOW)
        self._read_error: tuple[float, str] | None = None
        self._started = time.monotonic()
        self.diagnostics = DiagnosticsPublisher(self, self._statuses)
        if hasattr(self.backend, "on_frame"):  # a push source (the simulated cell): publish on arrival
            self.backend.on_frame = self._on_timer
        else:
            self.create_timer(1.0 / float(self.params["fps"]), self._on_timer)
        self.get_logger().info(
            f"camera backend {self.params['backend']} publishing {self._size[0]}x{self._size[1]} at {self.params['fps']} Hz"
        )

    def _make_backend(self) -> CameraBackend:
        kind = str(self.params["backend"])
        if kind == "sim":
            raise ValueError(
                "camera backend 'sim' runs inside sim_cell_node (it renders the shared simulated cell)"
            )
        if kind == "opencv":
            source: str | int = str(self.params["source"])
            source = int(source) if source.isdigit() else source
            return make_camera(
                "opencv",
                source=source,
                width=self.params["width"],
                height=self.params["height"],
                fps=self.params["fps"],
                loop=self.params["loop"],
            )
        return make_camera(
            "realsense",
            serial=self.params["serial_no"],
            profile=self.params["profile"],
            enable_depth=self.params["enable_depth"],
            playback_file=self.params["playback_file"],
            initial_reset=self.params["initial_reset"],
        )

    def _stamp(self, frame_stamp: float) -> Time:
        # Simulated cameras stamp with simulation time (= ROS time under use_sim_time); hardware frames are
        # stamped on arrival with the node clock, the time base every other node compares against.
        if self.params["backend"] == "sim":
            return Time(nanoseconds=round(frame_stamp * 1e9), clock_type=self.get_clock().clock_type)
        return self.get_clock().now()

    def _camera_info(
        self, info: CameraInfoData, width: int, height: int, stamp: object, frame_id: str
    ) -> CameraInfo:
        sx, sy = width / max(info.width, 1), height / max(info.height, 1)
        msg = CameraInfo()
        msg.header.stamp = stamp
        msg.header.frame_id = frame_id
        msg.width, msg.height = width, height
        msg.distortion_model = info.distortion_model
        msg.d = list(info.distortion)
        msg.k = [info.fx * sx, 0.0, info.cx * sx, 0.0, info.fy * sy, info.cy * sy, 0.0, 0.0, 1.0]
        msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        msg.p = [msg.k[0], 0.0, msg.k[2], 0.0, 0.0, msg.k[4], msg.k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
        return msg

    def _on_timer(self) -> None:
        if self._depth_pub is not None and hasattr(self.backend, "depth_wanted"):
            self.backend.depth_wanted = self._depth_pub.get_subscription_count() > 0
        try:
            frame = self.backend.read(timeout=0.0)
        except Exception as exc:  # a camera that fails keeps the node up; the policy sees the frames stop
            self.get_logger().error(f"camera read failed: {exc}", throttle_duration_sec=5.0)
            self._read_error = (self._ros_now(), str(exc) or type(exc).__name__)
            return
        if frame is None:
            return
        when = self._stamp(frame.stamp)
        stamp = when.to_msg()
        frame_id = str(self.params["frame_id"])
        width, height = self._size
        color = resize_area(frame.color, width, height)  # the direct rollout resizes with it too
        self._color_pub.publish(image_to_msg(color, stamp, frame_id))
        self._color_info_pub.publish(self._camera_info(self.backend.info, width, height, stamp, frame_id))
        if frame.depth is not None and self._depth_pub is not None and self._depth_info_pub is not None:
            depth = frame.depth
            if depth.shape[1] != width or depth.shape[0] != height:
                depth = cv2.resize(depth, (width, height), interpolation=cv2.INTER_NEAREST)
            self._depth_pub.publish(image_to_msg(depth, stamp, frame_id, encoding="16UC1"))
            self._depth_info_pub.publish(self._camera_info(self.backend.info, width, height, stamp, frame_id))
        self.frames_published += 1
        self._published.add(when.nanoseconds * 1e-9)

    def _ros_now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def hardware_id(self) -> str:
        """The device this node drives: the RealSense serial (or recording), the OpenCV source, the sim camera."""
        kind = str(self.params["backend"])
        if kind == "realsense":
            return str(self.params["playback_file"] or self.params["serial_no"] or "realsense (first device)")
        if kind == "opencv":
            return str(self.params["source"])
        return f"{kind}:{self.params['sim_camera']}"

    def _statuses(self) -> list[Status]:
        now = self._ros_now()
        newest = self._published.newest()
        error = self._read_error
        snapshot = CameraSnapshot(
            fps=float(self.params["fps"]),  # type: ignore[arg-type]
            rate=self._published.rate(now),
            frame_age=None if newest is None else now - newest,
            since_start=time.monotonic() - self._started,
            frames=self.frames_published,
            # An error the backend got over (a frame came after it) is history, not the camera's state.
            error=error[1] if error is not None and (newest is None or error[0] >= newest) else None,
            ended=bool(getattr(self.backend, "finished", False)),
        )
        return [camera_status(self.get_name(), self.hardware_id(), snapshot)]

    def close(self) -> None:
        self.backend.close()


def main(args: list[str] | None = None) -> int:
    return run_nodes(lambda context: [CameraNode(context=context)], args)
