"""Operator takeover mid-episode and hand-back, through the whole sim graph: the simulated operator's /joy ->
teleop_node -> /teleop/command -> policy node (command source switched at a tick) -> arm controller."""

from __future__ import annotations

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from teleop_observer import Observer, required_nodes

from irevla_ros import topics
from irevla_ros.store.episode_store import EpisodeStore

START, STEPS = 4, 6  # the operator holds the arm for steps 4..9 of each policy episode


def _logs(tmp_path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))


def test_takeover_and_hand_back_at_exact_ticks(ros_context, sim_graph, spin, tmp_path):
    observer = Observer(ros_context)
    status: list[dict[str, str]] = []
    observer.node.create_subscription(
        DiagnosticArray,
        topics.POLICY_STATUS,
        lambda m: status.append({kv.key: kv.value for kv in m.status[0].values}),
        10,
    )
    runner = sim_graph(
        "/episode_manager.num_episodes=2",
        "/episode_manager.episode_timeout=2.0",
        "/episode_manager.source=policy",
        "/episode_manager.success_source=none",  # the expert could succeed during the takeover: fixed length
        required_nodes("/policy", "/trainer", "/arm_controller", "/sim_operator"),
        "/policy.policy=random",
        # as the robot profiles set it (for their demonstration sessions): a policy still takes teleop as takeovers
        f"/policy.expert_command_topic={topics.TELEOP_COMMAND}",
        "/trainer.iterate=false",
        "/sim_operator.takeover_probability=1.0",
        f"/sim_operator.takeover_start={START}",
        f"/sim_operator.takeover_steps={STEPS}",
    )
    done = spin(observer.executor, lambda: len(observer.acks) >= 2 or runner.poll() is not None, timeout=240)
    assert done and len(observer.acks) >= 2, _logs(tmp_path)
    # The policy's status is periodic: the one that counts the second takeover's last step may come a tick later.
    spin(
        observer.executor,
        lambda: any(
            int(s.get("takeovers", 0)) >= 2 and int(s.get("intervention_steps", 0)) >= 2 * STEPS
            for s in status
        ),
        timeout=10,
    )
    codes = runner.stop()
    assert not runner.unclean_exits(codes), runner.unclean_exits(codes)
    store = EpisodeStore(tmp_path / "store", read_only=True)
    rows = {r.episode_id: r for r in store.list()}
    for episode_id in observer.acks:
        record = store.read(episode_id)
        row = rows[episode_id]
        assert row.source == "policy" and row.complete, row.reasons
        # consecutive ticks, none missed or doubled, one control period apart
        assert [s.step_index for s in record.steps] == list(range(len(record.steps)))
        assert np.all(np.diff([s.stamp_ns for s in record.steps]) == 100_000_000)
        flags = [s.intervention for s in record.steps]
        assert flags == [START <= i < START + STEPS for i in range(len(flags))], flags
        for step in record.steps:
            sent = observer.records[(episode_id, step.step_index)]
            assert sent.intervention == step.intervention
            if step.intervention:  # the operator's command of that tick, which is the expert's
                teleop = observer.teleop[step.stamp_ns]
                np.testing.assert_array_equal(
                    step.action, np.array([*teleop.ee_delta, teleop.gripper], dtype=np.float32)
                )
                expert = observer.expert[step.stamp_ns]
                np.testing.assert_allclose(
                    step.action, np.clip([*expert.ee_delta, expert.gripper], -1, 1), atol=1e-5
                )
                assert step.log_prob is None
            else:
                assert step.log_prob is not None  # the random policy's own step
        if getattr(row, "intervention_steps", None) is not None:
            assert (row.interventions, row.intervention_steps) == (1, STEPS)
    store.close()
    last = status[-1]
    assert int(last["takeovers"]) == len(observer.acks) and int(last["intervention_steps"]) == STEPS * len(
        observer.acks
    ), last
    observer.close()
