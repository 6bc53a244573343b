"""The episode-closing protocol without DDS: plain step records and events in any order, a hand-driven clock."""

from __future__ import annotations

import numpy as np
import pytest

from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.collector import EpisodeCollector
from irevla_ros.store.errors import EpisodeStateError, LateStepError
from irevla_ros.store.records import EpisodeMeta, InvalidRecordError, StepData, label_wins

PERIOD = 100_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def meta(eid: str) -> EpisodeMeta:
    return EpisodeMeta(eid, "button-press-v3", "press the button", "v0001-x", "policy", started_ns=1)


def step(eid: str, index: int, action: float = 0.0) -> StepData:
    stamp = 10**9 + index * PERIOD
    return StepData(
        episode_id=eid,
        step_index=index,
        stamp_ns=stamp,
        images={"corner": np.full((4, 4, 3), index, np.uint8)},
        image_stamps_ns={"corner": stamp},
        proprioception=np.zeros(4, np.float32),
        proprioception_names=["x", "y", "z", "gripper"],
        instruction="press the button",
        action=np.full(4, action, np.float32),
        log_prob=-1.0,
        value=None,
        policy_version="v0001-x",
        intervention=False,
        hold=False,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logged() -> list[str]:
    return []


@pytest.fixture
def collector(clock: Clock, logged: list[str]) -> EpisodeCollector:
    return EpisodeCollector(
        EpisodeAssembler(control_period_ns=PERIOD),
        grace_s=3.0,
        steps_done_timeout_s=10.0,
        clock=clock,
        wall_ns=lambda: 5 * 10**9,
        log=logged.append,
    )


def test_early_and_out_of_order_steps_make_a_complete_episode(collector, clock):
    collector.add_step(step("a", 2))  # before START: held
    collector.add_step(step("a", 0))
    collector.start(meta("a"))
    for i in (4, 1, 3):
        collector.add_step(step("a", i))
    collector.end("a", "success", "simulator")
    assert collector.poll() == []  # no STEPS_DONE yet
    collector.steps_done("a", 5)
    (episode,) = collector.poll()
    assert episode.complete, episode.reasons
    assert [s.step_index for s in episode.steps] == [0, 1, 2, 3, 4]
    assert (
        episode.out_of_order == 3 and episode.meta.outcome == "success" and episode.meta.ended_ns == 5 * 10**9
    )
    assert collector.poll() == [] and collector.pending() == 0
    with pytest.raises(LateStepError):
        collector.add_step(step("a", 5))
    assert collector.rejected_steps == 1


def test_duplicates_identical_dropped_conflicting_mark_incomplete(collector):
    collector.start(meta("d"))
    for record in (step("d", 0), step("d", 1), step("d", 1), step("d", 2), step("d", 2, action=0.5)):
        collector.add_step(record)
    collector.steps_done("d", 3)
    collector.end("d", "failure", "simulator")
    (episode,) = collector.poll()
    assert episode.duplicates_dropped == 1 and episode.conflicting_duplicates == 1
    assert not episode.complete and "conflicting duplicates at step indices 2" in episode.reasons[0]
    assert episode.steps[2].action[0] == 0.0  # the first arrival is kept


def test_records_still_missing_after_the_grace_period_are_stored_incomplete(collector, clock):
    collector.start(meta("g"))
    for i in (0, 1, 3):
        collector.add_step(step("g", i))
    collector.steps_done("g", 5)
    clock.now = 1.0
    collector.end("g", "timeout", "simulator")
    clock.now = 2.9
    assert collector.poll() == []  # waiting for steps 2 and 4 in flight
    collector.add_step(step("g", 2))
    clock.now = 3.1  # grace counts from the first of STEPS_DONE / END
    (episode,) = collector.poll()
    assert not episode.complete
    assert episode.reasons == [
        "missing step indices 4 (1 of 5)",
        "received 4 distinct steps but the producer reported 5",
    ]


def test_end_without_steps_done_is_stored_incomplete_after_its_timeout(collector, clock):
    collector.start(meta("m"))
    for i in range(3):
        collector.add_step(step("m", i))
    collector.end("m", "success", "simulator")
    clock.now = 9.9
    assert collector.poll() == []
    clock.now = 10.1
    (episode,) = collector.poll()
    assert not episode.complete and len(episode.steps) == 3
    assert "no STEPS_DONE within 10 s of END" in episode.reasons[-1]


def test_shutdown_mid_episode_stores_everything_accepted(collector, clock, logged):
    collector.start(meta("open"))
    collector.add_step(step("open", 0))
    collector.start(meta("closing"))
    collector.add_step(step("closing", 0))
    collector.end("closing", "success", "simulator")
    collector.steps_done("closing", 2)  # step 1 still in flight
    collector.add_step(step("never-started", 0))
    assert collector.poll() == []
    episodes = {e.meta.episode_id: e for e in collector.shutdown()}
    assert set(episodes) == {"open", "closing"}
    assert episodes["open"].meta.outcome == "aborted" and not episodes["open"].complete
    assert episodes["open"].reasons[-1] == "the trainer stopped before the episode ended"
    assert episodes["closing"].meta.outcome == "success" and not episodes["closing"].complete
    assert collector.rejected_steps == 1 and collector.pending() == 0


def test_steps_and_events_of_unknown_episodes_are_rejected_after_grace(collector, clock, logged):
    collector.add_step(step("ghost", 0))
    collector.add_step(step("ghost", 1))
    collector.end("nobody", "success", "simulator")
    collector.steps_done("nobody-done", 3)
    clock.now = 3.5
    assert collector.poll() == []
    assert "2 step(s) for episode 'ghost' rejected: it was never started" in logged
    assert "END for unknown episode 'nobody' ignored" in logged
    assert "STEPS_DONE for unknown or already stored episode 'nobody-done' ignored" in logged
    assert collector.rejected_steps == 2
    collector.start(meta("s"))
    with pytest.raises(EpisodeStateError):
        collector.start(EpisodeMeta("s", "other-task", "x", "v", "policy", started_ns=1))


def test_operator_label_wins_in_the_collector(collector):
    collector.start(meta("l"))
    collector.add_step(step("l", 0))
    collector.steps_done("l", 2)  # step 1 still in flight
    collector.end("l", "success", "simulator")
    assert collector.label("l", "failure", "operator")
    assert collector.label("l", "success", "classifier")  # an automatic label after the operator's: outranked
    collector.add_step(step("l", 1))
    (episode,) = collector.poll()
    assert (episode.meta.outcome, episode.meta.label_source) == ("failure", "operator")
    assert not collector.label("l", "success", "operator")  # handed over: the caller relabels the store


def test_operator_label_before_end_is_not_overwritten_by_end(collector):
    collector.start(meta("e"))
    collector.add_step(step("e", 0))
    assert collector.label("e", "failure", "operator")
    collector.end("e", "success", "simulator")
    collector.steps_done("e", 1)
    (episode,) = collector.poll()
    assert (episode.meta.outcome, episode.meta.label_source) == ("failure", "operator")


def test_label_rule():
    assert label_wins("operator", "simulator") and label_wins("operator", "operator")
    assert not label_wins("simulator", "operator") and not label_wins("classifier", "operator")
    assert label_wins("simulator", "classifier") and label_wins("simulator", "none")
    with pytest.raises(InvalidRecordError, match="label_source 'robot'"):
        label_wins("robot", "none")
