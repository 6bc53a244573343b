"""Each robot profile's whole graph against its arm's protocol peer, started as `irevla bringup --hardware <profile>`
starts it (GraphRunner, the profile's parameter files plus a cell file of the user's), then stopped by SIGINT:
every node comes up, the arm controller publishes the peer's end effector in the profile's base frame, and every
process exits 0 with no traceback in any log.

- robot: FrankyArm against franky-sim (libfranka's protocol, MuJoCo FR3);
- robot_ur: UrRtdeArm against the UR protocol peer (RTDE, dashboard, script port, Robotiq socket);
- robot_servo: ServoArm against the stand-in for MoveIt Servo and the driver (DDS).

The camera is the opencv backend playing a video file instead of a RealSense, and the policy is the scripted
expert (no trained VLA is needed to bring a cell up).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tf2_msgs.msg")

from robot_cell import write_cell_file, write_video


def _box_around(position: np.ndarray) -> dict[str, list[float]]:
    # What a user writes in their cell file: a box around where the arm is, home where it is.
    return {
        "workspace_low": [round(float(v) - 0.1, 4) for v in position],
        "workspace_high": [round(float(v) + 0.05, 4) for v in position],
        "home": [round(float(v), 4) for v in position],
    }


@contextlib.contextmanager
def franky_cell(tmp_path: Path) -> Iterator[tuple[dict[str, object], np.ndarray]]:
    pytest.importorskip("franky")
    pytest.importorskip("franky_sim")
    from franky_sim_peer import FrankySim

    from irevla_ros.hardware.arm import make_arm

    with FrankySim(tmp_path / "franky-sim.log") as sim:
        probe = make_arm("franky", host=sim.host, dynamics_factor=0.1, max_speed=0.1)
        probe.connect()
        start = probe.read_state().ee_position.copy()
        probe.close()
        yield {"franky_host": sim.host, **_box_around(start)}, start


@contextlib.contextmanager
def ur_cell(tmp_path: Path) -> Iterator[tuple[dict[str, object], np.ndarray]]:
    pytest.importorskip("rtde_control")
    from ur_rtde_peer import PeerProcess

    with PeerProcess() as peer:
        start = np.asarray(peer.call("pose"), dtype=float)[:3]
        yield {"ur_rtde_host": peer.host, "ur_rtde_frequency": 125.0, **_box_around(start)}, start


@contextlib.contextmanager
def servo_cell(tmp_path: Path, domain: int) -> Iterator[tuple[dict[str, object], np.ndarray]]:
    from servo_peer import ServoPeer

    with ServoPeer(domain) as peer:
        start = np.array([0.0, 0.45, 0.3])  # the profile's home, inside its box
        with peer._lock:
            peer.state.position = start.copy()
        yield {}, start


PROFILES = {
    # profile: (the frame ~/ee_pose is in, the peer)
    "robot": ("fr3_link0", franky_cell),
    "robot_ur": ("base", ur_cell),
    "robot_servo": ("base_link", servo_cell),
}


def _yaml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_robot_profile_runs_against_its_peer_and_stops_cleanly(profile, ros_context, spin, tmp_path):
    from geometry_msgs.msg import PoseStamped
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from irevla_ros import topics
    from irevla_ros.bringup.graph import collect_graph
    from irevla_ros.bringup.launcher import GraphRunner

    frame, cell = PROFILES[profile]
    video = write_video(tmp_path / "camera.avi")
    domain = int(__import__("os").environ["ROS_DOMAIN_ID"])
    peer = cell(tmp_path, domain) if profile == "robot_servo" else cell(tmp_path)
    with peer as (arm_parameters, start):
        arm_lines = "\n".join(f"    {k}: {_yaml_value(v)}" for k, v in arm_parameters.items())
        # the user's cell file, read after the package's
        cell_file = write_cell_file(
            tmp_path, video, f"/arm_controller:\n  ros__parameters:\n    base_frame: {frame}\n{arm_lines}"
        )
        graph = collect_graph(profile, params_files=(cell_file,))
        runner = GraphRunner(graph, [], log_dir=tmp_path / "logs")
        observer = Node("graph_observer", context=ros_context)
        executor = SingleThreadedExecutor(context=ros_context)
        executor.add_node(observer)
        poses: list = []
        observer.create_subscription(PoseStamped, topics.EE_POSE, poses.append, 10)
        expected = {n.fully_qualified_name for n in graph.nodes()}

        def running() -> set[str]:
            return {f"{ns.rstrip('/')}/{name}" for name, ns in observer.get_node_names_and_namespaces()}

        def logs() -> str:
            return "\n".join(
                f"--- {p.name}\n{p.read_text(errors='replace')}" for p in (tmp_path / "logs").glob("*.log")
            )

        runner.start()
        try:
            assert spin(executor, lambda: expected <= running() and len(poses) > 3, timeout=120), (
                running(),
                logs(),
            )
            assert poses[-1].header.frame_id == frame
            p = poses[-1].pose.position
            np.testing.assert_allclose([p.x, p.y, p.z], start, atol=0.01)
        finally:
            codes = runner.stop()
            executor.shutdown()
            observer.destroy_node()
        assert set(codes) == {runner.label(p) for p in graph.processes}, codes
        assert not runner.unclean_exits(codes), runner.unclean_exits(codes)
        assert "Traceback" not in logs(), logs()
