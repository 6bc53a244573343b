"""Bring-up on a pip-only machine: `irevla bringup` starts the graph description's processes, every node of the
description appears on the ROS graph, and Ctrl-C / SIGTERM shut everything down cleanly."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from irevla_ros.bringup.graph import collect_graph

IREVLA = shutil.which("irevla") or str(Path(sys.executable).parent / "irevla")


def test_bringup_starts_every_node_and_stops_cleanly_on_sigint(ros_context, child, spin, tmp_path):
    cameras = ("camera", "wrist_camera")
    expected = {n.fully_qualified_name for n in collect_graph("sim", cameras).nodes()}
    bringup = child(
        [
            IREVLA,
            "bringup",
            "--cameras",
            ",".join(cameras),
            "--set",
            f"/trainer.store_path={tmp_path / 'store'}",
            "--set",
            f"/trainer.run_dir={tmp_path / 'trainer'}",
        ],
        name="bringup",
    )
    observer = Node("bringup_observer", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(observer)

    def running() -> set[str]:
        return {f"{ns.rstrip('/')}/{name}" for name, ns in observer.get_node_names_and_namespaces()}

    assert spin(executor, lambda: expected <= running(), timeout=60), (running(), bringup.output())
    assert bringup.stop(signal.SIGINT, timeout=30) == 0, bringup.output()
    out = bringup.output()
    assert "[bringup] stopped:" in out and "Traceback" not in out, out
    assert spin(executor, lambda: not (expected & running()), timeout=20), running()
    observer.destroy_node()


def test_a_node_stops_cleanly_on_sigterm(child, tmp_path):
    trainer = child(
        [
            shutil.which("trainer_node") or "trainer_node",
            "--ros-args",
            "-p",
            f"store_path:={tmp_path / 'store'}",
            "-p",
            f"run_dir:={tmp_path / 'trainer'}",
        ],
        name="trainer",
    )
    import time

    deadline = time.monotonic() + 30
    while "episode store at" not in trainer.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "episode store at" in trainer.output(), trainer.output()
    assert trainer.stop(signal.SIGTERM, timeout=20) == 0, trainer.output()
    assert "Traceback" not in trainer.output()
    assert (tmp_path / "store" / "catalog.sqlite").exists()


def test_bad_configuration_stops_bringup_before_any_node_starts(tmp_path, capsys):
    from irevla_ros.cli import main

    assert main(["bringup", "--set", "/arm_controller.max_speed=50.0", "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "/arm_controller.ros__parameters.max_speed: 50.0 is above the maximum" in err


def test_a_stopped_trainer_stores_the_episode_it_was_assembling(ros_context, child, spin, tmp_path):
    """SIGINT in the middle of an episode: its steps are stored (marked incomplete), not dropped."""
    from test_malformed_inputs import event, step_record

    from irevla_interfaces.msg import EpisodeEvent, StepRecord
    from irevla_ros import topics
    from irevla_ros.nodes.common import RELIABLE_QOS
    from irevla_ros.store.episode_store import EpisodeStore

    trainer = child(
        [shutil.which("trainer_node") or "trainer_node", "--ros-args", "-p", f"store_path:={tmp_path / 'store'}",
         "-p", f"run_dir:={tmp_path / 'trainer'}"],
        name="trainer",
    )  # fmt: skip
    node = Node("half_an_episode", context=ros_context)
    events = node.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
    steps = node.create_publisher(StepRecord, topics.STEP_RECORDS, RELIABLE_QOS)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    ready = lambda: events.get_subscription_count() > 0 and steps.get_subscription_count() > 0  # noqa: E731
    assert spin(executor, ready, timeout=60), trainer.output()
    events.publish(
        event(EpisodeEvent.START, "ep-cut", task="button-press-v3", instruction="press the button")
    )
    for i in range(5):
        steps.publish(step_record("ep-cut", i))
    assert spin(executor, lambda: False, timeout=2.0) is False  # let them arrive; no END ever comes
    assert trainer.stop(signal.SIGINT, timeout=30) == 0, trainer.output()
    with EpisodeStore(tmp_path / "store", read_only=True) as store:
        row = store.get("ep-cut")
        assert row.num_steps == 5 and not row.complete and row.outcome == "aborted", row
        assert any("stopped before the episode ended" in r for r in row.reasons)
        assert [s.step_index for s in store.read("ep-cut").steps] == list(range(5))
