"""Training data from the episode store: the expert set D_e, the RL set D_RL (successful policy episodes), and
everything RL needs (failures included), as flat arrays of transitions.

Operator takeovers (HIL-SERL style: a `policy` episode whose steps the operator commanded carry
`intervention=true`) are expert actions in the states the policy reached. Every intervention segment of every
trainable policy episode, whatever its outcome, is part of D_e (`intervention_set`): the operator's command is
the label for that state whether or not the episode succeeded in the end (HG-DAgger and HIL-SERL keep all
interventions; a takeover usually happens because the episode was going wrong, so keeping only successes would
drop most corrections). D_RL keeps only the policy's own steps of its successful episodes, so no step is in
both sets.

Each episode is decoded once and cached as a compressed .npz named by the episode's checksum, so a second epoch,
a second stage or a restarted trainer does not decode MCAP again; a changed file (new checksum) misses the cache.
Reading goes through the episode store (it verifies checksums); the cache holds only derived arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from irevla_ros import durable
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import StoredEpisode, intervention_segments


@dataclass
class Transitions:
    """Steps of many episodes, in episode order. `rewards` are sparse and binary: 1 on the last step of a
    successful episode, else 0; `dones` mark each episode's last step."""

    images: np.ndarray  # (N, n_cameras, H, W, 3) uint8
    proprio: np.ndarray  # (N, P) float32
    actions: np.ndarray  # (N, A) float32
    log_probs: np.ndarray  # (N,) float32, NaN where the behaviour policy gave none
    rewards: np.ndarray  # (N,) float32
    dones: np.ndarray  # (N,) bool
    instruction_ids: np.ndarray  # (N,) int32 into `instructions`
    instructions: list[str]
    episode_ids: list[str] = field(default_factory=list)  # one per episode, in order
    episode_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # (N,) bool: the operator commanded the step (StepRecord.intervention); all False when not given
    interventions: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        if self.interventions.shape[0] == 0 and len(self):
            self.interventions = np.zeros(len(self), bool)
        if self.interventions.shape != (len(self),):
            raise DatasetError(
                f"interventions has shape {self.interventions.shape}, expected ({len(self)},): one flag per step"
            )

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def episodes(self) -> int:
        return len(self.episode_ids)


class DatasetError(ValueError):
    pass


