"""The rclpy side of the servo arm backend (`hardware/arm/servo_arm.py`): its `ServoTransport` on a node.

The backend stays ROS-free; this adapter owns the publisher of the commands (TwistStamped to MoveIt Servo or
Float64MultiArray to a forward command controller) and the subscriptions to the driver's /joint_states, /tf,
/tf_static (transient local, as tf2 publishes it) or pose topic, and converts messages to plain values.

It runs its own node (`<controller>_servo_io`) on the controller's Context, spun by its own executor thread: the
backend connects (waits for the driver's state) inside the controller's constructor, before the controller's
executor spins, and the driver's 100+ Hz state never queues behind the controller's control callbacks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from irevla_ros.hardware.arm.ros_transport import ServoTransport, StateSink, Transform, TransportConfig

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
    """ServoTransport on its own node `name` in `context`, spun on its own thread from `open` to `close`."""

    def __init__(self, context: Context | None, name: str) -> None:
        self._context = context
        self._name = name
        self._node: Node | None = None
        self._executor: SingleThreadedExecutor | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._pub: Any = None
        self._config: TransportConfig | None = None

    def _spin(self) -> None:
        assert self._executor is not None
        while not self._stop.is_set():
            try:
                self._executor.spin_once(timeout_sec=0.05)
            except ExternalShutdownException:
                return
            except Exception:  # the context shut down under the spin (Ctrl-C): nothing left to serve
                if self._context is not None and not self._context.ok():
                    return
                raise

    def open(self, config: TransportConfig, sink: StateSink) -> None:
        # A system ROS 2 has tf2_msgs; pip-only installs build it (scripts/setup.sh, third_party/tf2_msgs).
        from tf2_msgs.msg import TFMessage

        # Not the process's global arguments: `-r __node:=arm_controller` would rename this node too.
        node = self._node = Node(self._name, context=self._context, use_global_arguments=False)
        self._config = config
        msg_type = TwistStamped if config.command_mode == "twist" else Float64MultiArray
        self._pub = node.create_publisher(msg_type, config.command_topic, 10)

        def on_joints(msg: JointState) -> None:
            sink.on_joint_state(list(msg.name), list(msg.position), list(msg.velocity))

        subs = [node.create_subscription(JointState, config.joint_states_topic, on_joints, 10)]
        if config.state_source == "tf":
            subs.append(
                node.create_subscription(
                    TFMessage,
                    "/tf",
                    lambda m: sink.on_transforms(transforms_of(m, False)),
                    TF_QOS,
                )
            )
            subs.append(
                node.create_subscription(
                    TFMessage,
                    "/tf_static",
                    lambda m: sink.on_transforms(transforms_of(m, True)),
                    TF_STATIC_QOS,
                )
            )
        else:

            def on_pose(msg: PoseStamped) -> None:
                p, o = msg.pose.position, msg.pose.orientation
                sink.on_pose(msg.header.frame_id.lstrip("/"), (p.x, p.y, p.z), (o.x, o.y, o.z, o.w))

            subs.append(node.create_subscription(PoseStamped, config.pose_topic, on_pose, 10))
        del subs  # the node holds them
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(node)
        self._stop.clear()
        self._thread = threading.Thread(target=self._spin, name=f"{self._name} spin", daemon=True)
        self._thread.start()

    def publish_twist(self, linear: Sequence[float], angular: Sequence[float]) -> None:
        pub, config, node = self._pub, self._config, self._node
        if pub is None or config is None or node is None or not node.context.ok():
            return  # closed, or Ctrl-C shut the context down first: Servo stops at its command timeout
        if config.command_mode == "twist":
            msg = TwistStamped()
            msg.header.stamp = node.get_clock().now().to_msg()
            msg.header.frame_id = config.twist_frame
            msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = (float(v) for v in linear)
            msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = (float(v) for v in angular)
        else:
            msg = Float64MultiArray(data=[float(v) for v in (*linear, *angular)])
        try:
            pub.publish(msg)
        except Exception:
            if node.context.ok():
                raise  # shut down between the check and the publish: nothing to stop any more otherwise

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        self._pub = None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown()
        node, self._node = self._node, None
        if node is not None:
            node.destroy_node()
