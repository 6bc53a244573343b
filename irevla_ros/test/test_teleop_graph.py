"""Teleoperated demonstrations through the whole sim graph: a scripted /joy (the simulated operator, or this
test's own publisher) -> teleop_node -> /teleop/command -> policy node (expert_command_topic) -> arm controller,
and the episode stored as a demonstration with exactly the commands sent."""

from __future__ import annotations

import numpy as np
from sensor_msgs.msg import Joy
from teleop_observer import Observer, required_nodes

from irevla_interfaces.msg import ArmCommand
from irevla_ros import topics
from irevla_ros.nodes.common import time_to_ns
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.teleop.mapping import TeleopMapping, command_to_joy

TELEOP_DEMO = (
    "/episode_manager.num_episodes=1",
    "/episode_manager.episode_timeout=2.5",
    "/episode_manager.source=expert",
    "/policy.policy=scripted_expert",
    "/policy.action_noise=0.0",  # as the robot profiles: the operator's command is the demonstration
    f"/policy.expert_command_topic={topics.TELEOP_COMMAND}",
    "/trainer.iterate=false",
)


def _logs(tmp_path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))


def _stored_steps(tmp_path, observer):
    store = EpisodeStore(tmp_path / "store", read_only=True)
    ((episode_id, ack),) = observer.acks.items()
    row = next(r for r in store.list() if r.episode_id == episode_id)
    record = store.read(episode_id)
    store.close()
    assert row.source == "expert" and row.complete and ack.complete, row.reasons
    assert [s.step_index for s in record.steps] == list(range(row.num_steps))
    return episode_id, record.steps


def _leading_hold(steps) -> int:
    """How many ticks at the episode's start held (0 or 1). A sim-time tick waits for the operator's command only
    once the policy has seen one (the simulated operator may be off): under load the very first command can come
    after the first tick, which then holds, as a robot does without a command. Only that first tick may."""
    leading = next(i for i, s in enumerate(steps) if not s.hold)
    assert leading <= 1 and all(not s.intervention for s in steps[:leading]), leading
    return leading


def test_the_simulated_operator_records_a_demonstration_of_the_commands_sent(
    ros_context, sim_graph, spin, tmp_path
):
    observer = Observer(ros_context)
    runner = sim_graph(
        *TELEOP_DEMO,
        "/sim_operator.demonstrate=true",
        required_nodes("/policy", "/trainer", "/arm_controller", "/sim_operator"),
    )
    done = spin(observer.executor, lambda: observer.acks or runner.poll() is not None, timeout=240)
    assert done and observer.acks, _logs(tmp_path)
    codes = runner.stop()
    assert not runner.unclean_exits(codes), runner.unclean_exits(codes)
    episode_id, steps = _stored_steps(tmp_path, observer)
    assert len(steps) >= 5
    for step in steps[_leading_hold(steps) :]:
        sent = observer.teleop[step.stamp_ns]  # the teleop command of the tick's own time
        assert not sent.hold and not step.hold and not step.intervention, step.step_index
        np.testing.assert_array_equal(step.action, np.array([*sent.ee_delta, sent.gripper], dtype=np.float32))
        # ... which is the expert's action of that time, through /joy and back (float32 axes)
        expert = observer.expert[step.stamp_ns]
        np.testing.assert_allclose(step.action, np.clip([*expert.ee_delta, expert.gripper], -1, 1), atol=1e-5)
        assert observer.actions[(episode_id, step.step_index)].hold is False
    observer.close()


RELEASED = range(6, 9)  # steps with the deadman released


def test_releasing_the_deadman_holds_the_arm_from_that_tick(ros_context, sim_graph, spin, tmp_path):
    observer = Observer(ros_context)
    mapping = TeleopMapping(gripper_axis=4)  # the sim profile's
    joy_pub = observer.publisher(Joy, topics.JOY, 10)
    period_ns = 100_000_000

    def scripted_joy(msg: ArmCommand) -> None:
        stamp = time_to_ns(msg.header.stamp)
        starts = [time_to_ns(s.header.stamp) for s in observer.starts.values()]
        step = round((stamp - max(starts)) / period_ns) if starts else -1
        held = step not in RELEASED
        axes, buttons = command_to_joy(mapping, list(msg.ee_delta), float(msg.gripper), enabled=held)
        joy = Joy(axes=axes, buttons=buttons)
        joy.header.stamp = msg.header.stamp
        joy_pub.publish(joy)

    observer.subscribe(ArmCommand, topics.SIM_EXPERT_ACTION, scripted_joy, 100)
    runner = sim_graph(
        *TELEOP_DEMO,
        "/episode_manager.episode_timeout=1.5",
        required_nodes("/policy", "/trainer", "/arm_controller"),
    )
    done = spin(observer.executor, lambda: observer.acks or runner.poll() is not None, timeout=240)
    assert done and observer.acks, _logs(tmp_path)
    runner.stop()
    episode_id, steps = _stored_steps(tmp_path, observer)
    assert len(steps) > max(RELEASED) + 1, len(steps)
    for step in steps[_leading_hold(steps) :]:
        released = step.step_index in RELEASED
        assert step.hold == released, step.step_index
        assert observer.actions[(episode_id, step.step_index)].hold == released
        if released:
            np.testing.assert_array_equal(step.action, np.zeros(4, dtype=np.float32))
    observer.close()


def test_every_profile_runs_teleop_and_the_sim_operator_maps_like_it():
    from irevla_ros.bringup.graph import HARDWARE_PROFILES, collect_graph, validate_graph
    from irevla_ros.param_spec import parameter_specs

    for hardware in HARDWARE_PROFILES:
        graph = collect_graph(hardware)
        names = {n.fully_qualified_name for n in graph.nodes()}
        assert "/teleop" in names and ("/sim_operator" in names) == (hardware == "sim"), hardware
    effective = validate_graph(collect_graph("sim"))
    for spec in parameter_specs(TeleopMapping):  # the inverse mapping is exact only with the same mapping
        assert effective["/teleop"][spec.name] == effective["/sim_operator"][spec.name], spec.name
    assert effective["/teleop"]["gripper_axis"] == 4  # the expert's continuous gripper, not buttons
    assert effective["/policy"]["expert_command_topic"] == topics.SIM_EXPERT_ACTION  # the demo as before
