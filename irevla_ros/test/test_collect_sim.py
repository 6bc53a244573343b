"""The whole collection graph in simulation, end to end, over real DDS between real processes.

Three episodes run through sim cell, camera, arm controller, policy, episode manager and trainer; the store holds
them with the right step counts, outcomes and checksums, and what it returns is exactly what was published. An
independent reader (mcap_ros2, not the store's code) checks every stored file's step timing: stamps one control
period apart, no image captured after its step.
"""

from __future__ import annotations

import threading

import numpy as np
from episode_timing_check import store_timing_problems
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from irevla_interfaces.msg import EpisodeEvent, EpisodeStored, StepRecord
from irevla_ros import topics
from irevla_ros.nodes.common import RELIABLE_QOS, msg_to_image, time_to_ns
from irevla_ros.nodes.event_codes import OUTCOME_NAMES
from irevla_ros.store.episode_store import EpisodeStore


def test_three_episodes_are_stored_exactly_as_published(ros_context, sim_graph, spin, tmp_path):
    published: dict[tuple[str, int], StepRecord] = {}
    ends: dict[str, EpisodeEvent] = {}
    emitted: dict[str, int] = {}
    acks: dict[str, EpisodeStored] = {}
    lock = threading.Lock()
    node = Node("e2e_observer", context=ros_context)

    def on_step(msg: StepRecord) -> None:
        with lock:
            published[(msg.episode_id, msg.step_index)] = msg

    def on_event(msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.END:
            ends[msg.episode_id] = msg
        elif msg.type == EpisodeEvent.STEPS_DONE:
            emitted[msg.episode_id] = msg.num_steps

    node.create_subscription(StepRecord, topics.STEP_RECORDS, on_step, RELIABLE_QOS)
    node.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, on_event, RELIABLE_QOS)
    node.create_subscription(
        EpisodeStored, topics.EPISODE_STORED, lambda m: acks.__setitem__(m.episode_id, m), RELIABLE_QOS
    )
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    # The observer subscribes before the graph starts, so it sees every record from the first one.
    runner = sim_graph(
        "/episode_manager.num_episodes=3", "/episode_manager.episode_timeout=12.0", "/policy.action_noise=0.1"
    )
    finished = spin(executor, lambda: len(acks) >= 3 or runner.poll() is not None, timeout=240)
    logs = "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))
    assert finished and len(acks) >= 3, logs
    codes = runner.stop()
    assert all(code == 0 for code in codes.values()), (codes, logs)
    period_ns = round(float(runner.effective_parameters["/sim_cell"]["control_period"]) * 1e9)
    timing = store_timing_problems(tmp_path / "store", period_ns)
    bad = {name: problems for name, problems in timing.items() if problems}
    assert len(timing) == len(acks) and not bad, "\n".join(f"{n}: {p}" for n, p in bad.items())

    store = EpisodeStore(tmp_path / "store", read_only=True)
    rows = {row.episode_id: row for row in store.list()}
    assert set(acks) <= set(rows)
    for episode_id, ack in acks.items():
        row = rows[episode_id]
        assert row.complete and ack.complete, row.reasons
        assert row.num_steps == ack.num_steps == emitted[episode_id]
        assert row.outcome == OUTCOME_NAMES[ends[episode_id].outcome]
        assert row.label_source == "simulator"
        assert row.source == "expert" and row.task.endswith("-v3") and row.instruction
        record = store.read(episode_id)  # verifies the sha256 of the file
        assert record.sha256 == ack.sha256 == row.sha256
        assert [s.step_index for s in record.steps] == list(range(row.num_steps))
        for step in record.steps:
            sent = published[(episode_id, step.step_index)]
            np.testing.assert_array_equal(step.action, np.asarray(sent.action, dtype=np.float32))
            np.testing.assert_array_equal(
                step.proprioception, np.asarray(sent.proprioception, dtype=np.float32)
            )
            assert step.hold == sent.hold and step.policy_version == sent.policy_version
            assert step.stamp_ns == time_to_ns(sent.header.stamp)
            assert (step.log_prob is None) == (not sent.has_log_prob)
            for name, image in zip(sent.camera_names, sent.images, strict=True):
                np.testing.assert_array_equal(step.images[name], msg_to_image(image))
    # The expert with light noise solves most episodes; the session counted what the store holds.
    assert sum(r.outcome == "success" for r in rows.values()) >= 1
    assert sum(1 for s in store.list() if not s.complete) == 0
    store.close()
    node.destroy_node()
