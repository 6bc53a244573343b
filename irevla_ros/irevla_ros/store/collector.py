"""Closing episodes from the streams a graph delivers in no common order, without ROS.

Three producers talk about one episode: the episode manager (START, END with outcome and label source, later
LABELs), the policy node (one step record per tick, then STEPS_DONE with how many it emitted) and the network
between them (steps may overtake their START, arrive twice or late). The collector turns that into assembled
episodes:

- steps that arrive before their START are held for `grace_s`, then given to the episode (or rejected: never
  started);
- an episode is finalised when END and STEPS_DONE are in and every record arrived, or `grace_s` after the first
  of END / STEPS_DONE with records still missing (stored incomplete, never dropped);
- END without STEPS_DONE (the producer died) is finalised as incomplete after `steps_done_timeout_s`;
- a label for an episode not yet finalised is applied by `label_wins` (an operator label beats an automatic one);
  for an episode already handed over, `label` returns False and the caller relabels the stored one;
- `shutdown` hands over every episode still open, as incomplete unless it had fully ended.

The arm's state is not in the step records: the trainer hands the collector what it hears on /joint_states and
/tf (`add_joint_state`, `add_transforms`), and each finalised step carries the newest sample stamped no later than
the step (`RobotStateWindow`), so the stored file replays those topics as they were.

Thread-safe; time comes from `clock` (monotonic seconds) and `wall_ns` (stamps), so tests drive it by hand.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.records import (
    AssembledEpisode,
    EpisodeMeta,
    JointStateSample,
    StepData,
    TransformSample,
    label_wins,
)

GRACE_S = 3.0  # wall seconds to wait for in-flight records (and for the START of early steps)
STEPS_DONE_TIMEOUT_S = 10.0  # wall seconds after END before an episode without STEPS_DONE is stored
# A step gets no arm state when the newest sample before it is older than this (the arm's driver was silent).
STATE_MAX_AGE_NS = 1_000_000_000
# Samples kept: at a robot's 100 Hz state rate 20000 cover 200 s, longer than an episode plus its closing.
STATE_WINDOW = 20_000


class RobotStateWindow:
    """The most recent /joint_states and /tf samples, by stamp; `at(stamp)` is the state a step had.

    Samples may arrive in any order (stamps sort them). Thread-safe."""

    def __init__(self, maxlen: int = STATE_WINDOW, max_age_ns: int = STATE_MAX_AGE_NS) -> None:
        self._lock = threading.Lock()
        self._joints: deque[JointStateSample] = deque(maxlen=maxlen)
        self._tf: dict[tuple[str, str], deque[TransformSample]] = {}
        self._maxlen = maxlen
        self.max_age_ns = max_age_ns

    def add_joint_state(self, sample: JointStateSample) -> None:
        with self._lock:
            self._joints.append(sample)

    def add_transforms(self, samples: Iterable[TransformSample]) -> None:
        with self._lock:
            for t in samples:
                self._tf.setdefault((t.parent_frame, t.child_frame), deque(maxlen=self._maxlen)).append(t)

    def attach(self, steps: list[StepData]) -> list[StepData]:
        """`steps` with the joint state and transforms each had at its stamp (steps already carrying them, and
        steps with nothing recent enough, unchanged)."""
        with self._lock:
            joints = sorted(self._joints, key=lambda s: s.stamp_ns)
            tf = {pair: sorted(q, key=lambda s: s.stamp_ns) for pair, q in self._tf.items()}
        joint_stamps = [s.stamp_ns for s in joints]
        tf_stamps = {pair: [s.stamp_ns for s in q] for pair, q in tf.items()}
        out = []
        for step in steps:
            changes: dict[str, object] = {}
            if step.joint_state is None:
                i = bisect.bisect_right(joint_stamps, step.stamp_ns)
                if i and step.stamp_ns - joint_stamps[i - 1] <= self.max_age_ns:
                    changes["joint_state"] = joints[i - 1]
            if not step.transforms:
                found = []
                for pair in sorted(tf):
                    i = bisect.bisect_right(tf_stamps[pair], step.stamp_ns)
                    if i and step.stamp_ns - tf_stamps[pair][i - 1] <= self.max_age_ns:
                        found.append(tf[pair][i - 1])
                if found:
                    changes["transforms"] = tuple(found)
            out.append(dataclasses.replace(step, **changes) if changes else step)  # type: ignore[arg-type]
        return out


@dataclass
class _Closing:
    since: float | None = None  # when the first of END / STEPS_DONE arrived (a LABEL may come first)
    ended: bool = False
    ended_at: float = 0.0
    outcome: str = "unknown"
    label_source: str = "none"
    num_steps: int | None = None
    ended_ns: int = 0


@dataclass
class _Early:
    first: float
    steps: list[StepData] = field(default_factory=list)


def _incomplete(episode: AssembledEpisode, reason: str) -> AssembledEpisode:
    return dataclasses.replace(episode, complete=False, reasons=[*episode.reasons, reason])


class EpisodeCollector:
    def __init__(
        self,
        assembler: EpisodeAssembler | None = None,
        *,
        grace_s: float = GRACE_S,
        steps_done_timeout_s: float = STEPS_DONE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        log: Callable[[str], None] | None = None,
        state: RobotStateWindow | None = None,
    ) -> None:
        self.assembler = assembler if assembler is not None else EpisodeAssembler()
        self.state = state if state is not None else RobotStateWindow()
        self.grace_s = grace_s
        self.steps_done_timeout_s = steps_done_timeout_s
        self._clock = clock
        self._wall_ns = wall_ns
        self._log = log or (lambda message: None)
        self._lock = threading.Lock()
        self._closing: dict[str, _Closing] = {}
        self._early: dict[str, _Early] = {}
        self.rejected_steps = 0

    # --- inputs ---------------------------------------------------------------------------------------------
    def add_joint_state(self, sample: JointStateSample) -> None:
        """A /joint_states message: stored with the steps it is the newest sample of."""
        self.state.add_joint_state(sample)

    def add_transforms(self, samples: Iterable[TransformSample]) -> None:
        """The transforms of a /tf message."""
        self.state.add_transforms(samples)

    def add_step(self, step: StepData) -> None:
        """A step record. Raises ValueError (LateStepError, ...) when it cannot be part of an episode."""
        with self._lock:
            eid = step.episode_id
            known = self.assembler.is_open(eid) or self.assembler.has_ended(eid) or eid in self._closing
            if not known:
                # Steps may overtake their episode's START (different topics have no common order).
                self._early.setdefault(eid, _Early(self._clock())).steps.append(step)
                return
            try:
                self.assembler.add_step(step)
            except ValueError:
                self.rejected_steps += 1
                raise

    def start(self, meta: EpisodeMeta) -> None:
        """START: opens the episode and gives it the steps that came first. Raises ValueError when START
        contradicts what is known (already ended, other metadata)."""
        with self._lock:
            self.assembler.start(meta)
            early = self._early.pop(meta.episode_id, None)
            for step in early.steps if early else ():
                self.assembler.add_step(step)

    def end(self, episode_id: str, outcome: str, label_source: str) -> None:
        with self._lock:
            closing = self._closing_of(episode_id, started_closing=True)
            if closing.ended:
                self._log(f"second END for episode {episode_id!r} ignored")
                return
            closing.ended, closing.ended_at, closing.ended_ns = True, self._clock(), self._wall_ns()
            self._apply_label(closing, outcome, label_source)

    def steps_done(self, episode_id: str, num_steps: int) -> None:
        with self._lock:
            self._closing_of(episode_id, started_closing=True).num_steps = int(num_steps)

    def label(self, episode_id: str, outcome: str, label_source: str) -> bool:
        """A LABEL. True: applied to (or outranked in) an episode not handed over yet. False: the episode is not
        here any more (or never was): the caller relabels it in the store."""
        with self._lock:
            closing = self._closing.get(episode_id)
            if closing is None and not self.assembler.is_open(episode_id):
                return False
            if closing is None:
                closing = self._closing_of(episode_id)
            self._apply_label(closing, outcome, label_source)
            return True

    # --- outputs --------------------------------------------------------------------------------------------
    def poll(self) -> list[AssembledEpisode]:
        """The episodes ready to be stored now (call it periodically)."""
        now = self._clock()
        ready: list[AssembledEpisode] = []
        with self._lock:
            for episode_id, early in list(self._early.items()):
                if now - early.first > self.grace_s:
                    del self._early[episode_id]
                    self.rejected_steps += len(early.steps)
                    self._log(
                        f"{len(early.steps)} step(s) for episode {episode_id!r} rejected: it was never started"
                    )
            for episode_id, closing in list(self._closing.items()):
                if not self.assembler.is_open(episode_id):
                    if closing.ended:
                        del self._closing[episode_id]
                        self._log(f"END for unknown episode {episode_id!r} ignored")
                    elif closing.since is None or now - closing.since > self.grace_s:
                        del self._closing[episode_id]  # no END will ever finalise it: do not keep it forever
                        self._log(f"STEPS_DONE for unknown or already stored episode {episode_id!r} ignored")
                    continue
                if not closing.ended:
                    continue
                if closing.num_steps is None:
                    if now - closing.ended_at < self.steps_done_timeout_s:
                        continue
                    episode = self._finish(episode_id, closing)
                    ready.append(
                        _incomplete(
                            episode,
                            f"the producer never reported its step count (no STEPS_DONE within "
                            f"{self.steps_done_timeout_s:g} s of END)",
                        )
                    )
                    continue
                received = self.assembler.received_steps(episode_id)
                waited = now - (closing.since if closing.since is not None else now)
                if received < closing.num_steps and waited < self.grace_s:
                    continue
                ready.append(self._finish(episode_id, closing))
        return ready

    def shutdown(self) -> list[AssembledEpisode]:
        """Every episode still open, handed over now: an accepted step is never dropped because the node stops.
        One that had not ended is stored as aborted and incomplete."""
        out: list[AssembledEpisode] = []
        with self._lock:
            for episode_id in self.assembler.open_episode_ids():
                closing = self._closing_of(episode_id)
                if not closing.ended:
                    if closing.label_source == "none":  # an operator's label given before END still holds
                        closing.outcome = "aborted"
                    closing.ended_ns = self._wall_ns()
                episode = self._finish(episode_id, closing)
                if not closing.ended:
                    episode = _incomplete(episode, "the trainer stopped before the episode ended")
                out.append(episode)
            self._closing.clear()
            self.rejected_steps += sum(len(e.steps) for e in self._early.values())
            self._early.clear()
        return out

    def pending(self) -> int:
        """Episodes open or closing (not handed over yet)."""
        return len(self.assembler.open_episode_ids())

    # --- internals ------------------------------------------------------------------------------------------
    def _closing_of(self, episode_id: str, *, started_closing: bool = False) -> _Closing:
        closing = self._closing.get(episode_id)
        if closing is None:
            closing = self._closing[episode_id] = _Closing()
        if started_closing and closing.since is None:
            closing.since = self._clock()
        return closing

    @staticmethod
    def _apply_label(closing: _Closing, outcome: str, label_source: str) -> None:
        if label_wins(label_source, closing.label_source):
            closing.outcome, closing.label_source = outcome, label_source

    def _finish(self, episode_id: str, closing: _Closing) -> AssembledEpisode:
        self._closing.pop(episode_id, None)
        episode = self.assembler.end(
            episode_id, closing.outcome, closing.label_source, closing.num_steps, closing.ended_ns
        )
        return dataclasses.replace(episode, steps=self.state.attach(episode.steps))
