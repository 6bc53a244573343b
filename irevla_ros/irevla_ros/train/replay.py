"""Replay of a stored episode's recorded actions, open loop, and how the replay compares with the recording.

An episode is read only through `EpisodeStore` into a `ReplayPlan`: one row per step index from 0 to the last
recorded one (the action, whether it was a hold, the proprioception observed before it). `replay_in_sim` plays
the plan in the simulated cell through the direct rollout (`rollout.run_episode`: the same observation, the
same SafetyLayer conversion and the same end rule as the node graph), with a policy that returns the recorded
action of each step, and compares per step the replayed end effector with the recorded proprioception, and the
replay's outcome (simulator success) with the stored one. The robot replay (`operator/replay_robot.py`) plays
the same plan through a running graph's arm controller.

The scene. Every simulated episode records the layout seed its reset used (the sim cell draws one when the
episode manager asks for none, START carries it, the store keeps it as `scene_seed`), and the replay resets the
task with it: the recorded scene, whatever `/sim_cell.seed` and the episodes before it were. A caller's `seed`
overrides it. An episode without one (a robot's, or one stored before the seed was recorded) is replayed in the
task's first scene of a fresh cell (what a fresh graph with the same `/sim_cell.seed` draws for its first episode
of that task), and the result says so (`seed_source`). Either way the first frame of the replay is compared with
the recorded one (`SceneCheck`): the same scene renders identically here, another layout does not.

Plain Python: no rclpy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from irevla_ros.policies.base import ACTION_DIM, Observation, PolicyError, PolicyOutput
from irevla_ros.safety import SafeCommand, SafetyLayer
from irevla_ros.store.errors import UnknownEpisodeError

# A pixel counts as changed above this difference (of 255): far above float rounding in a renderer, far below
# an object edge.
_PIXEL_CHANGE = 8
# The share of changed pixels above which two first frames show different scenes. A layout change moves an
# object by centimetres: 0.3 % (reach-v3's goal) to 2 % (button-press-v3) of a 128x128 corner view, measured.
_SCENE_CHANGED_FRACTION = 0.001
# How many ids an unknown-id error names (the newest).
_IDS_SHOWN = 5

# Where a replay's layout seed came from: the caller, the episode's record, or nowhere (a fresh cell's first scene).
SEED_SOURCES = ("given", "recorded", "none")
_NO_SEED = "a robot episode, or one stored before scene seeds were recorded"
_WHY_DIFFERENT = {
    "none": "the replay reset another layout; pass the episode's --seed if known",
    "given": "the given seed is not the episode's layout; without --seed the recorded one is used, if any",
    "recorded": "the recorded layout seed rebuilt another scene: the replay's cell is not configured as the "
    "recording session's (cameras, image sizes: --set)",
}


class ReplayError(ValueError):
    """An episode cannot be replayed as asked; the message says what and what to do."""


class EpisodeNotFoundError(ReplayError, UnknownEpisodeError):
    """The episode id is not in the store's catalogue."""


class SimTaskError(ReplayError):
    """The episode's task is not one the simulated cell can build (e.g. a robot cell's own task)."""


class IncompleteEpisodeError(ReplayError):
    """The stored episode is incomplete (gaps, timing) and replaying it was not allowed."""


class NotReplayableError(ReplayError):
    """The stored steps hold nothing to replay (no steps, actions of another dimension)."""


@dataclass(frozen=True)
class ReplayPlan:
    """A stored episode as the commands to replay, one row per step index 0..N-1.

    A step index missing from the file (an incomplete episode) is replayed as a hold and compared with nothing.
    """

    episode_id: str
    task: str
    instruction: str
    source: str
    policy_version: str
    outcome: str  # the catalogue's current outcome (labels applied)
    label_source: str
    complete: bool
    reasons: tuple[str, ...]
    actions: np.ndarray  # (N, 4) float32, what the policy (or the operator) commanded; zeros on holds
    holds: np.ndarray  # (N,) bool: a recorded hold or a missing step
    missing: np.ndarray  # (N,) bool: no record for this index
    proprio: np.ndarray  # (N, 4) float32: ee x, y, z, gripper opening before the action; NaN where missing
    interventions: int  # steps the operator commanded (replayed like the others)
    period: float  # seconds per step, from the recorded stamps
    cameras: tuple[str, ...]
    first_images: dict[str, np.ndarray] = field(default_factory=dict)  # step 0's images, if recorded
    scene_seed: int | None = None  # the layout seed recorded with the episode; None: unknown

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def recorded_success(self) -> bool:
        return self.outcome == "success"


