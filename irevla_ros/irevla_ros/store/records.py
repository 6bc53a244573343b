"""Plain records exchanged with the episode store: steps, episode metadata and what the store returns.

No ROS types here: the node adapters convert messages to and from these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SOURCES = ("expert", "policy", "intervention")
OUTCOMES = ("success", "failure", "timeout", "aborted", "unknown")
LABEL_SOURCES = ("operator", "simulator", "classifier", "none")

# An operator's judgement is ground truth; simulator and classifier labels are equally trusted guesses.
_LABEL_PRIORITY = {"operator": 2, "simulator": 1, "classifier": 1, "none": 0}


def label_wins(new_source: str, current_source: str) -> bool:
    """Whether a label from `new_source` replaces an episode's outcome decided by `current_source`: an operator
    label always wins over an automatic one and is never replaced by one; among equals the later label wins."""
    for source in (new_source, current_source):
        if source not in _LABEL_PRIORITY:
            raise InvalidRecordError(f"label_source {source!r} is not one of {LABEL_SOURCES}")
    return _LABEL_PRIORITY[new_source] >= _LABEL_PRIORITY[current_source]


# Episode ids become file names, so they are restricted to characters that are safe in one path component.
_EPISODE_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,199}")
_CAMERA_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class InvalidRecordError(ValueError):
    """A step or episode record does not satisfy its contract (wrong dtype, shape, enum value...)."""


def check_episode_id(episode_id: str) -> str:
    if not isinstance(episode_id, str) or not _EPISODE_ID_RE.fullmatch(episode_id):
        raise InvalidRecordError(
            f"episode_id {episode_id!r} is not valid: use 1-200 characters from [A-Za-z0-9_.:-], "
            "not starting with '.', ':' or '-'"
        )
    return episode_id


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidRecordError(f"{name} {value!r} is not one of {allowed}")


def _check_vector(name: str, value: object) -> None:
    if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.ndim != 1:
        desc = f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray) else type(value)
        raise InvalidRecordError(f"{name} must be a 1-D float32 numpy array, got {desc}")


def _same_float(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@dataclass(frozen=True)
class JointStateSample:
    """One /joint_states message (sensor_msgs/JointState) as the arm controller published it."""

    stamp_ns: int
    names: tuple[str, ...]
    position: tuple[float, ...]
    velocity: tuple[float, ...] = ()
    effort: tuple[float, ...] = ()

    @classmethod
    def from_message(cls, msg: Any) -> JointStateSample:
        """From a sensor_msgs/JointState: a live rclpy message or one decoded from a file (same fields)."""
        return cls(
            stamp_ns=stamp_to_ns(msg.header.stamp),
            names=tuple(msg.name),
            position=tuple(float(x) for x in msg.position),
            velocity=tuple(float(x) for x in msg.velocity),
            effort=tuple(float(x) for x in msg.effort),
        )


@dataclass(frozen=True)
class TransformSample:
    """One transform of a /tf message (geometry_msgs/TransformStamped)."""

    stamp_ns: int
    parent_frame: str
    child_frame: str
    translation: tuple[float, float, float]
    rotation: tuple[float, float, float, float]  # quaternion x, y, z, w

    @classmethod
    def from_tf_message(cls, msg: Any) -> tuple[TransformSample, ...]:
        """Every transform of a tf2_msgs/TFMessage: a live rclpy message or one decoded from a file."""
        return tuple(
            cls(
                stamp_ns=stamp_to_ns(t.header.stamp),
                parent_frame=t.header.frame_id,
                child_frame=t.child_frame_id,
                translation=(t.transform.translation.x, t.transform.translation.y, t.transform.translation.z),
                rotation=(
                    t.transform.rotation.x,
                    t.transform.rotation.y,
                    t.transform.rotation.z,
                    t.transform.rotation.w,
                ),
            )
            for t in msg.transforms
        )


def stamp_to_ns(stamp: Any) -> int:
    """builtin_interfaces/Time (sec, nanosec) as integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


