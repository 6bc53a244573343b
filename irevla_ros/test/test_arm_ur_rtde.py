"""UrRtdeArm against a UR protocol peer: ur_rtde 1.6.5 itself, unmodified, talking RTDE / dashboard / script /
Robotiq protocols on loopback to `ur_rtde_peer` (a kinematic UR5e standing in for the controller; no URSim can
be obtained here). Each test starts its own peer process on a free 127.x.y.z address (ur_rtde's ports are
fixed) and stops it at teardown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("rtde_control")
pytest.importorskip("rtde_receive")
pytest.importorskip("dashboard_client")

# The safety layer's own property checks, applied to every command of the real runs here.
from test_safety import Trace, check
from ur_rtde_peer import PeerProcess, free_loopback_address

from irevla_ros.hardware.arm import ArmConnectionError, ArmError, make_arm
from irevla_ros.hardware.arm.ur_rtde_arm import UrRtdeArm
from irevla_ros.safety import CommandStatus, SafetyLayer, SafetyLimits

TICK = 0.1  # the arm controller's 10 Hz
MAX_SPEED = 0.1  # m/s, for the SafetyLayer and the arm alike
UNLOCK_DELAY = 1.0  # the peer refuses to unlock a protective stop this soon (the real controller: 5 s)


@pytest.fixture
def peer() -> Iterator[PeerProcess]:
    with PeerProcess(unlock_delay=UNLOCK_DELAY) as server:
        yield server


@pytest.fixture
def arm(peer: PeerProcess) -> Iterator[UrRtdeArm]:
    backend = make_arm("ur_rtde", host=peer.host, frequency=125.0, max_speed=MAX_SPEED)
    assert isinstance(backend, UrRtdeArm)
    backend.connect()
    yield backend
    backend.close()


def limits_around(start: np.ndarray) -> SafetyLimits:
    # A box around the start pose with its top only 3 cm above it, so that moving up hits the wall.
    return SafetyLimits(
        workspace_low=tuple(start - np.array([0.1, 0.1, 0.1])),
        workspace_high=tuple(start + np.array([0.1, 0.1, 0.03])),
        home=tuple(start),
        max_step=0.01,
        max_speed=MAX_SPEED,
        action_scale=0.01,
        watchdog_timeout=0.5,
    )


class Controller:
    """A 10 Hz wall-clock loop: read state, SafetyLayer, send (what the arm controller node does)."""

    def __init__(self, arm: UrRtdeArm, layer: SafetyLayer) -> None:
        self.arm, self.layer = arm, layer
        self.samples: list[np.ndarray] = []
        self.stamps: list[float] = []  # controller time of each sample
        self.commands = []
        self.trace = Trace()

    def _send(self, cmd, now: float, ee: np.ndarray) -> None:
        check(cmd, self.trace, self.layer.limits, now, ee, "command")
        self.commands.append(cmd)
        if cmd.target is None:
            self.arm.hold()
        else:
            self.arm.send_target(cmd.target, cmd.gripper)

    def run(self, action: np.ndarray | None, ticks: int) -> None:
        for _ in range(ticks):
            start = time.monotonic()
            state = self.arm.read_state()
            self.samples.append(state.ee_position)
            self.stamps.append(state.extras["robot_time"])  # the controller's clock: that of the pose
            if action is None:
                cmd = self.layer.command_home(start, state.ee_position)
            else:
                cmd = self.layer.command(action, start, state.ee_position)
            self._send(cmd, start, state.ee_position)
            time.sleep(max(0.0, TICK - (time.monotonic() - start)))

    def settle(self, target: np.ndarray, tolerance: float = 2e-3, timeout: float = 5.0) -> float:
        """Seconds until the arm is within `tolerance` of `target` (sampling its state); raises on timeout."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            state = self.arm.read_state()
            ee = state.ee_position
            self.samples.append(ee)
            self.stamps.append(state.extras["robot_time"])  # the controller's clock: that of the pose
            if np.linalg.norm(ee - target) < tolerance:
                return time.monotonic() - t0
            time.sleep(0.02)
        raise AssertionError(f"arm at {ee.tolist()} did not reach {target.tolist()} within {timeout} s")