def load_plan(
    store: Any, episode_id: str, *, allow_incomplete: bool = False, default_period: float = 0.1
) -> ReplayPlan:
    """The replay plan of `episode_id` from an open `EpisodeStore` (read through its checksum-verified `read`).

    Raises EpisodeNotFoundError (with the newest ids), IncompleteEpisodeError unless `allow_incomplete`,
    NotReplayableError; a file that fails its checksum raises the store's CorruptEpisodeError."""
    if episode_id not in store:
        rows = store.list()
        newest = ", ".join(r.episode_id for r in rows[-_IDS_SHOWN:][::-1]) or "none: the store is empty"
        raise EpisodeNotFoundError(
            f"episode {episode_id!r} is not in the store {store.root} ({len(rows)} episodes; newest: {newest}); "
            f"list them all with: irevla replay --list --store {store.root}"
        )
    stored = store.get(episode_id)
    if not stored.complete and not allow_incomplete:
        raise IncompleteEpisodeError(
            f"episode {episode_id!r} is incomplete ({'; '.join(stored.reasons) or 'no reason recorded'}): its "
            "recorded actions may have gaps or be off the control grid; pass --allow-incomplete to replay it "
            "anyway (missing steps are replayed as holds)"
        )
    record = store.read(episode_id)
    steps = record.steps
    if not steps:
        raise NotReplayableError(f"episode {episode_id!r} has no recorded steps")
    wrong = [s for s in steps if s.action.shape != (ACTION_DIM,)]
    if wrong:
        raise NotReplayableError(
            f"episode {episode_id!r}: {len(wrong)} steps (first: {wrong[0].step_index}) have actions of shape "
            f"{wrong[0].action.shape}; the arm takes ({ACTION_DIM},): ee dx, dy, dz, gripper"
        )
    n = int(steps[-1].step_index) + 1
    actions = np.zeros((n, ACTION_DIM), np.float32)
    holds = np.ones(n, bool)
    missing = np.ones(n, bool)
    proprio = np.full((n, 4), np.nan, np.float32)
    for s in steps:
        k = int(s.step_index)
        missing[k] = False
        holds[k] = bool(s.hold)
        if not s.hold:
            actions[k] = s.action
        if s.proprioception.shape == (4,):
            proprio[k] = s.proprioception
    return ReplayPlan(
        episode_id=episode_id,
        task=record.meta.task,
        instruction=record.meta.instruction,
        source=record.meta.source,
        policy_version=record.meta.policy_version,
        outcome=record.meta.outcome,
        label_source=record.meta.label_source,
        complete=record.complete,
        reasons=tuple(record.reasons),
        actions=actions,
        holds=holds,
        missing=missing,
        proprio=proprio,
        interventions=sum(bool(s.intervention) for s in steps),
        period=_recorded_period(steps, default_period),
        cameras=tuple(steps[0].images),
        first_images=dict(steps[0].images) if steps[0].step_index == 0 else {},
        scene_seed=record.meta.scene_seed,
    )


def _recorded_period(steps: Sequence[Any], default: float) -> float:
    """Seconds per step index: the median over consecutive records (a gap spans several indices)."""
    per_step = [
        (b.stamp_ns - a.stamp_ns) / (b.step_index - a.step_index) * 1e-9
        for a, b in itertools.pairwise(steps)
        if b.stamp_ns > a.stamp_ns
    ]
    return float(np.median(per_step)) if per_step else float(default)


