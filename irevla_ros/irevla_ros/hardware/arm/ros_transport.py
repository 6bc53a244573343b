"""The interface between an arm backend that needs ROS pub/sub (the servo backend) and the node that provides it.

Plain Python: the backend publishes through a `ServoTransport` and receives state in a `StateSink`; the arm
controller node implements the transport with rclpy (`irevla_ros.nodes.ros_servo_transport`) on itself, so
hardware/ never imports rclpy and the node imports no concrete backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

COMMAND_MODES = ("twist", "velocity_array")
STATE_SOURCES = ("tf", "pose")


@dataclass(frozen=True)
class Transform:
    """One edge of the transform tree: `child` in `parent`, translation (m) and quaternion x, y, z, w."""

    parent: str
    child: str
    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]
    static: bool = False


class StateSink(ABC):
    """What a transport delivers into (called on the transport's thread)."""

    @abstractmethod
    def on_joint_state(
        self, names: Sequence[str], positions: Sequence[float], velocities: Sequence[float]
    ) -> None:
        """A sensor_msgs/JointState."""

    @abstractmethod
    def on_transforms(self, transforms: Sequence[Transform]) -> None:
        """The transforms of one tf2_msgs/TFMessage (/tf, or /tf_static with `static`)."""

    @abstractmethod
    def on_pose(self, frame_id: str, position: Sequence[float], orientation: Sequence[float]) -> None:
        """A geometry_msgs/PoseStamped of the end effector."""


@dataclass(frozen=True)
class TransportConfig:
    command_mode: str
    command_topic: str
    twist_frame: str
    state_source: str
    joint_states_topic: str
    pose_topic: str


class ServoTransport(ABC):
    """Publishers and subscriptions for ServoArm, implemented by the node (rclpy) or by anything else."""

    @abstractmethod
    def open(self, config: TransportConfig, sink: StateSink) -> None:
        """Create the command publisher and the state subscriptions; deliver state into `sink`."""

    @abstractmethod
    def publish_twist(self, linear: Sequence[float], angular: Sequence[float]) -> None:
        """One command in `config.command_mode` (never raises for a missing subscriber)."""

    @abstractmethod
    def close(self) -> None:
        """Destroy what `open` created (idempotent)."""
