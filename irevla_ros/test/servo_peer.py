"""A stand-in for MoveIt Servo and an arm's ROS 2 driver, written for the tests (no MoveIt, franka_ros2 or UR driver
can run here): a real rclpy node on its own Context that takes the commands the servo backend publishes and
publishes what such a driver publishes.

- Commands: geometry_msgs/TwistStamped on /servo_node/delta_twist_cmds (MoveIt Servo's input; the twist's frame
  must be the base frame) or std_msgs/Float64MultiArray [vx, vy, vz, wx, wy, wz] on a forward controller's
  topic. Like Servo, a command older than `command_timeout` (Servo's incoming_command_timeout) stops the arm.
- Model: a kinematic end effector integrating the twist at `rate` (no dynamics, no joint limits).
- State: /joint_states with UR joint names, whose positions are the pose's x, y, z and rotation vector (a
  stand-in for the joints, not UR kinematics), and /tf base_link -> flange (dynamic) with /tf_static
  flange -> tool0 (a fixed 10 cm tool offset), so the backend must compose a chain as robot_state_publisher's
  trees need; optionally a PoseStamped of tool0.
- `pause_state()` stops publishing state (a driver that went silent) while the arm keeps integrating commands;
  `resume_state()` starts again. Every command is recorded for the tests' limit checks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped, TransformStamped, TwistStamped
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from tf2_msgs.msg import TFMessage

from irevla_ros.hardware.arm.servo_arm import quat_multiply, quat_rotate, quat_to_rotvec

UR_JOINTS = (
    "shoulder_pan_joint",
    "shoulder_lift_joint",
    "elbow_joint",
    "wrist_1_joint",
    "wrist_2_joint",
    "wrist_3_joint",
)
TOOL_OFFSET = np.array([0.0, 0.0, 0.1])  # tool0 in flange
START_POSITION = np.array([0.0, -0.45, 0.3])
# Tool pointing down (180 degrees about x), as a UR is usually jogged before a session.
START_ORIENTATION = np.array([1.0, 0.0, 0.0, 0.0])


def _rotvec_to_quat(v: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    axis = v / angle
    return np.array([*(axis * np.sin(angle / 2)), np.cos(angle / 2)])


@dataclass
class Command:
    arrival: float  # peer's monotonic clock
    frame_id: str
    linear: np.ndarray
    angular: np.ndarray


@dataclass
class PeerState:
    position: np.ndarray = field(default_factory=lambda: START_POSITION.copy())
    orientation: np.ndarray = field(default_factory=lambda: START_ORIENTATION.copy())


class ServoPeer:
    """MoveIt Servo + driver stand-in on domain `domain_id` (the test's), spun on its own thread."""

    def __init__(
        self,
        domain_id: int,
        command_mode: str = "twist",
        command_topic: str = "/servo_node/delta_twist_cmds",
        base_frame: str = "base_link",
        rate: float = 100.0,
        command_timeout: float = 0.1,
        pose_topic: str = "",
    ) -> None:
        self.base_frame = base_frame
        self.command_timeout = command_timeout
        self.state = PeerState()
        self.commands: list[Command] = []
        self.publishing = threading.Event()
        self.publishing.set()
        self.wrong_frame = 0
        self._lock = threading.Lock()
        self._context = Context()
        rclpy.init(context=self._context, domain_id=domain_id)
        self.node = Node("servo_peer", context=self._context)
        if command_mode == "twist":
            self.node.create_subscription(TwistStamped, command_topic, self._on_twist, 10)
        else:
            self.node.create_subscription(Float64MultiArray, command_topic, self._on_array, 10)
        self._joints = self.node.create_publisher(JointState, "/joint_states", 10)
        self._tf = self.node.create_publisher(TFMessage, "/tf", QoSProfile(depth=100))
        static_qos = QoSProfile(
            depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
        )
        self._tf_static = self.node.create_publisher(TFMessage, "/tf_static", static_qos)
        self._pose = self.node.create_publisher(PoseStamped, pose_topic, 10) if pose_topic else None
        self._dt = 1.0 / rate
        self._last = time.monotonic()
        self.node.create_timer(self._dt, self._tick)
        self._publish_static()
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="servo_peer", daemon=True)
        self._thread.start()

    # ---- commands ----------------------------------------------------------------------------------------------

    def _on_twist(self, msg: TwistStamped) -> None:
        lin, ang = msg.twist.linear, msg.twist.angular
        self._record(msg.header.frame_id, np.array([lin.x, lin.y, lin.z]), np.array([ang.x, ang.y, ang.z]))

    def _on_array(self, msg: Float64MultiArray) -> None:
        data = np.asarray(msg.data, dtype=np.float64)
        if data.size == 6:
            self._record(self.base_frame, data[:3], data[3:])

    def _record(self, frame_id: str, linear: np.ndarray, angular: np.ndarray) -> None:
        with self._lock:
            if frame_id != self.base_frame:
                self.wrong_frame += 1  # Servo would transform it; the stand-in only takes the base frame
                return
            self.commands.append(Command(time.monotonic(), frame_id, linear, angular))

    # ---- model and state -----------------------------------------------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            elapsed, self._last = now - self._last, now
            last = self.commands[-1] if self.commands else None
            if last is not None and now - last.arrival <= self.command_timeout:
                s = self.state
                s.position = s.position + last.linear * elapsed
                s.orientation = quat_multiply(_rotvec_to_quat(last.angular * elapsed), s.orientation)
                s.orientation /= np.linalg.norm(s.orientation)
            position, orientation = self.state.position.copy(), self.state.orientation.copy()
        if self.publishing.is_set():
            self._publish(position, orientation)

    def _transform(self, parent: str, child: str, t: np.ndarray, q: np.ndarray) -> TransformStamped:
        msg = TransformStamped()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        msg.header.frame_id, msg.child_frame_id = parent, child
        msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = (
            float(v) for v in t
        )
        r = msg.transform.rotation
        r.x, r.y, r.z, r.w = (float(v) for v in q)
        return msg

    def _publish_static(self) -> None:
        self._tf_static.publish(
            TFMessage(
                transforms=[self._transform("flange", "tool0", TOOL_OFFSET, np.array([0.0, 0.0, 0.0, 1.0]))]
            )
        )

    def _publish(self, position: np.ndarray, orientation: np.ndarray) -> None:
        stamp = self.node.get_clock().now().to_msg()
        joints = JointState(name=list(UR_JOINTS))
        joints.header.stamp = stamp
        joints.position = [float(v) for v in (*position, *quat_to_rotvec(orientation))]
        joints.velocity = [0.0] * 6
        self._joints.publish(joints)
        flange = position - quat_rotate(orientation, TOOL_OFFSET)
        self._tf.publish(
            TFMessage(transforms=[self._transform(self.base_frame, "flange", flange, orientation)])
        )
        if self._pose is not None:
            pose = PoseStamped()
            pose.header.stamp, pose.header.frame_id = stamp, self.base_frame
            p, o = pose.pose.position, pose.pose.orientation
            p.x, p.y, p.z = (float(v) for v in position)
            o.x, o.y, o.z, o.w = (float(v) for v in orientation)
            self._pose.publish(pose)

    # ---- test controls -------------------------------------------------------------------------------------

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.state.position.copy(), self.state.orientation.copy()

    def commands_since(self, t: float) -> list[Command]:
        with self._lock:
            return [c for c in self.commands if c.arrival >= t]

    def pause_state(self) -> None:
        self.publishing.clear()

    def resume_state(self) -> None:
        self.publishing.set()

    def _spin(self) -> None:
        while self._context.ok():
            try:
                self._executor.spin_once(timeout_sec=0.05)
            except Exception:  # shutdown under the spin: nothing left to serve
                if self._context.ok():
                    raise
                break

    def close(self) -> None:
        self._context.try_shutdown()
        self._thread.join(timeout=5.0)
        self._executor.shutdown()
        self.node.destroy_node()

    def __enter__(self) -> ServoPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