def test_stream_through_the_safety_layer_box_home_and_close(arm, peer):
    state = arm.read_state()
    assert arm.is_connected
    assert state.joint_positions.shape == (6,) and state.joint_names[0] == "shoulder_pan_joint"
    assert np.linalg.norm(state.ee_orientation) == pytest.approx(1.0, abs=1e-6)
    assert state.extras["safety_mode"] == 1 and state.extras["runtime_state"] == 2  # normal, script playing
    np.testing.assert_allclose(state.ee_position, np.asarray(peer.call("pose"))[:3], atol=1e-3)
    start = state.ee_position
    limits = limits_around(start)
    ctl = Controller(arm, SafetyLayer(limits))

    # 1. A 4 cm move down inside the box, closing the gripper (policy gripper +1 = close).
    t0 = time.monotonic()
    ctl.run(np.array([0.0, 0.0, -1.0, 1.0]), ticks=4)
    target = ctl.commands[-1].target
    np.testing.assert_allclose(target, start + np.array([0.0, 0.0, -0.04]), atol=1e-3)
    ctl.settle(target)
    move_time = time.monotonic() - t0
    assert move_time < 2.0, move_time
    # The controller's joints moved to get there (the state is the peer's arm, not an echo of the command).
    assert np.linalg.norm(arm.read_state().joint_positions - state.joint_positions) > 0.01
    # 2. Garbage in: the layer holds, the arm stays.
    ctl.run(np.array([np.nan, 0.0, 0.0, 0.0]), ticks=3)
    assert all(c.status is CommandStatus.REJECTED_NONFINITE for c in ctl.commands[-3:])
    assert np.linalg.norm(arm.read_state().ee_position - target) < 2e-3
    closed = arm.read_state().gripper
    assert closed < 0.3, closed
    # 3. Push 15 cm up, opening the gripper: the target stops at the box's top (3 cm above the start).
    ctl.run(np.array([0.0, 0.0, 1.0, -1.0]), ticks=15)
    z_high = limits.workspace_high[2]
    assert all(c.target[2] <= z_high for c in ctl.commands if c.target is not None)
    assert ctl.commands[-1].target[2] == pytest.approx(z_high)
    assert "workspace box" in ctl.commands[-1].reason
    ctl.settle(ctl.commands[-1].target)
    time.sleep(0.5)
    ctl.samples.append(arm.read_state().ee_position)
    highest = max(s[2] for s in ctl.samples)
    assert highest <= z_high + 1e-3, highest - z_high  # the arm never went above the box either
    pos, stamps = np.array(ctl.samples[: len(ctl.stamps)]), np.array(ctl.stamps)
    speeds = np.linalg.norm(np.diff(pos, axis=0), axis=1) / np.maximum(np.diff(stamps), 1e-3)
    assert speeds.max() <= 1.1 * MAX_SPEED, speeds.max()
    assert arm.read_state().gripper > closed + 0.5  # opened
    # 4. Home, rate-limited by the same layer, then a blocking move_home (moveL).
    ctl.run(None, ticks=8)
    ctl.settle(np.array(limits.home))
    aside = start + np.array([0.02, 0.02, -0.02])
    t0 = time.monotonic()
    arm.move_home(aside, 1.0, timeout=10.0)
    home_time = time.monotonic() - t0
    assert np.linalg.norm(arm.read_state().ee_position - aside) < 2e-3, home_time
    # Orientation was held throughout.
    np.testing.assert_allclose(arm.read_state().ee_orientation, state.ee_orientation, atol=2e-3)
    # 5. Close: disconnected, refuses commands, and the control script was stopped on the controller.
    arm.close()
    assert not arm.is_connected
    with pytest.raises(ArmConnectionError):
        arm.send_target(start, 1.0)
    assert not peer.call("program_running")
    print(f"ur peer: 4 cm streamed move settled in {move_time:.2f} s; move_home 3.5 cm {home_time:.2f} s")


