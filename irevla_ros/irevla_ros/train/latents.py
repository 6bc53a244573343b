"""Latents of stored observations for Stage 1: each observation goes through the frozen backbone ONCE.

In Stage 1 only the heads train (VLAModel.set_trainable("heads")), so the latent of an observation (backbone +
token learner) never changes while RL runs: the paper stores it in the replay buffer and RL runs in latent space.
`LatentEpisodes` is that data (latents, actions, behaviour log-probabilities, sparse rewards, episode
boundaries); `from_transitions` computes it from `Transitions` (images through vla/preprocess.py, exactly as
the supervised stage and the robot see them); `LatentCache` keeps it on disk keyed by (encoder key, episode id, episode
sha256) so a restarted trainer does not run the backbone again; `latent_episodes_from_store` ties the three
together for catalogue rows.

Terminal vs truncated: the reward is 1 on the last step of a successful episode and the episode ends there, a
true terminal state (no bootstrapping). Every other ending (timeout, operator failure label, abort) stops the
recording, not the task: the state still has a value, so RL bootstraps from it ("truncated"). Which outcomes are
terminal is a parameter (`TERMINAL_OUTCOMES` by default).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from irevla_ros import durable
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import StoredEpisode
from irevla_ros.train.datasets import DatasetError, Transitions, load_transitions
from irevla_ros.vla.model import HEAD_GROUPS, VLAModel
from irevla_ros.vla.preprocess import preprocess_images

TERMINAL_OUTCOMES: tuple[str, ...] = ("success",)
_CACHE_FORMAT = 1


class LatentDataError(ValueError):
    """Latent episode arrays are inconsistent (shapes, dtypes, episode boundaries) or do not fit the model."""


@dataclass
class LatentEpisodes:
    """Steps of whole episodes in latent space, in episode order (one row per executed, non-hold step)."""

    latents: np.ndarray  # (N, d) float32
    actions: np.ndarray  # (N, A) float32, in [-1, 1]: what was executed
    log_probs: np.ndarray  # (N,) float32 behaviour log-probability, NaN where none was recorded
    rewards: np.ndarray  # (N,) float32: 1 on the last step of a successful episode, else 0
    dones: np.ndarray  # (N,) bool: the last step of each episode
    terminals: np.ndarray  # (N,) bool: a done whose next state has no value (success); others are truncated
    episode_starts: np.ndarray  # (E,) int64 index of each episode's first step
    episode_ids: list[str] = field(default_factory=list)  # (E,)
    outcomes: list[str] = field(default_factory=list)  # (E,) the stored outcome of each episode
    # (N,) bool: the operator commanded the step (a takeover), not the policy; all False when not given
    interventions: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    def __post_init__(self) -> None:
        if self.interventions.shape[0] == 0 and len(self):
            self.interventions = np.zeros(len(self), bool)
        self.validate()

    # ---- construction ----
    @classmethod
    def empty(cls, latent_dim: int, action_dim: int) -> LatentEpisodes:
        return cls(
            latents=np.zeros((0, latent_dim), np.float32),
            actions=np.zeros((0, action_dim), np.float32),
            log_probs=np.zeros(0, np.float32),
            rewards=np.zeros(0, np.float32),
            dones=np.zeros(0, bool),
            terminals=np.zeros(0, bool),
            episode_starts=np.zeros(0, np.int64),
        )

    @classmethod
    def from_episode(
        cls,
        episode_id: str,
        latents: np.ndarray,
        actions: np.ndarray,
        outcome: str,
        log_probs: np.ndarray | None = None,
        *,
        terminal_outcomes: Sequence[str] = TERMINAL_OUTCOMES,
        interventions: np.ndarray | None = None,
    ) -> LatentEpisodes:
        """One episode from its arrays (a direct simulation rollout, or a cache hit)."""
        n = int(np.asarray(latents).shape[0])
        if n < 1:
            raise LatentDataError(f"episode {episode_id}: no steps")
        rewards = np.zeros(n, np.float32)
        rewards[-1] = 1.0 if outcome == "success" else 0.0
        dones = np.zeros(n, bool)
        dones[-1] = True
        terminals = np.zeros(n, bool)
        terminals[-1] = outcome in terminal_outcomes
        lp = np.full(n, np.nan, np.float32) if log_probs is None else np.asarray(log_probs, np.float32)
        return cls(
            latents=np.ascontiguousarray(latents, np.float32),
            actions=np.ascontiguousarray(actions, np.float32),
            log_probs=lp,
            rewards=rewards,
            dones=dones,
            terminals=terminals,
            episode_starts=np.zeros(1, np.int64),
            episode_ids=[episode_id],
            outcomes=[outcome],
            interventions=np.zeros(n, bool) if interventions is None else np.asarray(interventions, bool),
        )

    @classmethod
    def concat(cls, parts: Sequence[LatentEpisodes]) -> LatentEpisodes:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise LatentDataError("concat of no (non-empty) latent episodes")
        dims = {(p.latent_dim, p.action_dim) for p in parts}
        if len(dims) != 1:
            raise LatentDataError(
                f"cannot concatenate latent episodes of different (latent, action) dims {dims}"
            )
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        return cls(
            latents=np.concatenate([p.latents for p in parts]),
            actions=np.concatenate([p.actions for p in parts]),
            log_probs=np.concatenate([p.log_probs for p in parts]),
            rewards=np.concatenate([p.rewards for p in parts]),
            dones=np.concatenate([p.dones for p in parts]),
            terminals=np.concatenate([p.terminals for p in parts]),
            episode_starts=np.concatenate(
                [p.episode_starts + o for p, o in zip(parts, offsets, strict=True)]
            ),
            episode_ids=[i for p in parts for i in p.episode_ids],
            outcomes=[o for p in parts for o in p.outcomes],
            interventions=np.concatenate([p.interventions for p in parts]),
        )

    def append(self, other: LatentEpisodes) -> LatentEpisodes:
        """A new LatentEpisodes holding this one's episodes followed by `other`'s."""
        if not len(self):
            return other
        return LatentEpisodes.concat([self, other])

    # ---- views ----
    def __len__(self) -> int:
        return int(self.actions.shape[0])

    @property
    def episodes(self) -> int:
        return int(self.episode_starts.shape[0])

    @property
    def latent_dim(self) -> int:
        return int(self.latents.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def episode_slices(self) -> list[slice]:
        ends = np.append(self.episode_starts[1:], len(self))
        return [slice(int(s), int(e)) for s, e in zip(self.episode_starts, ends, strict=True)]

    def episode(self, index: int) -> LatentEpisodes:
        s = self.episode_slices()[index]
        return LatentEpisodes(
            latents=self.latents[s],
            actions=self.actions[s],
            log_probs=self.log_probs[s],
            rewards=self.rewards[s],
            dones=self.dones[s],
            terminals=self.terminals[s],
            episode_starts=np.zeros(1, np.int64),
            episode_ids=[self.episode_ids[index]],
            outcomes=[self.outcomes[index]],
            interventions=self.interventions[s],
        )

    def by_commander(self) -> tuple[LatentEpisodes | None, LatentEpisodes | None]:
        """(the operator's transitions, the policy's transitions), each as sub-episodes `<id>#<first step>`, so
        that an off-policy buffer built from them samples exactly the transitions of each kind: a run of steps
        that does not end its episode is followed by the next state (the first step of the next run) as a
        truncated last step, which a replay buffer never samples but bootstraps from; the run that ends the
        episode keeps the episode's ending (terminal or truncated) and reward. None for a kind with no step."""
        parts: dict[bool, list[LatentEpisodes]] = {True: [], False: []}
        for e, s in enumerate(self.episode_slices()):
            flags = self.interventions[s]
            n = s.stop - s.start
            bounds = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
            for a, b in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [n]]), strict=True):
                a, b = int(a), int(b)
                last = b if b < n else n - 1  # the next run's first state closes a run that does not end it
                rows = slice(s.start + a, s.start + last + 1)
                rewards = self.rewards[rows].copy()
                terminals = self.terminals[rows].copy()
                if b < n:
                    rewards[-1], terminals[-1] = 0.0, False
                dones = np.zeros(last + 1 - a, bool)
                dones[-1] = True
                parts[bool(flags[a])].append(
                    LatentEpisodes(
                        latents=self.latents[rows],
                        actions=self.actions[rows],
                        log_probs=self.log_probs[rows],
                        rewards=rewards,
                        dones=dones,
                        terminals=terminals,
                        episode_starts=np.zeros(1, np.int64),
                        episode_ids=[f"{self.episode_ids[e]}#{a}"],
                        outcomes=[self.outcomes[e]],
                        interventions=self.interventions[rows],
                    )
                )
        operator, policy = (LatentEpisodes.concat(parts[k]) if parts[k] else None for k in (True, False))
        return operator, policy

    def successful(self) -> list[bool]:
        return [bool(self.rewards[s].sum() > 0) for s in self.episode_slices()]

    def success_ids(self) -> list[str]:
        return [i for i, ok in zip(self.episode_ids, self.successful(), strict=True) if ok]

    def validate(self) -> None:
        n = len(self)
        if self.latents.ndim != 2 or self.latents.shape[0] != n or self.latents.dtype != np.float32:
            raise LatentDataError(
                f"latents must be float32 (N={n}, d), got {self.latents.dtype} {self.latents.shape}"
            )
        if self.actions.ndim != 2 or self.actions.dtype != np.float32:
            raise LatentDataError(
                f"actions must be float32 (N, A), got {self.actions.dtype} {self.actions.shape}"
            )
        for name in ("log_probs", "rewards"):
            a = getattr(self, name)
            if a.shape != (n,) or a.dtype != np.float32:
                raise LatentDataError(f"{name} must be float32 ({n},), got {a.dtype} {a.shape}")
        for name in ("dones", "terminals", "interventions"):
            a = getattr(self, name)
            if a.shape != (n,) or a.dtype != bool:
                raise LatentDataError(f"{name} must be bool ({n},), got {a.dtype} {a.shape}")
        if not np.isfinite(self.latents).all() or not np.isfinite(self.actions).all():
            raise LatentDataError("latents and actions must be finite")
        if (np.abs(self.actions) > 1.0).any():
            raise LatentDataError("actions must lie in [-1, 1] (the executed, clipped action)")
        if (self.terminals & ~self.dones).any():
            raise LatentDataError("a terminal step must also be an episode's last step (done)")
        e = self.episodes
        if len(self.episode_ids) != e or len(self.outcomes) != e:
            raise LatentDataError(
                f"{e} episode starts but {len(self.episode_ids)} episode ids and {len(self.outcomes)} outcomes"
            )
        if e == 0:
            if n:
                raise LatentDataError(f"{n} steps but no episode starts")
            return
        starts = self.episode_starts
        if starts.dtype != np.int64 or starts[0] != 0 or (np.diff(starts) < 1).any() or starts[-1] >= n:
            raise LatentDataError(f"episode_starts must be increasing int64 from 0 below {n}, got {starts}")
        expected = np.zeros(n, bool)
        expected[np.append(starts[1:], n) - 1] = True
        if not np.array_equal(expected, self.dones):
            raise LatentDataError("dones must mark exactly the last step of each episode")


