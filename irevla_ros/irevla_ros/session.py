"""The operator-supervised session as a state machine, without ROS: the episode manager node feeds it time,
the simulator's success signal and operator input, and publishes the events it returns.

    IDLE --reset--> RESETTING --reset done--> RUNNING --success/timeout/operator--> AWAITING_LABEL --> RESETTING ...
    any state --pause--> PAUSED --resume--> the state it left (a running episode is aborted on pause)

An operator label always overrides an automatic one, including after the episode has ended.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class SessionState(Enum):
    IDLE = 0
    RESETTING = 1
    RUNNING = 2
    AWAITING_LABEL = 3
    PAUSED = 4


OUTCOMES = ("success", "failure", "timeout", "aborted")
LABEL_SOURCES = ("operator", "simulator", "classifier")


@dataclass
class SessionEvent:
    type: str  # start, end, label, reset_requested, reset_done
    episode_id: str = ""
    outcome: str = ""
    label_source: str = ""
    task: str = ""
    instruction: str = ""
    note: str = ""
    scene_seed: int = -1  # start: the simulator's layout seed of the scene; -1: none (a robot)


@dataclass
class EpisodeInfo:
    episode_id: str
    task: str
    instruction: str
    started: float
    scene_seed: int = -1
    ended: float | None = None
    outcome: str = ""
    label_source: str = ""


@dataclass
class SessionConfig:
    tasks: Sequence[str]
    episode_timeout: float = 15.0
    label_wait: float = 0.0
    num_episodes: int = 0  # 0: unlimited
    auto_start: bool = True
    success_source: str = "simulator"  # or "none": only the operator decides


@dataclass
class SessionCounters:
    started: int = 0
    done: int = 0
    successes: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)  # episode id -> outcome

    @property
    def success_rate(self) -> float:
        return self.successes / self.done if self.done else 0.0


class TransitionError(RuntimeError):
    """An operator request that does not apply in the current state (reported, state unchanged)."""


class Session:
    def __init__(self, config: SessionConfig) -> None:
        if not config.tasks:
            raise ValueError("session needs at least one task")
        self.config = config
        self.state = SessionState.IDLE
        self.episode: EpisodeInfo | None = None
        self.last: EpisodeInfo | None = None
        self.counters = SessionCounters()
        self._paused_from = SessionState.IDLE
        self._next_task = 0
        self.finished = False
        self.pending_task: tuple[str, str, int] | None = None  # task, instruction, scene seed of the reset

    # --- what the node asks -----------------------------------------------------------------------------------
    @property
    def wants_reset(self) -> bool:
        """True while the node should (keep) running a reset; it calls reset_done() when it completes."""
        return self.state is SessionState.RESETTING

    def next_task(self) -> str:
        return self.config.tasks[self._next_task % len(self.config.tasks)]

    # --- inputs -------------------------------------------------------------------------------------------------
    def request_reset(self, now: float, note: str = "") -> list[SessionEvent]:
        if self.state is SessionState.PAUSED:
            raise TransitionError("session is paused: resume first")
        if self.finished:
            self.finished = False
            self.counters.started = 0  # a new batch of num_episodes
        events = (
            self._end(now, "aborted", "operator", "reset during episode")
            if self.state is SessionState.RUNNING
            else []
        )
        self.state = SessionState.RESETTING
        return [*events, SessionEvent("reset_requested", note=note)]

    def reset_done(self, now: float, task: str, instruction: str, scene_seed: int = -1) -> list[SessionEvent]:
        """The reset finished: `scene_seed` is the layout seed the simulator reset with (-1: none, a robot)."""
        if self.state is not SessionState.RESETTING:
            return []
        self._next_task += 1
        self.pending_task = (task, instruction, int(scene_seed))
        events = [SessionEvent("reset_done", task=task, instruction=instruction)]
        if self.config.auto_start:
            events += self.start(now)
        else:
            self.state = SessionState.IDLE
        return events

    def start(self, now: float) -> list[SessionEvent]:
        task, instruction, seed = self.pending_task or (self.next_task(), "", -1)
        self.pending_task = None
        if self.state not in (SessionState.IDLE, SessionState.RESETTING):
            raise TransitionError(f"cannot start an episode while {self.state.name}")
        self.episode = EpisodeInfo(
            f"ep-{uuid.uuid4().hex[:12]}", task, instruction, started=now, scene_seed=seed
        )
        self.counters.started += 1
        self.state = SessionState.RUNNING
        return [
            SessionEvent(
                "start", self.episode.episode_id, task=task, instruction=instruction, scene_seed=seed
            )
        ]

    def tick(self, now: float, sim_success: bool) -> list[SessionEvent]:
        if self.state is SessionState.RUNNING and self.episode is not None:
            if self.config.success_source == "simulator" and sim_success:
                return self._end(now, "success", "simulator")
            if now - self.episode.started >= self.config.episode_timeout:
                return self._end(
                    now, "timeout", "simulator" if self.config.success_source == "simulator" else "operator"
                )
        if (
            self.state is SessionState.AWAITING_LABEL
            and self.last is not None
            and self.last.ended is not None
        ) and now - self.last.ended >= self.config.label_wait:
            return self._after_episode(now)
        return []

    def operator_label(self, now: float, outcome: str) -> list[SessionEvent]:
        if outcome not in ("success", "failure"):
            raise ValueError(f"operator outcome must be success or failure, got {outcome!r}")
        if self.state is SessionState.RUNNING:
            return self._end(now, outcome, "operator")
        if self.last is None:
            raise TransitionError("no episode to label yet")
        previous = self.last.outcome
        self.last.outcome, self.last.label_source = outcome, "operator"
        self._count(self.last, previous)
        events = [SessionEvent("label", self.last.episode_id, outcome, "operator")]
        if self.state is SessionState.AWAITING_LABEL:
            events += self._after_episode(now)
        return events

    def pause(self, now: float) -> list[SessionEvent]:
        if self.state is SessionState.PAUSED:
            return []
        events = self._end(now, "aborted", "operator", "paused") if self.state is SessionState.RUNNING else []
        self._paused_from = SessionState.IDLE if events else self.state
        self.state = SessionState.PAUSED
        return events

    def resume(self, now: float) -> list[SessionEvent]:
        if self.state is not SessionState.PAUSED:
            return []
        self.state = self._paused_from
        if self.state is SessionState.IDLE and not self.finished:
            return self.request_reset(now, "resume")
        return []

    # --- internals ----------------------------------------------------------------------------------------------
    def _end(self, now: float, outcome: str, source: str, note: str = "") -> list[SessionEvent]:
        assert self.episode is not None
        episode, self.episode = self.episode, None
        episode.ended, episode.outcome, episode.label_source = now, outcome, source
        self.last = episode
        self.counters.done += 1
        self._count(episode, None)
        self.state = SessionState.AWAITING_LABEL
        return [
            SessionEvent("end", episode.episode_id, outcome, source, episode.task, episode.instruction, note)
        ]

    def _count(self, episode: EpisodeInfo, previous: str | None) -> None:
        if previous == "success":
            self.counters.successes -= 1
        if episode.outcome == "success":
            self.counters.successes += 1
        self.counters.outcomes[episode.episode_id] = episode.outcome

    def _after_episode(self, now: float) -> list[SessionEvent]:
        limit = self.config.num_episodes
        if limit and self.counters.started >= limit:
            self.state = SessionState.IDLE
            self.finished = True
            return []
        self.state = SessionState.IDLE
        return self.request_reset(now, "next episode")
