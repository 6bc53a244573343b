"""A real cell from zero, rehearsed against franky-sim with the `robot` profile, the way the README walks a user
through it: no simulator anywhere in the graph (no success signal, no scripted expert), a camera played from a
video file by the opencv backend, a gamepad's /joy published by this test (the person at the cell), and every
operator action through the `irevla` verbs.

1. Teleoperated demonstrations: a session of source `expert` whose scripted expert follows /teleop/command; the
   operator drives with the deadman held and labels each episode with `irevla label success`.
2. `irevla train-stage0` trains the first VLA version from them.
3. A VLA session (the robot profile's SACfD Stage 1 live in the trainer): the operator takes over mid-episode by
   holding the deadman and hands back by releasing it, labels the episodes, Stage 1 pushes head updates, then
   `irevla iterate` runs Stage 2 and validation, the version is announced and the policy node swaps it in.

Checked: every acknowledged episode is in the store, with its label and its takeover steps; every end-effector
pose franky-sim reported stayed inside the configured box, and no step between two poses was longer than the
speed cap allows.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("franky")
pytest.importorskip("franky_sim")
pytest.importorskip("tf2_msgs.msg")

IREVLA = shutil.which("irevla") or str(Path(sys.executable).parent / "irevla")
MAX_SPEED = 0.1  # m/s, the robot profile's
DEADMAN = 9  # config/teleop.yaml: LB
X_AXIS = 1  # left stick up/down


class Cell:
    """The person at the cell and what they watch: /joy out; events, acks, records, poses, status in."""

    def __init__(self, context: object) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import Joy

        from irevla_interfaces.msg import EpisodeEvent, EpisodeStored, PolicyVersion, StepRecord
        from irevla_ros import topics
        from irevla_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS

        self.node = Node("cell_operator", context=context)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.events: list = []
        self.acks: dict[str, object] = {}
        self.records: dict[str, dict[int, object]] = {}
        self.poses: list[tuple[float, np.ndarray]] = []
        self.versions: list = []
        self.policy_status: list[dict[str, str]] = []
        # What the operator does with the gamepad: step index of the running episode -> deadman held or not.
        self.deadman: Callable[[int], bool] = lambda step: False
        self._joy = self.node.create_publisher(Joy, topics.JOY, 10)
        sub = self.node.create_subscription
        sub(EpisodeEvent, topics.EPISODE_EVENTS, self._on_event, RELIABLE_QOS)
        sub(EpisodeStored, topics.EPISODE_STORED, lambda m: self._keep_ack(m), RELIABLE_QOS)
        sub(StepRecord, topics.STEP_RECORDS, self._on_record, RELIABLE_QOS)
        sub(PoseStamped, topics.EE_POSE, self._on_pose, 50)
        sub(PolicyVersion, topics.POLICY_VERSION, lambda m: self.versions.append(m), LATCHED_QOS)
        sub(
            DiagnosticArray,
            topics.POLICY_STATUS,
            lambda m: self.policy_status.append({kv.key: kv.value for kv in m.status[0].values}),
            10,
        )
        self._started = time.monotonic()
        self.node.create_timer(0.05, self._publish_joy)  # 20 Hz, as joy_node's autorepeat
        self.executor = SingleThreadedExecutor(context=context)  # type: ignore[arg-type]
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        with contextlib.suppress(ExternalShutdownException):
            self.executor.spin()

    def _on_event(self, msg: object) -> None:
        with self.lock:
            self.events.append(msg)

    def _keep_ack(self, msg: object) -> None:
        with self.lock:
            self.acks[msg.episode_id] = msg  # type: ignore[attr-defined]

    def _on_record(self, msg: object) -> None:
        with self.lock:
            self.records.setdefault(msg.episode_id, {})[msg.step_index] = msg  # type: ignore[attr-defined]

    def _on_pose(self, msg: object) -> None:
        p = msg.pose.position  # type: ignore[attr-defined]
        stamp = msg.header.stamp  # type: ignore[attr-defined]
        with self.lock:
            self.poses.append((stamp.sec + stamp.nanosec * 1e-9, np.array([p.x, p.y, p.z])))

    def current_step(self) -> int:
        """The newest step index of the running episode, -1 when none runs."""
        from irevla_interfaces.msg import EpisodeEvent

        with self.lock:
            starts = [e for e in self.events if e.type == EpisodeEvent.START]
            ends = {e.episode_id for e in self.events if e.type == EpisodeEvent.END}
            if not starts or starts[-1].episode_id in ends:
                return -1
            steps = self.records.get(starts[-1].episode_id, {})
            return max(steps) if steps else 0

    def _publish_joy(self) -> None:
        from sensor_msgs.msg import Joy

        held = self.deadman(self.current_step())
        axes = [0.0] * 6
        # A slow sweep forward and back on the left stick: the arm runs into the box's walls and comes back.
        axes[X_AXIS] = 0.8 * math.sin(0.8 * (time.monotonic() - self._started)) if held else 0.0
        buttons = [0] * 11
        buttons[DEADMAN] = int(held)
        joy = Joy(axes=axes, buttons=buttons)
        joy.header.stamp = self.node.get_clock().now().to_msg()
        self._joy.publish(joy)

    def ended(self) -> list:
        from irevla_interfaces.msg import EpisodeEvent

        with self.lock:
            return [e for e in self.events if e.type == EpisodeEvent.END]

    def close(self) -> None:
        self.executor.shutdown()
        self._thread.join(timeout=5.0)
        self.node.destroy_node()


def wait(predicate: Callable[[], object], timeout: float, what: str, logs: Callable[[], str]) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


def irevla(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    # The domain comes from ROS_DOMAIN_ID, as ros2cli's does.
    return subprocess.run([IREVLA, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_teleop_demonstrations_stage0_and_an_iteration_with_takeovers_on_the_robot_profile(
    ros_context, tmp_path
):
    from franky_sim_peer import FrankySim
    from robot_cell import write_cell_file, write_video

    from irevla_interfaces.msg import EpisodeEvent
    from irevla_ros.bringup.graph import collect_graph
    from irevla_ros.bringup.launcher import GraphRunner
    from irevla_ros.hardware.arm import make_arm
    from irevla_ros.store.episode_store import EpisodeStore
    from irevla_ros.vla.model_store import ModelStore

    video = write_video(tmp_path / "camera.avi", frames=60, step=4)
    store_path, models = tmp_path / "store", tmp_path / "models"  # where write_cell_file puts them

    with FrankySim(tmp_path / "franky-sim.log") as sim:
        probe = make_arm("franky", host=sim.host, dynamics_factor=0.1, max_speed=MAX_SPEED)
        probe.connect()
        start = probe.read_state().ee_position.copy()
        probe.close()
        low, high = start - np.array([0.06, 0.1, 0.1]), start + np.array([0.06, 0.1, 0.05])
        # the user's cell: arm address, box, home, camera, tasks, folders
        cell_file = write_cell_file(
            tmp_path,
            video,
            camera="    width: 128 # the policy's size; 640x480 at 30 Hz costs two cores more than they have here\n"
            "    height: 128\n    fps: 10.0",
            extra=f"""/arm_controller:
  ros__parameters:
    franky_host: {sim.host}
    workspace_low: {low.round(4).tolist()}
    workspace_high: {high.round(4).tolist()}
    home: {start.round(4).tolist()}