# ---------------------------------------------------------------- computing latents


def encoder_key(model: VLAModel) -> str:
    """sha256 of what decides a latent: the config and every tensor of the backbone and token learner.

    The heads are left out, so a Stage 1 version (heads changed) keeps its parent's key and its latents. The base
    weights of an hf backbone (gigabytes, read-only files in hf_model_dir) are keyed by file name, size and mtime.
    """
    h = hashlib.sha256(model.config.to_json().encode())
    base = {f"backbone.{k}" for k in (model.backbone.base_state_keys() or set())}
    for name, tensor in sorted(model.state_dict().items()):
        if name.split(".")[0] in HEAD_GROUPS or name in base:
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    files = getattr(model.backbone, "base_weight_files", None)
    if base and files is not None:
        for path in files():
            st = Path(path).stat()
            h.update(f"{Path(path).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def model_inputs(
    transitions: Transitions, model: VLAModel, index: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (B, n_cam, 3, S, S), instruction ids (B,), proprio (B, P)) of the steps in `index`, through
    vla/preprocess.py's preprocess_images: the one preprocessing the supervised stage and the robot use."""
    cfg = model.config
    index = np.asarray(index, dtype=np.int64)
    if transitions.images.ndim != 5 or transitions.images.shape[1] != cfg.n_cameras:
        raise LatentDataError(
            f"transitions have images {transitions.images.shape}, the model takes {cfg.n_cameras} cameras "
            f"{list(cfg.cameras)}"
        )
    if transitions.proprio.shape[1] < cfg.proprio_dim:
        raise LatentDataError(
            f"proprio has {transitions.proprio.shape[1]} values, the model takes {cfg.proprio_dim}"
        )
    images = np.stack([preprocess_images(list(sample), cfg) for sample in transitions.images[index]])
    proprio = np.ascontiguousarray(transitions.proprio[index, : cfg.proprio_dim], dtype=np.float32)
    ids = transitions.instruction_ids[index].astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(proprio)