def test_random_streams_stay_in_the_box_and_under_the_speed_cap(arm):
    # The safety layer's property checks (test_safety.check) on every command of random action streams, and
    # the same properties measured on the arm the peer moved.
    start = arm.read_state().ee_position
    limits = limits_around(start)
    rng = np.random.default_rng(7)
    ctl = Controller(arm, SafetyLayer(limits))
    for _ in range(3):
        action = np.concatenate([rng.uniform(-1.5, 1.5, size=3), rng.uniform(-1, 1, size=1)])
        ctl.run(action, ticks=int(rng.integers(3, 10)))
    ctl.settle(ctl.commands[-1].target)
    samples = np.array(ctl.samples)
    assert np.all(samples >= np.array(limits.workspace_low) - 1e-3)
    assert np.all(samples <= np.array(limits.workspace_high) + 1e-3)
    pos, stamps = samples[: len(ctl.stamps)], np.array(ctl.stamps)
    speeds = np.linalg.norm(np.diff(pos, axis=0), axis=1) / np.maximum(np.diff(stamps), 1e-3)
    assert speeds.max() <= 1.1 * MAX_SPEED, speeds.max()


def test_hold_stops_a_running_motion(arm):
    start = arm.read_state().ee_position
    far = start + np.array([0.0, 0.0, -0.15])
    arm.send_target(far, 1.0)
    time.sleep(0.4)
    arm.hold()
    time.sleep(0.8)
    stopped = arm.read_state()
    time.sleep(0.3)
    later = arm.read_state()
    assert np.linalg.norm(later.ee_position - stopped.ee_position) < 1e-3  # at rest
    travelled = start[2] - stopped.ee_position[2]
    assert 0.01 < travelled < 0.08, travelled  # it moved (~0.1 m/s), and stopped far short of the target
    # Streaming resumes from where the arm is, not from where the interrupted ramp was.
    arm.send_target(stopped.ee_position + np.array([0.01, 0.0, 0.0]), 1.0)
    time.sleep(0.5)
    np.testing.assert_allclose(
        arm.read_state().ee_position, stopped.ee_position + np.array([0.01, 0.0, 0.0]), atol=2e-3
    )


def test_protective_stop_latches_and_needs_recovering(arm, peer):
    here = arm.read_state().ee_position
    arm.send_target(here + np.array([0.0, 0.0, -0.1]), 1.0)
    time.sleep(0.3)
    peer.call("protective_stop")
    time.sleep(0.1)
    stopped_at = arm.read_state()
    assert stopped_at.extras["safety_mode"] == 3
    with pytest.raises(ArmError, match=r"protective stop.*latched"):
        arm.send_target(here, 1.0)
    time.sleep(0.3)
    with pytest.raises(ArmError, match="protective stop"):  # still latched: nothing cleared it
        arm.hold()
    assert np.linalg.norm(arm.read_state().ee_position - stopped_at.ee_position) < 1e-4  # the arm stayed
    assert arm.is_connected  # a fault, not a lost connection
    # Too early: the controller's refusal comes back as a clear error (the real one waits 5 s).
    with pytest.raises(ArmError, match="Cannot unlock protective stop"):
        arm.recover()
    time.sleep(UNLOCK_DELAY)
    arm.recover()
    state = arm.read_state()
    assert state.extras["safety_mode"] == 1 and state.extras["runtime_state"] == 2
    assert peer.call("scripts_received") == 2  # the control script was uploaded again
    target = state.ee_position + np.array([0.02, 0.0, 0.0])
    arm.send_target(target, 1.0)
    time.sleep(0.6)
    np.testing.assert_allclose(arm.read_state().ee_position, target, atol=2e-3)


def test_emergency_stop_needs_release_then_power_and_brakes(arm, peer):
    peer.call("emergency_stop")
    time.sleep(0.1)
    with pytest.raises(ArmError, match="emergency stop"):
        arm.send_target(arm.read_state().ee_position, 1.0)
    with pytest.raises(ArmError, match="still engaged"):
        arm.recover()
    peer.call("release_emergency_stop")
    time.sleep(0.1)  # the RTDE state reports it within a cycle (8 ms at 125 Hz)
    arm.recover()  # power on, brake release, script upload
    assert peer.call("robot_mode") == 7 and peer.call("program_running")
    here = arm.read_state().ee_position
    arm.send_target(here + np.array([0.0, 0.01, 0.0]), 1.0)
    time.sleep(0.5)
    np.testing.assert_allclose(arm.read_state().ee_position, here + np.array([0.0, 0.01, 0.0]), atol=2e-3)


def test_a_stopped_program_is_a_clear_error(arm, peer):
    peer.call("_dashboard", "stop")  # someone pressed stop on the pendant / dashboard
    time.sleep(0.1)
    with pytest.raises(ArmError, match="control script is not running"):
        arm.send_target(arm.read_state().ee_position, 1.0)
    arm.recover()
    arm.send_target(arm.read_state().ee_position, 1.0)


