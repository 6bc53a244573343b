"""The trainer's recording of the arm's state: /joint_states and /tf into the episode collector's window.

Step records do not carry the arm's joints or its transforms; the collector stores each step with the newest
sample stamped no later than it (`store.collector.RobotStateWindow`), so a stored episode replays /joint_states
and /tf as they were (`ros2 bag play`). Thin: messages become the store's plain samples.
"""

from __future__ import annotations

from typing import Any

from rclpy.node import Node
from sensor_msgs.msg import JointState

from irevla_ros import topics
from irevla_ros.store.collector import EpisodeCollector
from irevla_ros.store.records import JointStateSample, TransformSample

TF_TOPIC = "/tf"


def record_robot_state(node: Node, collector: EpisodeCollector, callback_group: Any = None) -> None:
    """Subscribe `node` to /joint_states and /tf, feeding `collector`. Without tf2_msgs installed (a pip-only
    machine that skipped its build) /tf is not recorded, and the node says so once."""
    node.create_subscription(
        JointState,
        topics.JOINT_STATES,
        lambda msg: collector.add_joint_state(JointStateSample.from_message(msg)),
        50,
        callback_group=callback_group,
    )
    try:
        from tf2_msgs.msg import TFMessage
    except ImportError:
        node.get_logger().warning("tf2_msgs is not installed: stored episodes will not replay /tf")
        return
    node.create_subscription(
        TFMessage,
        TF_TOPIC,
        lambda msg: collector.add_transforms(TransformSample.from_tf_message(msg)),
        100,
        callback_group=callback_group,
    )