def encode_transitions(model: VLAModel, transitions: Transitions, batch_size: int = 32) -> np.ndarray:
    """(N, latent_dim) float32 latents of every step, backbone in eval mode, no gradients."""
    if batch_size < 1:
        raise LatentDataError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    out = np.empty((len(transitions), model.config.latent_dim), np.float32)
    try:
        with torch.no_grad():
            text = model.encode_instruction(transitions.instructions)
            # Preprocessed in chunks: the float images of a whole dataset would not fit in memory.
            for lo in range(0, len(transitions), batch_size):
                index = np.arange(lo, min(lo + batch_size, len(transitions)))
                images, ids, proprio = model_inputs(transitions, model, index)
                out[index] = model.encode(images, text[ids], proprio).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def from_transitions(
    model: VLAModel,
    transitions: Transitions,
    batch_size: int = 32,
    *,
    outcomes: Sequence[str] | None = None,
    terminal_outcomes: Sequence[str] = TERMINAL_OUTCOMES,
) -> LatentEpisodes:
    """Latent episodes of `transitions`. `outcomes` (one per episode, the catalogue's outcome) decide terminal vs
    truncated endings; without them an episode with reward is a success and every other one "unknown"."""
    if not transitions.episode_ids:
        raise LatentDataError("transitions hold no episodes (episode_ids is empty)")
    if outcomes is None:
        ends = np.append(transitions.episode_starts[1:], len(transitions)) - 1
        outcomes = ["success" if transitions.rewards[i] > 0 else "unknown" for i in ends]
    if len(outcomes) != transitions.episodes:
        raise LatentDataError(f"{len(outcomes)} outcomes for {transitions.episodes} episodes")
    latents = encode_transitions(model, transitions, batch_size)
    ends = np.append(transitions.episode_starts[1:], len(transitions)) - 1
    rewards = np.zeros(len(transitions), np.float32)
    rewards[ends] = [1.0 if o == "success" else 0.0 for o in outcomes]
    terminals = np.zeros(len(transitions), bool)
    terminals[ends] = [o in terminal_outcomes for o in outcomes]
    return LatentEpisodes(
        latents=latents,
        actions=np.ascontiguousarray(transitions.actions, np.float32),
        log_probs=np.ascontiguousarray(transitions.log_probs, np.float32),
        rewards=rewards,
        dones=transitions.dones.astype(bool),
        terminals=terminals,
        episode_starts=transitions.episode_starts.astype(np.int64),
        episode_ids=list(transitions.episode_ids),
        outcomes=list(outcomes),
        interventions=transitions.interventions.astype(bool),
    )