def test_a_dropped_connection_raises_and_clears_is_connected(arm, peer):
    here = arm.read_state().ee_position
    arm.send_target(here, 1.0)
    peer.kill()
    t0 = time.monotonic()
    with pytest.raises(ArmConnectionError, match="lost the connection"):
        for _ in range(50):  # the first failure may surface on a read or on the next command
            arm.read_state()
            arm.send_target(here, 1.0)
            time.sleep(0.05)
    assert time.monotonic() - t0 < 3.0
    assert not arm.is_connected
    with pytest.raises(ArmConnectionError):
        arm.read_state()
    with pytest.raises(ArmConnectionError):
        arm.hold()
    arm.close()  # still safe


def test_a_lost_link_is_a_clear_error_and_the_arm_holds_where_the_stream_stopped(peer):
    # No gripper socket here: the loss must be seen on the RTDE link itself.
    arm = make_arm("ur_rtde", host=peer.host, frequency=125.0, max_speed=MAX_SPEED, gripper="none")
    arm.connect()
    try:
        here = arm.read_state().ee_position
        arm.send_target(here + np.array([0.0, 0.0, -0.1]), 1.0)
        time.sleep(0.3)
        peer.call("disconnect")  # the network goes; the controller keeps running its script
        t0 = time.monotonic()
        with pytest.raises(ArmConnectionError, match="lost the connection"):
            for _ in range(100):
                arm.read_state()
                arm.send_target(here + np.array([0.0, 0.0, -0.1]), 1.0)
                time.sleep(0.02)
        detected = time.monotonic() - t0
        assert detected < 2.0, detected
        assert not arm.is_connected
        time.sleep(1.0)  # servoL converges on its last setpoint with a 0.1 s lag (the lookahead)
        settled = np.asarray(peer.call("pose"))[:3]
        time.sleep(0.3)
        later = np.asarray(peer.call("pose"))[:3]
        assert np.linalg.norm(later - settled) < 1e-4  # at rest: the controller holds
        # ... at the last streamed setpoint (~3-4 cm down the 0.1 m/s ramp), not at the 10 cm target.
        assert 0.01 < here[2] - settled[2] < 0.06, here[2] - settled[2]
    finally:
        arm.close()
    print(f"ur peer: lost link detected after {detected:.2f} s")


def test_connecting_to_nothing_is_a_clear_error():
    arm = UrRtdeArm(free_loopback_address(), gripper="none")
    with pytest.raises(ArmConnectionError, match="cannot connect"):
        arm.connect()
    assert not arm.is_connected


