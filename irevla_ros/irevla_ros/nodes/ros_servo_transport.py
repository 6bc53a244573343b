"""The rclpy side of the servo arm backend (`hardware/arm/servo_arm.py`): its `ServoTransport` on a node.

The backend stays ROS-free; this adapter owns the publisher of the commands (TwistStamped to MoveIt Servo or
Float64MultiArray to a forward command controller) and the subscriptions to the driver's /joint_states, /tf,
/tf_static (transient local, as tf2 publishes it) or pose topic, and converts messages to plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from irevla_ros.hardware.arm.servo_arm import ServoTransport, StateSink, Transform, TransportConfig

# tf2's own QoS for /tf_static: reliable, transient local, so a late subscriber gets the fixed frames.
TF_STATIC_QOS = QoSProfile(
    depth=100, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
TF_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


def transforms_of(msg: Any, static: bool) -> list[Transform]:
    """The edges of a tf2_msgs/TFMessage."""
    out = []
    for t in msg.transforms:
        tr, rot = t.transform.translation, t.transform.rotation
        out.append(
            Transform(
                parent=t.header.frame_id.lstrip("/"),
                child=t.child_frame_id.lstrip("/"),
                translation=(tr.x, tr.y, tr.z),
                rotation=(rot.x, rot.y, rot.z, rot.w),
                static=static,
            )
        )
    return out


class RclpyServoTransport(ServoTransport):
    """ServoTransport on `node` (the arm controller), its callbacks in their own callback group."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._entities: list[Any] = []
        self._pub: Any = None
        self._config: TransportConfig | None = None

    def open(self, config: TransportConfig, sink: StateSink) -> None:
        from tf2_msgs.msg import (
            TFMessage,
        )  # a system ROS 2 has it; pip-only installs build it (scripts/setup.sh)

        node, group = self._node, MutuallyExclusiveCallbackGroup()
        self._config = config
        msg_type = TwistStamped if config.command_mode == "twist" else Float64MultiArray
        self._pub = node.create_publisher(msg_type, config.command_topic, 10)
        self._entities.append(self._pub)

        def on_joints(msg: JointState) -> None:
            sink.on_joint_state(list(msg.name), list(msg.position), list(msg.velocity))

        subs = [
            node.create_subscription(
                JointState, config.joint_states_topic, on_joints, 10, callback_group=group
            )
        ]
        if config.state_source == "tf":
            subs.append(
                node.create_subscription(
                    TFMessage,
                    "/tf",
                    lambda m: sink.on_transforms(transforms_of(m, False)),
                    TF_QOS,
                    callback_group=group,
                )
            )
            subs.append(
                node.create_subscription(
                    TFMessage,
                    "/tf_static",
                    lambda m: sink.on_transforms(transforms_of(m, True)),
                    TF_STATIC_QOS,
                    callback_group=group,
                )
            )
        else:

            def on_pose(msg: PoseStamped) -> None:
                p, o = msg.pose.position, msg.pose.orientation
                sink.on_pose(msg.header.frame_id.lstrip("/"), (p.x, p.y, p.z), (o.x, o.y, o.z, o.w))

            subs.append(
                node.create_subscription(PoseStamped, config.pose_topic, on_pose, 10, callback_group=group)
            )
        self._entities.extend(subs)

    def publish_twist(self, linear: Sequence[float], angular: Sequence[float]) -> None:
        pub, config = self._pub, self._config
        if pub is None or config is None:
            return
        if config.command_mode == "twist":
            msg = TwistStamped()
            msg.header.stamp = self._node.get_clock().now().to_msg()
            msg.header.frame_id = config.twist_frame
            msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in linear)
            msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(v) for v in angular)
        else:
            msg = Float64MultiArray(data=[float(v) for v in (*linear, *angular)])
        pub.publish(msg)

    def close(self) -> None:
        entities, self._entities = self._entities, []
        pub, self._pub = self._pub, None
        for entity in entities:
            if entity is pub:
                self._node.destroy_publisher(entity)
            else:
                self._node.destroy_subscription(entity)