@dataclass(eq=False)
class StepData:
    """One control step: the exact observation the action was computed from, and the action."""

    episode_id: str
    step_index: int
    stamp_ns: int
    images: dict[str, np.ndarray]  # camera name -> HxWx3 uint8 RGB at policy resolution
    image_stamps_ns: dict[str, int]
    proprioception: np.ndarray  # float32, 1-D
    proprioception_names: list[str]
    instruction: str
    action: np.ndarray  # float32, 1-D
    log_prob: float | None
    value: float | None
    policy_version: str
    intervention: bool
    hold: bool
    # The live topics' context, kept so a stored episode plays back as recorded (store/mcap_format.py); not
    # part of `same_as`: duplicates are told apart by what the policy produced, these are attached at closing.
    image_frame_ids: dict[str, str] = field(default_factory=dict)  # camera -> header.frame_id as published
    joint_state: JointStateSample | None = None  # /joint_states as it was at this step (newest <= stamp)
    transforms: tuple[TransformSample, ...] = ()  # /tf as it was at this step (newest per frame pair)

    def __post_init__(self) -> None:
        check_episode_id(self.episode_id)
        if not isinstance(self.step_index, (int, np.integer)) or not 0 <= self.step_index < 2**32:
            raise InvalidRecordError(f"step_index must be an int in [0, 2**32), got {self.step_index!r}")
        if not isinstance(self.stamp_ns, (int, np.integer)) or self.stamp_ns < 0:
            raise InvalidRecordError(f"stamp_ns must be a non-negative int, got {self.stamp_ns!r}")
        for camera, image in self.images.items():
            if not isinstance(camera, str) or not _CAMERA_RE.fullmatch(camera):
                raise InvalidRecordError(
                    f"camera name {camera!r} is not valid: it becomes a ROS topic name component "
                    "([A-Za-z][A-Za-z0-9_]*)"
                )
            if (
                not isinstance(image, np.ndarray)
                or image.dtype != np.uint8
                or image.ndim != 3
                or image.shape[2] != 3
            ):
                desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
                raise InvalidRecordError(f"image {camera!r} must be an HxWx3 uint8 array, got {desc}")
        if set(self.image_stamps_ns) != set(self.images):
            raise InvalidRecordError(
                f"image_stamps_ns cameras {sorted(self.image_stamps_ns)} "
                f"do not match images cameras {sorted(self.images)}"
            )
        for camera, stamp in self.image_stamps_ns.items():
            if not isinstance(stamp, (int, np.integer)) or stamp < 0:
                raise InvalidRecordError(
                    f"image stamp of {camera!r} must be a non-negative int, got {stamp!r}"
                )
        _check_vector("proprioception", self.proprioception)
        _check_vector("action", self.action)
        if self.proprioception_names and len(self.proprioception_names) != len(self.proprioception):
            raise InvalidRecordError(
                f"{len(self.proprioception_names)} proprioception_names for "
                f"{len(self.proprioception)} proprioception values"
            )

    def same_as(self, other: StepData) -> bool:
        """Bitwise equality of every field (numpy arrays make the dataclass `==` unusable)."""
        return (
            self.episode_id == other.episode_id
            and self.step_index == other.step_index
            and self.stamp_ns == other.stamp_ns
            and self.images.keys() == other.images.keys()
            and all(_same_array(self.images[c], other.images[c]) for c in self.images)
            and self.image_stamps_ns == other.image_stamps_ns
            and _same_array(self.proprioception, other.proprioception)
            and list(self.proprioception_names) == list(other.proprioception_names)
            and self.instruction == other.instruction
            and _same_array(self.action, other.action)
            and _same_float(self.log_prob, other.log_prob)
            and _same_float(self.value, other.value)
            and self.policy_version == other.policy_version
            and bool(self.intervention) == bool(other.intervention)
            and bool(self.hold) == bool(other.hold)
        )


