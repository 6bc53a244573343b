"""Training data from the episode store: the expert set D_e, the RL set D_RL (successful policy episodes), and
everything RL needs (failures included), as flat arrays of transitions.

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
from irevla_ros.store.records import StoredEpisode


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
    key = f"{row.episode_id}-{row.sha256[:16]}-{'_'.join(cameras)}-{int(skip_holds)}.npz"
    cached = cache_dir / key if cache_dir is not None else None
    if cached is not None and cached.exists():
        with np.load(cached, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
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
    episodes = []
    for row in rows:
        if not row.trainable:
            raise DatasetError(f"episode {row.episode_id} is not trainable (incomplete or corrupt)")
        arrays = _episode_arrays(store, row, cameras, skip_holds, cache_dir)
        if arrays is not None:
            episodes.append((row.episode_id, row.instruction, row.outcome == "success", arrays))
    return transitions_from_episodes(episodes)


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
    for episode_id, instruction, success, arrays in episodes:
        n = arrays["actions"].shape[0]
        if instruction not in instructions:
            instructions.append(instruction)
        instruction_ids.append(np.full(n, instructions.index(instruction), np.int32))
        reward = np.zeros(n, np.float32)
        reward[-1] = 1.0 if success else 0.0
        rewards.append(reward)
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
    )


def expert_set(
    store: EpisodeStore, cameras: Sequence[str] = ("camera",), cache_dir: Path | None = None
) -> Transitions:
    """D_e: complete expert demonstrations (scripted or teleoperated) that succeeded."""
    rows = [r for r in store.trainable(source="expert", outcome="success")]
    rows += [r for r in store.trainable(source="intervention", outcome="success")]
    return load_transitions(store, rows, cameras, cache_dir=cache_dir)


def rl_set(
    store: EpisodeStore, cameras: Sequence[str] = ("camera",), cache_dir: Path | None = None
) -> Transitions:
    """D_RL: successful episodes of the policy itself (the RL stage's successes)."""
    return load_transitions(
        store, store.trainable(source="policy", outcome="success"), cameras, cache_dir=cache_dir
    )