# ---------------------------------------------------------------- disk cache


class LatentCache:
    """Per-episode latents on disk: <dir>/<encoder key[:24]>/<episode id>-<episode sha256[:24]>.npz.

    Written to a unique temp name and renamed (atomic); loaded with allow_pickle=False. A file that does not load
    or does not match is a miss (it is recomputed and replaced), never an error: the cache only holds derived data.
    Rewards and terminals are not cached: they follow the episode's current label in the catalogue.
    """

    def __init__(self, directory: str | Path, model_key: str) -> None:
        if not model_key or not all(c in "0123456789abcdef" for c in model_key):
            raise LatentDataError(f"model_key must be a hex digest (see encoder_key), got {model_key!r}")
        self.directory = Path(directory) / model_key[:24]
        self.model_key = model_key

    def path(self, episode_id: str, sha256: str) -> Path:
        return self.directory / f"{episode_id}-{sha256[:24]}.npz"

    def get(self, episode_id: str, sha256: str) -> dict[str, np.ndarray] | None:
        path = self.path(episode_id, sha256)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                # an entry from before interventions were cached misses (KeyError) and is recomputed
                arrays = {k: data[k] for k in ("latents", "actions", "log_probs", "interventions", "key")}
        except (OSError, ValueError, KeyError):
            return None
        if str(arrays.pop("key")) != f"{_CACHE_FORMAT}:{self.model_key}:{sha256}":
            return None
        return arrays

    def put(
        self,
        episode_id: str,
        sha256: str,
        latents: np.ndarray,
        actions: np.ndarray,
        log_probs: np.ndarray,
        interventions: np.ndarray | None = None,
    ) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(episode_id, sha256)
        with durable.atomic_file(final) as f:
            np.savez(
                f,
                latents=latents,
                actions=actions,
                log_probs=log_probs,
                interventions=np.zeros(len(actions), bool) if interventions is None else interventions,
                key=np.array(f"{_CACHE_FORMAT}:{self.model_key}:{sha256}"),
            )
        return final