def _episode_arrays(
    store: EpisodeStore, row: StoredEpisode, cameras: Sequence[str], skip_holds: bool, cache_dir: Path | None
) -> dict[str, np.ndarray] | None:
    if not cameras:
        raise DatasetError("no cameras selected: a model takes at least one camera image")
    key = f"{row.episode_id}-{row.sha256[:16]}-{'_'.join(cameras)}-{int(skip_holds)}.npz"
    cached = cache_dir / key if cache_dir is not None else None
    if cached is not None and cached.exists():
        with np.load(cached, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        if "interventions" in arrays:  # an entry from before the flag was cached is recomputed
            return arrays
    record = store.read(row.episode_id)
    steps = [s for s in record.steps if not (skip_holds and s.hold)]
    if not steps:
        return None
    missing = [c for c in cameras if c not in steps[0].images]
    if missing:
        raise DatasetError(
            f"episode {row.episode_id} has no camera {missing} (it has {sorted(steps[0].images)})"
        )
    arrays = {
        "images": np.stack([np.stack([s.images[c] for c in cameras]) for s in steps]),
        "proprio": np.stack([s.proprioception for s in steps]).astype(np.float32),
        "actions": np.stack([s.action for s in steps]).astype(np.float32),
        "log_probs": np.array([np.nan if s.log_prob is None else s.log_prob for s in steps], np.float32),
        "interventions": np.array([bool(s.intervention) for s in steps], bool),
    }
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        with durable.atomic_file(cached) as f:
            np.savez_compressed(f, **arrays)
    return arrays


def load_transitions(
    store: EpisodeStore,
    rows: Iterable[StoredEpisode],
    cameras: Sequence[str] = ("camera",),
    *,
    skip_holds: bool = True,
    cache_dir: Path | None = None,
) -> Transitions:
    """Flatten `rows` (catalogue rows, e.g. `store.trainable(source="expert")`) into transitions."""
    return transitions_from_episodes(_episodes(store, rows, cameras, skip_holds, cache_dir))


EpisodeArrays = tuple[str, str, bool, Mapping[str, np.ndarray]]


def _episodes(
    store: EpisodeStore,
    rows: Iterable[StoredEpisode],
    cameras: Sequence[str],
    skip_holds: bool = True,
    cache_dir: Path | None = None,
) -> list[EpisodeArrays]:
    episodes = []
    for row in rows:
        if not row.trainable:
            raise DatasetError(f"episode {row.episode_id} is not trainable (incomplete or corrupt)")
        arrays = _episode_arrays(store, row, cameras, skip_holds, cache_dir)
        if arrays is not None:
            episodes.append((row.episode_id, row.instruction, row.outcome == "success", arrays))
    return episodes


def _select(arrays: Mapping[str, np.ndarray], keep: slice | np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[keep] for k, v in arrays.items()}


def intervention_segments_of(episodes: Iterable[EpisodeArrays]) -> list[EpisodeArrays]:
    """Each operator takeover of `episodes` as its own episode `<id>/intervention-<k>` (k from 0), holds already
    left out; never a success (the reward of a segment is not the episode's)."""
    out: list[EpisodeArrays] = []
    for episode_id, instruction, _success, arrays in episodes:
        flags = arrays.get("interventions")
        if flags is None:
            continue
        for k, (start, stop) in enumerate(intervention_segments(flags.tolist())):
            out.append(
                (f"{episode_id}/intervention-{k}", instruction, False, _select(arrays, slice(start, stop)))
            )
    return out


def _policy_steps_only(episodes: Iterable[EpisodeArrays]) -> list[EpisodeArrays]:
    out: list[EpisodeArrays] = []
    for episode_id, instruction, success, arrays in episodes:
        flags = arrays.get("interventions")
        own = arrays if flags is None else _select(arrays, ~flags.astype(bool))
        if own["actions"].shape[0]:
            out.append((episode_id, instruction, success, own))
    return out


def transitions_from_episodes(
    episodes: Iterable[tuple[str, str, bool, Mapping[str, np.ndarray]]],
) -> Transitions:
    """(episode id, instruction, success, arrays: images, proprio, actions, log_probs) per episode, holds already
    left out -> Transitions, with the sparse binary reward on each successful episode's last step."""
    parts: list[Mapping[str, np.ndarray]] = []
    instructions: list[str] = []
    instruction_ids: list[np.ndarray] = []
    ids: list[str] = []
    rewards: list[np.ndarray] = []
    flags: list[np.ndarray] = []
    for episode_id, instruction, success, arrays in episodes:
        n = arrays["actions"].shape[0]
        if instruction not in instructions:
            instructions.append(instruction)
        instruction_ids.append(np.full(n, instructions.index(instruction), np.int32))
        reward = np.zeros(n, np.float32)
        reward[-1] = 1.0 if success else 0.0
        rewards.append(reward)
        flags.append(np.asarray(arrays.get("interventions", np.zeros(n, bool)), bool))
        parts.append(arrays)
        ids.append(episode_id)
    if not parts:
        raise DatasetError("no trainable steps in the selected episodes")
    lengths = np.array([p["actions"].shape[0] for p in parts])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    dones = np.zeros(int(lengths.sum()), bool)
    dones[starts + lengths - 1] = True
    return Transitions(
        images=np.concatenate([p["images"] for p in parts]),
        proprio=np.concatenate([p["proprio"] for p in parts]),
        actions=np.concatenate([p["actions"] for p in parts]),
        log_probs=np.concatenate([p["log_probs"] for p in parts]),
        rewards=np.concatenate(rewards),
        dones=dones,
        instruction_ids=np.concatenate(instruction_ids),
        instructions=instructions,
        episode_ids=ids,
        episode_starts=starts,
        interventions=np.concatenate(flags),
    )


def expert_set(
    store: EpisodeStore, cameras: Sequence[str] = ("camera",), cache_dir: Path | None = None
) -> Transitions:
    """D_e: complete expert demonstrations (scripted or teleoperated) that succeeded, and every operator takeover
    of a policy episode (`intervention_set`)."""
    rows = [r for r in store.trainable(source="expert", outcome="success")]
    rows += [r for r in store.trainable(source="intervention", outcome="success")]
    episodes = _episodes(store, rows, cameras, cache_dir=cache_dir)
    episodes += intervention_segments_of(
        _episodes(store, _with_interventions(store), cameras, cache_dir=cache_dir)
    )
    return transitions_from_episodes(episodes)


def _with_interventions(store: EpisodeStore) -> list[StoredEpisode]:
    return [r for r in store.trainable(source="policy") if r.intervention_steps > 0]


def intervention_set(
    store: EpisodeStore, cameras: Sequence[str] = ("camera",), cache_dir: Path | None = None
) -> Transitions:
    """The operator's takeovers of trainable policy episodes (any outcome), one episode per segment."""
    episodes = _episodes(store, _with_interventions(store), cameras, cache_dir=cache_dir)
    return transitions_from_episodes(intervention_segments_of(episodes))


def rl_set(
    store: EpisodeStore, cameras: Sequence[str] = ("camera",), cache_dir: Path | None = None
) -> Transitions:
    """D_RL: successful episodes of the policy itself (the RL stage's successes), without the steps the operator
    commanded (those are in D_e)."""
    rows = store.trainable(source="policy", outcome="success")
    return transitions_from_episodes(_policy_steps_only(_episodes(store, rows, cameras, cache_dir=cache_dir)))
