"""ServoArm (the ROS-native backend for arms run by a ROS 2 driver + MoveIt Servo) against `servo_peer`, a stand-in
for MoveIt Servo and the driver: real rclpy over Fast DDS in both directions (TwistStamped / Float64MultiArray out,
/joint_states, /tf, /tf_static, PoseStamped in). The backend's transport is the node-side rclpy one the arm
controller uses (its own node, spun on its own thread)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("tf2_msgs.msg")

from servo_peer import START_POSITION, UR_JOINTS, ServoPeer
from test_safety import Trace, check

from irevla_ros.hardware.arm import ArmConnectionError, make_arm
from irevla_ros.hardware.arm.servo_arm import ServoArm, quat_multiply
from irevla_ros.nodes.ros_servo_transport import RclpyServoTransport
from irevla_ros.safety import SafetyLayer, SafetyLimits

TICK = 0.1
MAX_SPEED = 0.1
MAX_ANGULAR = 0.5


@pytest.fixture
def spinner(ros_context) -> object:
    """The context the backend's transport runs its own node in (as the arm controller's does)."""
    return ros_context


@pytest.fixture
def peer(ros_domain) -> Iterator[ServoPeer]:
    with ServoPeer(ros_domain) as p:
        yield p


def make_servo(context: object, **kwargs: object) -> ServoArm:
    params: dict[str, object] = {
        "transport": RclpyServoTransport(context, "servo_client_io"),
        "base_frame": "base_link",
        "ee_frame": "tool0",
        "joint_names": list(UR_JOINTS),
        "max_speed": MAX_SPEED,
        "max_angular_speed": MAX_ANGULAR,
        "state_timeout": 0.5,
        **kwargs,
    }
    arm = make_arm("servo", **params)
    assert isinstance(arm, ServoArm)
    return arm


@pytest.fixture
def arm(spinner, peer) -> Iterator[ServoArm]:
    backend = make_servo(spinner)
    backend.connect()
    yield backend
    backend.close()


def limits_around(start: np.ndarray) -> SafetyLimits:
    return SafetyLimits(
        workspace_low=tuple(start - np.array([0.1, 0.1, 0.1])),
        workspace_high=tuple(start + np.array([0.1, 0.1, 0.03])),
        home=tuple(start),
        max_step=0.01,
        max_speed=MAX_SPEED,
        action_scale=0.01,
        watchdog_timeout=0.5,
    )


def settle(arm: ServoArm, target: np.ndarray, tolerance: float = 2e-3, timeout: float = 10.0) -> np.ndarray:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ee = arm.read_state().ee_position
        if np.linalg.norm(ee - target) < tolerance:
            return ee
        time.sleep(0.02)
    raise AssertionError(f"end effector at {ee.tolist()} did not reach {target.tolist()} within {timeout} s")


def assert_within_limits(peer: ServoPeer, since: float) -> int:
    commands = peer.commands_since(since)
    for c in commands:
        assert np.linalg.norm(c.linear) <= MAX_SPEED + 1e-9, c.linear
        assert np.linalg.norm(c.angular) <= MAX_ANGULAR + 1e-9, c.angular
    return len(commands)


def test_connect_servo_targets_through_the_safety_layer_and_close(arm, peer):
    state = arm.read_state()
    assert state.joint_names == UR_JOINTS
    # /tf base_link -> flange composed with /tf_static flange -> tool0: the peer's tool pose.
    position, orientation = peer.pose()
    np.testing.assert_allclose(state.ee_position, position, atol=2e-3)
    assert abs(abs(float(np.dot(state.ee_orientation, orientation))) - 1.0) < 1e-4
    np.testing.assert_allclose(state.joint_positions[:3], position, atol=5e-3)  # the peer's stand-in joints
    start = state.ee_position
    layer, trace = SafetyLayer(limits_around(start)), Trace()
    t_start = time.monotonic()
    targets = []
    for action, ticks in ((np.array([0.0, 0.0, -1.0, 1.0]), 4), (np.array([1.0, 0.0, 0.0, -1.0]), 3)):
        for _ in range(ticks):
            now = time.monotonic()
            ee = arm.read_state().ee_position
            cmd = layer.command(action, now, ee)
            check(cmd, trace, layer.limits, now, ee, "command")
            assert cmd.target is not None
            arm.send_target(cmd.target, cmd.gripper)
            targets.append(cmd.target)
            time.sleep(max(0.0, TICK - (time.monotonic() - now)))
        settle(arm, targets[-1])
    final = arm.read_state()
    np.testing.assert_allclose(final.ee_position, start + np.array([0.03, 0.0, -0.04]), atol=3e-3)
    np.testing.assert_allclose(peer.pose()[0], final.ee_position, atol=3e-3)  # the peer really moved there
    assert final.gripper == pytest.approx(1.0)  # the last commanded opening (-1: open; no gripper joints set)
    # Orientation held while translating.
    assert abs(abs(float(np.dot(final.ee_orientation, orientation))) - 1.0) < 1e-3
    assert assert_within_limits(peer, t_start) > 20  # streamed at 50 Hz, never over the limits
    arm.close()
    assert not arm.is_connected

    def stopped() -> bool:
        last = peer.commands_since(0.0)[-1]
        return np.linalg.norm(last.linear) == 0.0 and np.linalg.norm(last.angular) == 0.0

    deadline = time.monotonic() + 5.0
    while not stopped() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stopped()  # a zero twist on close: Servo stops now, not at its command timeout
    with pytest.raises(ArmConnectionError, match="not connected"):
        arm.read_state()


def test_the_twist_never_exceeds_the_limits_far_targets_and_a_rotated_start(spinner, peer):
    # A target 5 cm away would be 0.5 m/s as (target - current) / period: capped at max_speed. The peer's tool is
    # also turned by 0.6 rad away from the held orientation: capped at max_angular_speed.
    arm = make_servo(spinner, orientation=[1.0, 0.0, 0.0, 0.0])
    turn = np.array([0.0, np.sin(0.3), 0.0, np.cos(0.3)])  # 0.6 rad about y
    peer.state.orientation = quat_multiply(turn, np.array([1.0, 0.0, 0.0, 0.0]))
    arm.connect()
    try:
        t0 = time.monotonic()
        start = arm.read_state().ee_position
        arm.send_target(start + np.array([0.0, 0.05, 0.0]), 1.0)
        time.sleep(0.3)
        commands = peer.commands_since(t0)
        saturated = [c for c in commands if np.linalg.norm(c.linear) > 0.99 * MAX_SPEED]
        assert saturated, [np.linalg.norm(c.linear) for c in commands]
        assert any(np.linalg.norm(c.angular) > 0.99 * MAX_ANGULAR for c in commands)
        settle(arm, start + np.array([0.0, 0.05, 0.0]))
        assert assert_within_limits(peer, t0) > 10

        def turned_back() -> bool:
            held = arm.read_state().ee_orientation
            return abs(abs(float(np.dot(held, [1.0, 0.0, 0.0, 0.0]))) - 1.0) < 1e-4

        deadline = time.monotonic() + 10.0
        while not turned_back() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert turned_back()  # to the held orientation, at no more than max_angular_speed
        assert assert_within_limits(peer, t0) > 50
    finally:
        arm.close()


def test_stale_driver_state_holds_and_raises_until_it_comes_back(arm, peer):
    start = arm.read_state().ee_position
    arm.send_target(start + np.array([0.0, 0.0, -0.1]), 1.0)  # 1 s at max speed
    time.sleep(0.15)
    peer.pause_state()  # the driver goes silent (the arm itself keeps moving only while commanded)
    with pytest.raises(ArmConnectionError, match="silent"):
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            arm.read_state()
            time.sleep(0.02)
    t_stale = time.monotonic()
    time.sleep(0.3)
    held = [c for c in peer.commands_since(t_stale)]
    assert len(held) >= 5 and all(np.linalg.norm(c.linear) == 0.0 for c in held)  # zero twists: holding
    stopped = peer.pose()[0]
    time.sleep(0.3)
    np.testing.assert_allclose(peer.pose()[0], stopped, atol=1e-6)  # the arm does not move while stale
    # It stopped short of the target: it moved blind (dead reckoning on what it commanded) at most until the
    # state was state_timeout old, about 0.15 + 0.5 s of the 1 s move.
    assert start[2] - 0.09 < stopped[2] < start[2] - 0.02, start[2] - stopped[2]
    with pytest.raises(ArmConnectionError, match=r"stale|silent"):
        arm.send_target(start, 1.0)
    with pytest.raises(ArmConnectionError, match="still silent"):
        arm.recover()
    peer.resume_state()
    deadline = time.monotonic() + 5.0
    while True:
        try:
            arm.recover()
            break
        except ArmConnectionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # The old target is gone (recovery holds); a new one moves the arm again.
    time.sleep(0.3)
    np.testing.assert_allclose(peer.pose()[0], stopped, atol=1e-6)
    arm.send_target(stopped + np.array([0.0, 0.0, 0.02]), 1.0)
    settle(arm, stopped + np.array([0.0, 0.0, 0.02]))


def test_pose_topic_and_float64_array_forward_controller(spinner, ros_domain):
    with ServoPeer(
        ros_domain,
        command_mode="velocity_array",
        command_topic="/forward_velocity_controller/commands",
        pose_topic="/ee_pose",
    ) as peer:
        arm = make_servo(
            spinner,
            command_mode="velocity_array",
            command_topic="/forward_velocity_controller/commands",
            state_source="pose",
            pose_topic="/ee_pose",
        )
        arm.connect()
        try:
            start = arm.read_state().ee_position
            np.testing.assert_allclose(start, START_POSITION, atol=1e-3)
            arm.send_target(start + np.array([0.01, 0.0, 0.0]), 1.0)
            settle(arm, start + np.array([0.01, 0.0, 0.0]))
            np.testing.assert_allclose(peer.pose()[0], start + np.array([0.01, 0.0, 0.0]), atol=3e-3)
        finally:
            arm.close()


def test_no_driver_is_a_clear_error(spinner):
    arm = make_servo(spinner, connect_timeout=0.5)
    with pytest.raises(ArmConnectionError, match=r"no state from the arm's ROS driver.*no /joint_states"):
        arm.connect()
    assert not arm.is_connected


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="command_mode"):
        ServoArm(command_mode="joint_velocity")
    with pytest.raises(ValueError, match="pose_topic"):
        ServoArm(state_source="pose")
    with pytest.raises(ValueError, match="rate"):
        ServoArm(rate=0.0)
    with pytest.raises(ArmConnectionError, match="transport"):
        ServoArm().connect()


# ---- the arm controller node: servo backend by name, standard robot state -----------------------------------


def _controller_overrides(start: np.ndarray) -> list:
    from rclpy.parameter import Parameter

    limits = limits_around(start)
    return [
        Parameter("backend", value="servo"),
        Parameter("base_frame", value="base_link"),
        Parameter("ee_frame", value="tool0"),
        Parameter("servo_state_timeout", value=0.5),
        Parameter("workspace_low", value=list(limits.workspace_low)),
        Parameter("workspace_high", value=list(limits.workspace_high)),
        Parameter("home", value=list(limits.home)),
        Parameter("max_speed", value=MAX_SPEED),
    ]


def test_arm_controller_node_servo_backend_latches_stale_state_and_clears_when_it_returns(
    ros_context, peer, spin
):
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_srvs.srv import Trigger

    from irevla_interfaces.msg import ArmCommand
    from irevla_ros import topics
    from irevla_ros.nodes.arm_controller_node import ArmControllerNode

    start = peer.pose()[0]
    node = ArmControllerNode(context=ros_context, parameter_overrides=_controller_overrides(start))
    client = Node("servo_test_client", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(client)
    seen: dict[str, list] = {"joints": [], "gripper": [], "pose": []}
    client.create_subscription(JointState, topics.JOINT_STATES, seen["joints"].append, 50)
    client.create_subscription(JointState, topics.GRIPPER_STATE, seen["gripper"].append, 50)
    client.create_subscription(PoseStamped, topics.EE_POSE, seen["pose"].append, 50)
    pub = client.create_publisher(ArmCommand, topics.ACTION, 10)
    clear = client.create_client(Trigger, topics.CLEAR_ESTOP)

    def act(dz: float, ticks: int) -> None:
        for _ in range(ticks):
            pub.publish(ArmCommand(ee_delta=[0.0, 0.0, dz], gripper=-1.0, episode_id="ep"))
            spin(executor, lambda: False, timeout=TICK)

    def clear_estop() -> Trigger.Response:
        assert clear.wait_for_service(timeout_sec=10.0)
        future = clear.call_async(Trigger.Request())
        assert spin(executor, future.done, timeout=15.0)
        return future.result()

    try:
        assert spin(executor, lambda: pub.get_subscription_count() > 0 and seen["pose"], timeout=10.0)
        # The driver (the peer) is the only /joint_states source: the controller does not publish a second one.
        assert client.count_publishers(topics.JOINT_STATES) == 1
        assert client.count_publishers(topics.TF) == 1
        assert seen["pose"][-1].header.frame_id == "base_link"
        assert list(seen["gripper"][-1].name) == ["gripper_opening"]
        act(-1.0, 4)
        assert spin(executor, lambda: start[2] - peer.pose()[0][2] > 0.03, timeout=5.0), peer.pose()
        assert all(tuple(m.name) == UR_JOINTS for m in seen["joints"])
        peer.pause_state()
        assert spin(executor, lambda: node.safety.estopped, timeout=5.0)
        assert "silent" in (node.safety.estop_reason or ""), node.safety.estop_reason
        stopped = peer.pose()[0]
        act(1.0, 3)  # latched: held
        np.testing.assert_allclose(peer.pose()[0], stopped, atol=1e-6)
        refused = clear_estop()
        assert not refused.success and "still silent" in refused.message, refused.message
        peer.resume_state()
        spin(executor, lambda: False, timeout=0.3)
        cleared = clear_estop()
        assert cleared.success, cleared.message
        act(1.0, 4)
        assert spin(executor, lambda: peer.pose()[0][2] - stopped[2] > 0.03, timeout=5.0), peer.pose()
        for c in peer.commands_since(0.0):
            assert np.linalg.norm(c.linear) <= MAX_SPEED + 1e-9
    finally:
        executor.shutdown()
        node.close()
        node.destroy_node()
        client.destroy_node()


def test_backend_benchmark_code_path(tmp_path):
    import json

    from irevla_ros.bench import arm_backends

    path = arm_backends.run(tmp_path, kinds=("servo",), steps=3, seconds=2.0)
    (entry,) = json.loads(path.read_text())["entries"]
    assert entry["backend"] == "servo"
    assert entry["latency_command_to_state_ms"]["n"] == 3
    assert 0.0 < entry["latency_command_to_state_ms"]["p50"] < 500.0
    assert entry["tracking_error_mm"]["n"] > 5 and entry["tracking_error_mm"]["p99"] < 20.0