# ---- the simulated replay ------------------------------------------------------------------------------------


class _RecordedActions:
    """A Policy that returns the recorded action of each step in turn; a recorded hold (or a missing step) is
    a hold, exactly as the policy node published it."""

    name = "replay"

    def __init__(self, plan: ReplayPlan) -> None:
        self._plan = plan
        self._next = 0
        self.version = f"replay:{plan.policy_version}"

    def reset(self, instruction: str) -> None:
        del instruction
        self._next = 0

    def act(self, observation: Observation) -> PolicyOutput:
        del observation
        k, self._next = self._next, self._next + 1
        if k >= self._plan.steps:  # run_episode stops at the plan's length; never reached
            raise PolicyError(f"no recorded step {k}")
        if self._plan.missing[k]:
            raise PolicyError(f"step {k} is missing from the recording")
        if self._plan.holds[k]:
            raise PolicyError(f"step {k} was a hold when recorded")
        return PolicyOutput(self._plan.actions[k].copy())


class _CountingSafetyLayer(SafetyLayer):
    """The arm controller's SafetyLayer, counting what it did to each command (clipped, refused)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statuses: dict[str, int] = {}

    def command(self, action: object, now: float, current_ee: object) -> SafeCommand:
        cmd = super().command(action, now, current_ee)
        self.statuses[cmd.status.value] = self.statuses.get(cmd.status.value, 0) + 1
        return cmd


@dataclass(frozen=True)
class SceneCheck:
    """The replay's first frame against the recorded one: the same scene renders identically."""

    cameras: tuple[str, ...]  # compared (same name and size in both); empty: nothing comparable
    changed_fraction: float  # share of pixels differing by more than _PIXEL_CHANGE, worst camera
    max_difference: int  # largest pixel difference, any camera
    note: str = ""  # why nothing was compared

    @property
    def same(self) -> bool | None:
        """True/False when compared, None when no camera could be."""
        return None if not self.cameras else self.changed_fraction <= _SCENE_CHANGED_FRACTION


def compare_first_frames(recorded: dict[str, np.ndarray], replayed: dict[str, np.ndarray]) -> SceneCheck:
    comparable = tuple(c for c in recorded if c in replayed and recorded[c].shape == replayed[c].shape)
    if not comparable:
        note = (
            "the recording has no step 0"
            if not recorded
            else f"recorded cameras {sorted((c, recorded[c].shape) for c in recorded)} are not the replay's "
            f"{sorted((c, replayed[c].shape) for c in replayed)}"
        )
        return SceneCheck((), math.nan, -1, note)
    fractions, maxima = [], []
    for c in comparable:
        diff = np.abs(recorded[c].astype(np.int16) - replayed[c].astype(np.int16))
        fractions.append(float(np.mean(diff.max(axis=-1) > _PIXEL_CHANGE)))
        maxima.append(int(diff.max()))
    return SceneCheck(comparable, max(fractions), max(maxima))