/episode_manager:
  ros__parameters:
    tasks: [push-the-block-forward]
    episode_timeout: 3.0
    num_episodes: 2""",
        )
        cell = Cell(ros_context)
        logs_dirs: list[Path] = []

        def logs() -> str:
            return "\n".join(
                f"--- {p}\n{p.read_text(errors='replace')[-4000:]}"
                for d in logs_dirs
                for p in d.glob("*.log")
            )

        def session(name: str, overrides: list[str]) -> GraphRunner:
            # `irevla bringup --hardware robot --params-file my_cell.yaml --session <name>`
            logs_dirs.append(tmp_path / f"logs-{name}")
            graph = collect_graph("robot", ("camera",), (cell_file,), session=name)
            runner = GraphRunner(graph, overrides, log_dir=logs_dirs[-1])
            runner.start()
            return runner

        def label_each_episode(outcomes: list[str], runner: GraphRunner) -> list[str]:
            """Label each episode of this session as it ends (the graph waits label_wait for the operator)."""
            labelled: list[str] = []
            before = len(cell.ended())
            for outcome in outcomes:
                n = before + len(labelled)
                end = wait(lambda n=n: len(cell.ended()) > n and cell.ended()[n], 180,
                           f"the end of episode {len(labelled) + 1}", logs)  # fmt: skip
                assert runner.poll() is None, logs()
                done = irevla("label", outcome, "--timeout", "20")
                assert done.returncode == 0, (done.stdout, done.stderr)
                labelled.append(end.episode_id)  # type: ignore[attr-defined]
                wait(lambda e=end: e.episode_id in cell.acks, 60, "the episode's acknowledgement", logs)  # type: ignore[attr-defined]
            return labelled

        try:
            # 1. Teleoperated demonstrations (the scripted expert follows /teleop/command on a robot profile).
            cell.deadman = lambda step: step >= 0
            demo = session("demonstrate", [])
            try:
                demos = label_each_episode(["success", "success"], demo)
                wait(lambda: "irevla train-stage0 --store" in logs(), 30, "the trainer's Stage 0 hint", logs)
            finally:
                codes = demo.stop()
            assert not demo.unclean_exits(codes), demo.unclean_exits(codes)
            cell.deadman = lambda step: False

            # 2. Stage 0 from the command line.
            stage0 = irevla("train-stage0", "--store", str(store_path), "--models", str(models), "--steps", "4",
                            "--batch-size", "4", timeout=900)  # fmt: skip
            assert stage0.returncode == 0, stage0.stderr
            (v1,) = ModelStore(models).versions()

            # 3. A VLA session with takeovers at steps 5..9 of each episode, Stage 1 live, then an iteration.
            cell.deadman = lambda step: 5 <= step < 10
            vla = session(
                "policy",
                [
                    "/trainer.stage1.push_every_episodes=1",
                    "/trainer.stage1.sacfd.min_transitions=16",
                    "/trainer.stage1.sacfd.batch_size=32",
                    "/trainer.stage1.max_updates_per_step=40",
                    "/trainer.stage2.steps=3",
                    "/trainer.stage2.batch_size=4",
                ],
            )
            try:
                policy_episodes = label_each_episode(["success", "failure"], vla)
                cell.deadman = lambda step: False
                heads = wait(lambda: [v for v in cell.versions if v.stage == "stage1_rl"], 300,
                             "a Stage 1 head update", logs)  # fmt: skip
                iterate = irevla("iterate", "--reason", "rehearsal", "--timeout", "30", timeout=900)
                assert iterate.returncode == 0, (iterate.stdout, iterate.stderr, logs())
                candidate = [v for v in cell.versions if v.stage == "stage2_sft"]
                assert candidate and "promoted" in iterate.stdout, (iterate.stdout, cell.versions)
                wait(lambda: any(s.get("policy_version") == candidate[-1].version_id for s in cell.policy_status),
                     600, "the policy node running the new version", logs)  # fmt: skip
            finally:
                codes = vla.stop()
            assert not vla.unclean_exits(codes), vla.unclean_exits(codes)
        finally:
            cell.close()

    # Every acknowledged episode is in the store, with its label; the takeovers are counted.
    with EpisodeStore(store_path, read_only=True) as store:
        rows = {r.episode_id: r for r in store.list()}
        assert set(cell.acks) <= set(rows), (set(cell.acks), set(rows))
        for episode_id in demos:
            row = rows[episode_id]
            assert (row.source, row.outcome, row.label_source, row.complete) == (
                "expert",
                "success",
                "operator",
                True,
            )
            steps = store.read(episode_id).steps
            assert any(
                np.abs(s.action[:3]).max() > 0.1 for s in steps
            )  # the operator's commands were recorded
        outcomes = [rows[e].outcome for e in policy_episodes]
        assert outcomes == ["success", "failure"]
        for episode_id in policy_episodes:
            row = rows[episode_id]
            assert row.source == "policy" and row.label_source == "operator", row
            # One takeover: the deadman held while the operator saw steps 5..9 (on wall time the switch lands
            # on the tick after the press reaches the policy node, so a tick or two later than the step seen).
            flags = [bool(s.intervention) for s in store.read(episode_id).steps]
            first = flags.index(True)
            rest = flags[first:]
            length = rest.index(False) if False in rest else len(rest)
            assert 5 <= first <= 8 and 3 <= length <= 7 and not any(rest[length:]), flags
            assert (row.interventions, row.intervention_steps) == (1, length), row
    assert rows[policy_episodes[0]].policy_version == v1.version_id
    assert heads[0].parent_version in (v1.version_id, "")  # type: ignore[index]
    # Every pose franky-sim reported: inside the box (its tracking tolerance), never faster than the cap.
    poses = np.array([p for _, p in cell.poses])
    stamps = np.array([t for t, _ in cell.poses])
    assert len(poses) > 100
    assert np.all(poses >= low - 0.003) and np.all(poses <= high + 0.003), (
        poses.min(0) - low,
        high - poses.max(0),
    )
    moved = np.linalg.norm(np.diff(poses, axis=0), axis=1)
    dt = np.diff(stamps)
    fast = (dt > 0.02) & (moved / np.maximum(dt, 1e-9) > MAX_SPEED * 1.2)
    assert not fast.any(), (moved[fast], dt[fast])
    assert EpisodeEvent  # the events were typed by the graph's own interfaces