def latent_episodes_from_store(
    model: VLAModel,
    store: EpisodeStore,
    rows: Iterable[StoredEpisode],
    *,
    cache: LatentCache | None = None,
    dataset_cache_dir: Path | None = None,
    batch_size: int = 32,
    terminal_outcomes: Sequence[str] = TERMINAL_OUTCOMES,
) -> LatentEpisodes:
    """Latent episodes of catalogue rows (e.g. `store.trainable(source="policy")`); the backbone runs only for
    episodes not in `cache`. Episodes with no executed step (all holds) are left out."""
    if cache is not None and cache.model_key != encoder_key(model):
        raise LatentDataError("the latent cache's model key is not this model's encoder key")
    parts: list[LatentEpisodes] = []
    for row in rows:
        arrays = cache.get(row.episode_id, row.sha256) if cache is not None else None
        if arrays is None:
            if not row.trainable:
                raise LatentDataError(f"episode {row.episode_id} is not trainable (incomplete or corrupt)")
            try:
                data = load_transitions(store, [row], model.config.cameras, cache_dir=dataset_cache_dir)
            except DatasetError as exc:
                if str(exc).startswith("no trainable steps"):  # every step was a hold: nothing was executed
                    continue
                raise
            latents = encode_transitions(model, data, batch_size)
            arrays = {
                "latents": latents,
                "actions": data.actions,
                "log_probs": data.log_probs,
                "interventions": data.interventions,
            }
            if cache is not None:
                cache.put(row.episode_id, row.sha256, **arrays)
        parts.append(
            LatentEpisodes.from_episode(
                row.episode_id,
                arrays["latents"],
                arrays["actions"],
                row.outcome,
                arrays["log_probs"],
                terminal_outcomes=terminal_outcomes,
                interventions=arrays["interventions"],
            )
        )
    if not parts:
        return LatentEpisodes.empty(model.config.latent_dim, model.config.action_dim)
    return LatentEpisodes.concat(parts)


class BackboneLatents:
    """A `latent_fn` for the learners that recomputes latents through the frozen backbone instead of reading the
    cache: what RL without the cache does (the equivalence test and the benchmark compare the two)."""

    def __init__(self, model: VLAModel, transitions: Transitions) -> None:
        self.model = model
        self.transitions = transitions
        with torch.no_grad():  # once per instruction, as the robot does
            self.text = model.encode_instruction(transitions.instructions)

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        # From the raw uint8 frames: without the cache, preprocessing is part of every update too.
        images, ids, proprio = model_inputs(self.transitions, self.model, index.numpy())
        with torch.no_grad():
            return self.model.encode(images, self.text[ids], proprio)
