"""Under simulated time the policy node's tick of t acts on the inputs of t, whatever order DDS delivers them in.

A real PolicyNode (scripted expert, no noise) and a test node that plays the sim cell over real DDS: it publishes
`/clock` t first and the frame, pose, joint state and expert action of t a moment later (the order DDS sometimes
delivers the real cell's messages in). Every step must be stamped t and carry the inputs of t. When the inputs of
a moment never come, the tick runs after its bounded wait with the newest it has (and does not wait for that
input again until it is current).
"""

from __future__ import annotations

import time

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState

from irevla_interfaces.msg import ArmCommand, EpisodeEvent, StepRecord
from irevla_ros import topics
from irevla_ros.nodes.common import RELIABLE_QOS, SENSOR_QOS, image_to_msg, time_to_ns
from irevla_ros.nodes.policy_node import SIM_INPUT_WAIT, PolicyNode

PERIOD_NS = 100_000_000
T0_NS = 10_000_000_000


def _stamp(t_ns: int) -> object:
    from builtin_interfaces.msg import Time

    return Time(sec=t_ns // 1_000_000_000, nanosec=t_ns % 1_000_000_000)


def test_the_tick_of_t_waits_for_the_inputs_of_t(ros_context, spin):
    policy = PolicyNode(
        context=ros_context,
        parameter_overrides=[
            Parameter("use_sim_time", value=True),
            Parameter("policy", value="scripted_expert"),
            Parameter("action_noise", value=0.0),
        ],
    )
    cell = Node("fake_sim_cell", context=ros_context)
    clock_pub = cell.create_publisher(Clock, "/clock", 10)
    image_pub = cell.create_publisher(Image, topics.CAMERA_IMAGE, SENSOR_QOS)
    pose_pub = cell.create_publisher(PoseStamped, topics.EE_POSE, 10)
    joint_pub = cell.create_publisher(JointState, topics.GRIPPER_STATE, 10)
    expert_pub = cell.create_publisher(ArmCommand, topics.SIM_EXPERT_ACTION, 10)
    event_pub = cell.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
    records: list[StepRecord] = []
    arrived: list[float] = []

    def on_record(msg: StepRecord) -> None:
        records.append(msg)
        arrived.append(time.monotonic())

    cell.create_subscription(StepRecord, topics.STEP_RECORDS, on_record, RELIABLE_QOS)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(policy)
    executor.add_node(cell)

    def inputs(k: int) -> None:
        """The world at t0 + k periods: pixel value, hand x, gripper and expert x all encode k."""
        stamp = _stamp(T0_NS + k * PERIOD_NS)
        image_pub.publish(image_to_msg(np.full((128, 128, 3), 10 * k, np.uint8), stamp, "camera"))
        pose = PoseStamped()
        pose.header.stamp = stamp
        pose.pose.position.x = 0.1 + 0.01 * k
        pose_pub.publish(pose)
        joints = JointState(name=["gripper_opening"], position=[0.5 + 0.01 * k])
        joints.header.stamp = stamp
        joint_pub.publish(joints)
        expert = ArmCommand(ee_delta=[0.2 + 0.05 * k, 0.0, 0.0], gripper=0.0)
        expert.header.stamp = stamp
        expert_pub.publish(expert)

    def clock(k: int) -> None:
        clock_pub.publish(Clock(clock=_stamp(T0_NS + k * PERIOD_NS)))

    def settle(seconds: float) -> None:
        spin(executor, lambda: False, timeout=seconds)

    try:
        publishers = (clock_pub, image_pub, pose_pub, joint_pub, expert_pub, event_pub)
        assert spin(executor, lambda: all(p.get_subscription_count() > 0 for p in publishers), timeout=30)
        inputs(0)
        start = EpisodeEvent(type=EpisodeEvent.START, episode_id="ep-order", instruction="press the button")
        start.header.stamp = _stamp(T0_NS)
        event_pub.publish(start)
        settle(0.5)
        clock(0)
        assert spin(executor, lambda: len(records) >= 1, timeout=10)
        # /clock t before the inputs of t: the tick waits for them.
        for k in (1, 2, 3):
            clock(k)
            settle(0.3)
            inputs(k)
            assert spin(executor, lambda k=k: len(records) >= k + 1, timeout=10), k
        # The inputs of t4 never come: the tick runs after its bounded wait, on the newest inputs (t3, young
        # enough to act on); at t5 it no longer waits for inputs that missed a wait.
        sent = time.monotonic()
        clock(4)
        assert spin(executor, lambda: len(records) >= 5, timeout=10)
        waited = arrived[4] - sent
        clock(5)
        sent = time.monotonic()
        assert spin(executor, lambda: len(records) >= 6, timeout=10)
        not_waited = arrived[5] - sent
    finally:
        executor.shutdown(timeout_sec=2.0)
        policy.destroy_node()
        cell.destroy_node()

    used = [0, 1, 2, 3, 3, 3]  # the moment whose inputs each step must carry
    for k, (record, u) in enumerate(zip(records, used, strict=True)):
        assert time_to_ns(record.header.stamp) == T0_NS + k * PERIOD_NS, k
        assert record.step_index == k and not record.hold, (k, record.hold)
        np.testing.assert_array_equal(
            record.proprioception, np.array([0.1 + 0.01 * u, 0.0, 0.0, 0.5 + 0.01 * u], np.float32)
        )
        assert record.action[0] == np.float32(0.2 + 0.05 * u), (k, list(record.action))
        assert [time_to_ns(s) for s in record.image_stamps] == [T0_NS + u * PERIOD_NS], k
        assert bytes(record.images[0].data[:1]) == bytes([10 * u]), k
    assert 0.9 * SIM_INPUT_WAIT <= waited < SIM_INPUT_WAIT + 5.0, waited
    assert not_waited < 0.8 * SIM_INPUT_WAIT, not_waited
