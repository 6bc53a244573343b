"""The session state machine, without ROS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from irevla_ros.policies import UnknownPolicyError, make_policy_slot_parts
from irevla_ros.policies.base import Observation, PolicyError
from irevla_ros.policies.scripted import EXPERT_ACTION_KEY, ScriptedExpertPolicy
from irevla_ros.session import Session, SessionConfig, SessionState, TransitionError


def started(config: SessionConfig | None = None) -> Session:
    session = Session(config or SessionConfig(tasks=["a", "b"], episode_timeout=5.0))
    session.request_reset(0.0)
    session.reset_done(0.5, "a", "do a")
    return session


def test_reset_then_auto_start_cycles_tasks():
    session = Session(SessionConfig(tasks=["a", "b"]))
    assert session.state is SessionState.IDLE
    events = session.request_reset(0.0)
    assert [e.type for e in events] == ["reset_requested"] and session.wants_reset
    assert session.next_task() == "a"
    events = session.reset_done(1.0, "a", "do a")
    assert [e.type for e in events] == ["reset_done", "start"]
    assert session.state is SessionState.RUNNING and events[1].task == "a" and events[1].instruction == "do a"
    assert events[1].scene_seed == -1 == session.episode.scene_seed  # no simulator seed: a robot's homing
    assert session.next_task() == "b"


def test_start_carries_the_scene_seed_of_its_reset():
    session = Session(SessionConfig(tasks=["a", "b"], episode_timeout=1.0))
    session.request_reset(0.0)
    start = session.reset_done(0.5, "a", "do a", scene_seed=2**40 + 7)[-1]
    assert (start.type, start.scene_seed, session.episode.scene_seed) == ("start", 2**40 + 7, 2**40 + 7)
    [end] = session.tick(2.0, sim_success=False)
    assert end.scene_seed == -1  # only START says it
    session.tick(2.1, sim_success=False)
    assert session.reset_done(2.5, "b", "do b", scene_seed=0)[-1].scene_seed == 0  # seed 0 is a seed


def test_simulator_success_ends_episode_then_resets():
    session = started()
    [end] = session.tick(1.0, sim_success=True)
    assert (end.type, end.outcome, end.label_source) == ("end", "success", "simulator")
    assert session.state is SessionState.AWAITING_LABEL  # label_wait 0: the next tick moves on
    [reset] = session.tick(1.05, sim_success=False)
    assert reset.type == "reset_requested" and session.wants_reset
    assert session.counters.successes == 1 and session.counters.success_rate == 1.0


def test_timeout_uses_ros_time():
    session = started()
    assert session.tick(5.4, sim_success=False) == []
    [end] = session.tick(5.5, sim_success=False)
    assert end.outcome == "timeout"


def test_operator_label_overrides_automatic_one_after_the_end():
    session = started(SessionConfig(tasks=["a"], label_wait=2.0))
    [end] = session.tick(1.0, sim_success=True)  # waits for an operator label
    assert end.outcome == "success" and session.state is SessionState.AWAITING_LABEL
    events = session.operator_label(1.5, "failure")
    assert (
        events[0].type == "label" and events[0].outcome == "failure" and events[0].label_source == "operator"
    )
    assert session.counters.successes == 0 and session.counters.done == 1
    assert session.wants_reset  # the label closed the waiting period


def test_operator_ends_a_running_episode_and_pause_aborts():
    session = started()
    [end] = session.operator_label(1.0, "success")
    assert (end.outcome, end.label_source) == ("success", "operator")
    session.tick(1.1, sim_success=False)
    session.reset_done(2.0, "b", "do b")
    [aborted] = session.pause(2.5)
    assert aborted.outcome == "aborted" and session.state is SessionState.PAUSED
    with pytest.raises(TransitionError):
        session.request_reset(3.0)
    assert [e.type for e in session.resume(3.0)] == ["reset_requested"]


def test_num_episodes_finishes_the_session():
    session = started(SessionConfig(tasks=["a"], num_episodes=1))
    assert [e.type for e in session.tick(1.0, sim_success=True)] == ["end"]
    assert session.tick(1.1, sim_success=False) == []
    assert session.finished and session.state is SessionState.IDLE and not session.wants_reset


def test_bad_operator_input_is_refused():
    session = Session(SessionConfig(tasks=["a"]))
    with pytest.raises(TransitionError):
        session.operator_label(0.0, "success")
    with pytest.raises(ValueError):
        session.operator_label(0.0, "maybe")
    with pytest.raises(ValueError):
        Session(SessionConfig(tasks=[]))


def _obs(expert: np.ndarray | None) -> Observation:
    extras = {} if expert is None else {EXPERT_ACTION_KEY: expert}
    return Observation({}, np.zeros(4, np.float32), "press", 0.0, extras)


def test_scripted_expert_noise_and_log_prob():
    expert = np.array([0.2, -0.3, 0.1, 1.0], np.float32)
    assert np.allclose(ScriptedExpertPolicy(0.0).act(_obs(expert)).action, expert)
    policy = ScriptedExpertPolicy(noise_std=0.1, seed=1)
    out = policy.act(_obs(expert))
    noise = np.random.default_rng(1).normal(0, 0.1, 4)
    expected = -0.5 * np.sum((noise / 0.1) ** 2) - 4 * math.log(0.1 * math.sqrt(2 * math.pi))
    assert out.log_prob == pytest.approx(expected)
    assert np.allclose(out.action, np.clip(expert + noise, -1, 1))
    with pytest.raises(PolicyError):
        policy.act(_obs(None))
    with pytest.raises(PolicyError):
        policy.act(_obs(np.array([np.nan, 0, 0, 0], np.float32)))


def test_policy_registry():
    params = {"action_noise": 0.0, "seed": 0}
    policy, loader = make_policy_slot_parts({**params, "policy": "random"})
    action = policy.act(_obs(None)).action
    assert action.shape == (4,) and np.all(np.abs(action) <= 1) and loader is None
    with pytest.raises(
        UnknownPolicyError, match="unknown policy 'magic'; known policies: scripted_expert, random, vla"
    ):
        make_policy_slot_parts({**params, "policy": "magic"})