def intervention_segments(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, stop) of each maximal run of True in `flags` (one per operator takeover), in order."""
    segments: list[tuple[int, int]] = []
    start: int | None = None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            segments.append((start, i))
            start = None
    if start is not None:
        segments.append((start, len(flags)))
    return segments


@dataclass
class EpisodeMeta:
    """What is known about an episode: set at START, completed (outcome, end, count) at END."""

    episode_id: str
    task: str
    instruction: str
    policy_version: str
    source: str  # one of SOURCES
    started_ns: int
    ended_ns: int | None = None
    outcome: str = "unknown"  # one of OUTCOMES
    label_source: str = "none"  # one of LABEL_SOURCES
    expected_steps: int | None = None  # the count the producer said it emitted
    # The simulator's layout seed of the episode's scene (START); None: unknown (a robot, or recorded before
    # the seed was recorded). Resetting the simulated cell to the task with it rebuilds the scene.
    scene_seed: int | None = None

    def __post_init__(self) -> None:
        check_episode_id(self.episode_id)
        _check_choice("source", self.source, SOURCES)
        _check_choice("outcome", self.outcome, OUTCOMES)
        _check_choice("label_source", self.label_source, LABEL_SOURCES)
        if self.started_ns < 0:
            raise InvalidRecordError(f"started_ns must be non-negative, got {self.started_ns}")
        if self.expected_steps is not None and self.expected_steps < 0:
            raise InvalidRecordError(f"expected_steps must be non-negative, got {self.expected_steps}")
        if self.scene_seed is not None and (
            isinstance(self.scene_seed, bool)
            or not isinstance(self.scene_seed, (int, np.integer))
            or not 0 <= self.scene_seed < 2**63
        ):
            raise InvalidRecordError(
                f"scene_seed must be None or an integer in [0, 2**63), got {self.scene_seed!r}"
            )


@dataclass
class AssembledEpisode:
    """An ended episode ready to be stored; incomplete ones are stored too, with the reasons."""

    meta: EpisodeMeta
    steps: list[StepData]  # sorted by step_index, one per index
    complete: bool
    reasons: list[str] = field(default_factory=list)  # why it is incomplete; empty when complete
    duplicates_dropped: int = 0  # identical repeats
    conflicting_duplicates: int = 0  # repeats with different content (first one kept)
    out_of_order: int = 0  # steps that arrived after a higher index (harmless once sorted)
    timing_errors: int = 0  # steps off time order or the control grid, images newer than their step


@dataclass
class EpisodeRecord:
    """An episode read back from its file, checksum verified."""

    meta: EpisodeMeta
    steps: list[StepData]
    complete: bool
    reasons: list[str]
    sha256: str
    path: Path


@dataclass
class StoredEpisode:
    """One catalogue row: what the store acknowledges after a write and returns from queries."""

    episode_id: str
    task: str
    instruction: str
    outcome: str
    label_source: str
    policy_version: str
    source: str
    num_steps: int
    complete: bool
    reasons: list[str]
    sha256: str
    path: str  # relative to the store root
    size_bytes: int
    started_ns: int
    ended_ns: int | None
    stored_ns: int
    corrupt: bool
    corrupt_reason: str
    timing_errors: int = 0  # see AssembledEpisode; such an episode is incomplete
    interventions: int = 0  # operator takeovers: maximal runs of consecutive steps with intervention=true
    intervention_steps: int = 0  # steps the operator commanded (intervention=true)
    scene_seed: int | None = None  # see EpisodeMeta; None: unknown (robot, or catalogued before schema v4)

    @property
    def trainable(self) -> bool:
        return self.complete and not self.corrupt


@dataclass
class LabelEntry:
    """One label event in an episode's history; `applied` is False when a higher-priority label held."""

    episode_id: str
    outcome: str
    label_source: str
    stamp_ns: int
    applied: bool


@dataclass
class RecoveryReport:
    removed_temp_files: list[str] = field(default_factory=list)  # relative paths
    reindexed: list[str] = field(default_factory=list)  # episode ids re-added from their files
    missing: list[str] = field(default_factory=list)  # episode ids whose file is gone
    corrupt: list[str] = field(default_factory=list)  # episode ids whose file no longer matches
    restored: list[str] = field(default_factory=list)  # previously corrupt, now matching again
    unreadable_files: list[str] = field(default_factory=list)  # un-catalogued files that cannot be parsed

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.unreadable_files)


@dataclass
class StoreStats:
    total: int
    complete: int
    incomplete: int
    corrupt: int
    trainable: int
    by_outcome: dict[str, int]
    trainable_by_outcome: dict[str, int]