@dataclass
class SimReplayResult:
    """A simulated replay against its recording. Positions in metres; step k is the state before action k."""

    episode_id: str
    task: str
    seed: int  # the layout seed the replay reset with
    seed_source: str  # one of SEED_SOURCES: where `seed` came from
    cell_seed: int
    steps_recorded: int
    steps_replayed: int  # fewer when the replay succeeded earlier (the end rule stops at success)
    recorded_ee: np.ndarray  # (N, 3), NaN where missing
    replayed_ee: np.ndarray  # (M, 3)
    deviation: np.ndarray  # (min(N, M),) |replayed - recorded| per step, NaN where missing
    gripper_deviation: np.ndarray  # (min(N, M),) |replayed - recorded| opening per step
    recorded_outcome: str
    replay_success: bool
    scene: SceneCheck
    holds: int  # steps replayed as holds (recorded holds and missing steps)
    missing: int
    safety: dict[str, int]  # SafetyLayer status -> commands (ok, clipped, rejected_*...)
    recorded_period: float
    sim_period: float
    wall_seconds: float

    @property
    def max_deviation(self) -> float:
        finite = self.deviation[np.isfinite(self.deviation)]
        return float(finite.max()) if finite.size else math.nan

    @property
    def mean_deviation(self) -> float:
        finite = self.deviation[np.isfinite(self.deviation)]
        return float(finite.mean()) if finite.size else math.nan

    @property
    def max_gripper_deviation(self) -> float:
        finite = self.gripper_deviation[np.isfinite(self.gripper_deviation)]
        return float(finite.max()) if finite.size else math.nan

    @property
    def outcome_matches(self) -> bool:
        return self.replay_success == (self.recorded_outcome == "success")

    def summary(self) -> str:
        """A few lines for a person."""
        scene = self.scene
        if scene.same is None:
            scene_line = f"not compared ({scene.note})"
        elif scene.same:
            scene_line = "same first frame" + (" (identical)" if scene.max_difference == 0 else "")
        else:
            scene_line = (
                f"DIFFERENT first frame ({100 * scene.changed_fraction:.2f}% of pixels changed): "
                + _WHY_DIFFERENT[self.seed_source]
            )
        layout = {
            "recorded": f"layout seed {self.seed} recorded with the episode",
            "given": f"layout seed {self.seed} as given",
            "none": f"no layout seed recorded ({_NO_SEED}): the task's first scene of a fresh cell (cell seed "
            f"{self.cell_seed}, layout seed {self.seed})",
        }[self.seed_source]
        recorded_success = self.recorded_outcome == "success"
        outcome = (
            f"replay {'success' if self.replay_success else 'no success'} vs recorded {self.recorded_outcome}: "
            + ("same" if self.outcome_matches else "DIFFERENT")
        )
        if not recorded_success and self.recorded_outcome in ("aborted", "unknown"):
            outcome += f" (a recorded {self.recorded_outcome} says nothing about success)"
        lines = [
            f"replay of {self.episode_id} ({self.task}) in the simulated cell, {layout}",
            f"  steps: {self.steps_replayed} replayed of {self.steps_recorded} recorded"
            + (f", {self.holds} holds" if self.holds else "")
            + (f", {self.missing} missing (held)" if self.missing else ""),
            f"  end effector vs recorded: max {1000 * self.max_deviation:.2f} mm, mean "
            f"{1000 * self.mean_deviation:.2f} mm; gripper opening max {self.max_gripper_deviation:.3f}",
            f"  scene: {scene_line}",
            f"  outcome: {outcome}",
            "  safety layer: " + ", ".join(f"{k} {v}" for k, v in sorted(self.safety.items())),
        ]
        if abs(self.recorded_period - self.sim_period) > 1e-3:
            lines.append(
                f"  note: recorded at {self.recorded_period:.3f} s per step, the simulated cell runs "
                f"{self.sim_period:.3f} s: the same actions cover different times"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary numbers and the per-step deviations (metres; null where missing)."""

        def number(x: float) -> float | None:
            return None if not math.isfinite(x) else round(float(x), 7)

        return {
            "target": "sim",
            "episode_id": self.episode_id,
            "task": self.task,
            "seed": self.seed,
            "seed_source": self.seed_source,
            "cell_seed": self.cell_seed,
            "steps_recorded": self.steps_recorded,
            "steps_replayed": self.steps_replayed,
            "holds": self.holds,
            "missing": self.missing,
            "ee_deviation_max": number(self.max_deviation),
            "ee_deviation_mean": number(self.mean_deviation),
            "gripper_deviation_max": number(self.max_gripper_deviation),
            "ee_deviation_per_step": [number(x) for x in self.deviation],
            "recorded_outcome": self.recorded_outcome,
            "replay_success": self.replay_success,
            "outcome_match": self.outcome_matches,
            "scene_same": self.scene.same,
            "scene_changed_fraction": number(self.scene.changed_fraction),
            "scene_cameras": list(self.scene.cameras),
            "safety": dict(self.safety),
            "wall_seconds": round(self.wall_seconds, 3),
        }


def sim_cameras(plan: ReplayPlan, known: Sequence[str], default: Sequence[str]) -> tuple[str, ...]:
    """The graph's camera nodes to replay with: the recorded ones the sim graph has, else `default`."""
    return tuple(c for c in plan.cameras if c in known) or tuple(default)


def layout_seed(plan: ReplayPlan, seed: int | None) -> tuple[int | None, str]:
    """The layout seed a replay resets with and where it comes from (SEED_SOURCES): `seed` when given, else the
    one recorded with the episode, else None (the cell draws the task's first scene)."""
    if seed is not None:
        return int(seed), "given"
    if plan.scene_seed is not None:
        return int(plan.scene_seed), "recorded"
    return None, "none"


def replay_in_sim(
    plan: ReplayPlan,
    settings: Any,
    *,
    seed: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> SimReplayResult:
    """Play `plan` in a fresh simulated cell built from `settings` (`rollout.RolloutSettings`, the graph's
    parameters) after resetting `plan.task` with layout `seed`, by default the one recorded with the episode
    (`layout_seed`). `progress(step, steps, deviation)` is called after each step's observation. Raises
    SimTaskError for a task the cell does not know."""
    from irevla_ros.sim.cell import UnknownTaskError
    from irevla_ros.train.rollout import make_cell, run_episode

    try:
        cell = make_cell(settings, [plan.task])
    except UnknownTaskError as exc:
        raise SimTaskError(
            f"episode {plan.episode_id!r} is of task {plan.task!r}, which the simulated cell cannot build "
            f"(replay it on the robot with --target robot): {exc}"
        ) from exc
    first: dict[str, np.ndarray] = {}

    def on_step(step: int, obs: Observation) -> None:
        if step == 0:
            first.update({c: img.copy() for c, img in obs.images.items()})
        if progress is not None:
            recorded = plan.proprio[step, :3]
            progress(step, plan.steps, float(np.linalg.norm(obs.proprioception[:3] - recorded)))

    layer = _CountingSafetyLayer(settings.limits)
    reset_seed, seed_source = layout_seed(plan, seed)
    try:
        episode = run_episode(
            cell,
            _RecordedActions(plan),  # type: ignore[arg-type]
            settings,
            plan.task,
            reset_seed,
            keep_images=False,
            max_steps=plan.steps,
            safety=layer,
            on_step=on_step,
        )
    finally:
        cell.close()
    m = min(plan.steps, episode.steps)
    recorded = plan.proprio[:m]
    replayed = episode.proprio[:m].astype(np.float64)
    return SimReplayResult(
        episode_id=plan.episode_id,
        task=plan.task,
        seed=episode.seed,  # the one the cell reset with, drawn by it when reset_seed is None
        seed_source=seed_source,
        cell_seed=int(settings.cell_seed),
        steps_recorded=plan.steps,
        steps_replayed=episode.steps,
        recorded_ee=plan.proprio[:, :3].astype(np.float64),
        replayed_ee=episode.proprio[:, :3].astype(np.float64),
        deviation=np.linalg.norm(replayed[:, :3] - recorded[:, :3], axis=1),
        gripper_deviation=np.abs(replayed[:, 3] - recorded[:, 3]),
        recorded_outcome=plan.outcome,
        replay_success=episode.success,
        scene=compare_first_frames(plan.first_images, first),
        holds=int(episode.holds.sum()),
        missing=int(plan.missing[: episode.steps].sum()),
        safety=layer.statuses,
        recorded_period=plan.period,
        sim_period=float(settings.control_period),
        wall_seconds=episode.wall_seconds,
    )


__all__ = [
    "EpisodeNotFoundError",
    "IncompleteEpisodeError",
    "NotReplayableError",
    "ReplayError",
    "ReplayPlan",
    "SceneCheck",
    "SimReplayResult",
    "SimTaskError",
    "compare_first_frames",
    "layout_seed",
    "load_plan",
    "replay_in_sim",
    "sim_cameras",
]