def test_arm_controller_node_latches_a_protective_stop_and_clears_it_through_recovery(
    peer, ros_context, spin
):
    # The node picks the backend by name from its parameters, as under `--hardware robot_ur`.
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger

    from irevla_interfaces.msg import ArmCommand
    from irevla_ros import topics
    from irevla_ros.nodes.arm_controller_node import ArmControllerNode

    start = np.asarray(peer.call("pose"))[:3]
    limits = limits_around(start)
    overrides = [
        Parameter("backend", value="ur_rtde"),
        Parameter("ur_rtde_host", value=peer.host),
        Parameter("ur_rtde_frequency", value=125.0),
        Parameter("workspace_low", value=list(limits.workspace_low)),
        Parameter("workspace_high", value=list(limits.workspace_high)),
        Parameter("home", value=list(limits.home)),
        Parameter("max_speed", value=MAX_SPEED),
    ]
    node = ArmControllerNode(context=ros_context, parameter_overrides=overrides)
    client = Node("ur_test_client", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    executor.add_node(client)
    pub = client.create_publisher(ArmCommand, topics.ACTION, 10)
    clear = client.create_client(Trigger, topics.CLEAR_ESTOP)

    def act(dz: float, ticks: int) -> None:
        for _ in range(ticks):
            msg = ArmCommand(ee_delta=[0.0, 0.0, dz], gripper=-1.0, episode_id="ep")
            msg.header.stamp = client.get_clock().now().to_msg()
            pub.publish(msg)
            spin(executor, lambda: False, timeout=TICK)

    def clear_estop() -> Trigger.Response:
        assert clear.wait_for_service(timeout_sec=10.0)
        future = clear.call_async(Trigger.Request())
        assert spin(executor, future.done, timeout=15.0)
        return future.result()

    try:
        assert spin(executor, lambda: pub.get_subscription_count() > 0, timeout=10.0)
        act(-1.0, 4)
        spin(executor, lambda: False, timeout=0.6)
        moved = np.asarray(peer.call("pose"))[:3]
        assert start[2] - moved[2] > 0.02, start[2] - moved[2]  # the node drove the arm down
        peer.call("protective_stop")
        act(-1.0, 3)
        assert node.safety.estopped
        assert "protective stop" in (node.safety.estop_reason or "")
        stopped = np.asarray(peer.call("pose"))[:3]
        act(-1.0, 3)  # latched: nothing moves
        np.testing.assert_allclose(np.asarray(peer.call("pose"))[:3], stopped, atol=1e-4)
        refused = clear_estop()  # too soon for the controller: the e-stop stays latched, with its answer
        assert not refused.success and "Cannot unlock protective stop" in refused.message, refused.message
        assert node.safety.estopped
        spin(executor, lambda: False, timeout=UNLOCK_DELAY)
        cleared = clear_estop()
        assert cleared.success, cleared.message
        assert not node.safety.estopped
        act(1.0, 5)
        spin(executor, lambda: False, timeout=0.6)
        assert np.asarray(peer.call("pose"))[2] - stopped[2] > 0.02  # moving again, under the node's control
    finally:
        executor.shutdown()
        node.close()
        node.destroy_node()
        client.destroy_node()


def test_backend_benchmark_code_path(tmp_path):
    import json

    from irevla_ros.bench import arm_backends

    path = arm_backends.run(tmp_path, kinds=("ur_rtde",), steps=3, seconds=2.0)
    (entry,) = json.loads(path.read_text())["entries"]
    assert entry["backend"] == "ur_rtde"
    assert entry["latency_command_to_state_ms"]["n"] == 3
    assert 0.0 < entry["latency_command_to_state_ms"]["p50"] < 500.0
    assert entry["tracking_error_mm"]["n"] > 5 and entry["tracking_error_mm"]["p99"] < 20.0


@pytest.mark.parametrize("kind", ["franky", "ur_rtde", "servo"])
def test_the_nodes_parameters_build_each_hardware_backend(kind):
    # Every "<kind>_<keyword>" parameter of the schema must be a keyword of the backend (and be accepted).
    pytest.importorskip({"franky": "franky", "ur_rtde": "rtde_control", "servo": "numpy"}[kind])
    from irevla_ros.node_parameters import ARM_CONTROLLER
    from irevla_ros.nodes.arm_controller_node import backend_parameters

    params = {spec.name: spec.default for spec in ARM_CONTROLLER}
    built = backend_parameters(kind, params)
    assert {k for k in built if k != "max_speed"} == {
        spec.name[len(kind) + 1 :] for spec in ARM_CONTROLLER if spec.name.startswith(f"{kind}_")
    }
    arm = make_arm(kind, **built)
    assert not arm.is_connected


def test_the_peer_integrates_speedl_and_stops_on_speed_stop(peer):
    # The peer's speedL emulation, driven by ur_rtde directly (the backend servos; speedL is its alternative).
    import rtde_control
    import rtde_receive

    receive = rtde_receive.RTDEReceiveInterface(peer.host, 125.0, ["timestamp", "actual_TCP_pose"])
    control = rtde_control.RTDEControlInterface(peer.host, 125.0)
    try:
        z0 = receive.getActualTCPPose()[2]
        assert control.speedL([0.0, 0.0, 0.05, 0.0, 0.0, 0.0], 0.5, 0.0)
        time.sleep(0.5)
        assert control.speedStop(1.0)
        time.sleep(0.3)
        z1 = receive.getActualTCPPose()[2]
        time.sleep(0.2)
        assert receive.getActualTCPPose()[2] == pytest.approx(z1, abs=1e-5)  # stopped
        # 0.5 s at 0.05 m/s after a 0.1 s ramp at 0.5 m/s^2, then a 0.05 s stop: about 2.3 cm.
        assert 0.015 < z1 - z0 < 0.03, z1 - z0
        assert 10 in peer.call("commands_seen") and 15 in peer.call("commands_seen")
    finally:
        control.stopScript()
        control.disconnect()
        receive.disconnect()
