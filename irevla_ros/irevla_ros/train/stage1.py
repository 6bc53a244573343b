"""Stage 1 of iRe-VLA as the trainer node and the simulation benchmark drive it: online RL on the heads, VLM frozen.

    rl = OnlineRL(model, Stage1Config(algorithm="ppo"), checkpoint_dir)   # resumes if checkpoint_dir has one
    rl.add_demos(demos)                      # SACfD only: D_e and/or the initial VLA's successes
    for each new stored episode batch:
        rl.add_episodes(latent_episodes)     # successes and failures of the current policy
        stats = rl.step()                    # an update when there is enough new data, else None
        if rl.should_push(time.monotonic()):
            push(rl.heads_state_dict()); rl.mark_pushed(time.monotonic())
    d_rl = rl.successes()                    # episode ids for Stage 2

When to update: PPO (on-policy) once `episodes_per_update` new episodes have arrived, on exactly those episodes;
SACfD `utd_ratio` gradient updates per new online transition (at most `max_updates_per_step` per call, the rest
is owed to the next call so the caller stays responsive). Pushes every `push_every_episodes` episodes or
`push_every_seconds` seconds, whichever comes first, and only when the heads changed (as HIL-SERL does).

Resume: a checkpoint (train/checkpoint.py: atomic, checksummed) is written every `checkpoint_every_updates`
updates and holds the heads' weights, the learner (optimisers, counters, SACfD critics and buffers), the RNG
states, the PPO episodes not yet used, the successes and the ids of every episode whose data is inside. OnlineRL
built on a directory with a checkpoint restores all of it and never re-initialises weights; without one it starts
fresh: torch's and numpy's global RNGs seeded with `seed`, and a fresh critic head (the paper starts every
iteration with a new critic). Episodes added after the
last checkpoint are not in it: after a restart, add again every stored episode not in `seen_episode_ids()`
(adding an episode twice is ignored, so re-adding everything is safe too).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irevla_ros.train.checkpoint import Checkpointer, CheckpointError, rng_state, set_rng_state
from irevla_ros.train.config import ALGORITHMS, Stage1Config, Stage1Error  # noqa: F401 (re-exported)
from irevla_ros.train.latents import LatentEpisodes, encoder_key
from irevla_ros.train.ppo import PPOLearner
from irevla_ros.train.sacfd import SACfDLearner
from irevla_ros.vla.model import HEAD_GROUPS, VLAModel, with_residual_defaults

_FORMAT = 1
_LOG = logging.getLogger(__name__)


def _episodes_state(batch: LatentEpisodes | None) -> dict[str, Any] | None:
    if batch is None or not len(batch):
        return None
    arrays = (
        "latents",
        "actions",
        "log_probs",
        "rewards",
        "dones",
        "terminals",
        "episode_starts",
        "interventions",
    )
    state: dict[str, Any] = {k: torch.from_numpy(np.ascontiguousarray(getattr(batch, k))) for k in arrays}
    state["episode_ids"] = list(batch.episode_ids)
    state["outcomes"] = list(batch.outcomes)
    return state


def _episodes_from_state(state: Mapping[str, Any] | None) -> LatentEpisodes | None:
    if state is None:
        return None
    arrays = {k: v.numpy().copy() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return LatentEpisodes(**arrays, episode_ids=list(state["episode_ids"]), outcomes=list(state["outcomes"]))


class OnlineRL:
    def __init__(
        self, model: VLAModel, config: Stage1Config | None = None, checkpoint_dir: str | Path | None = None
    ) -> None:
        self.model = model
        self.config = cfg = config or Stage1Config()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.encoder_key = encoder_key(model)
        self.checkpointer = (
            Checkpointer(checkpoint_dir, keep=cfg.keep_checkpoints) if checkpoint_dir else None
        )
        resumed = self.checkpointer.latest() if self.checkpointer is not None else None
        if resumed is None:
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed)
            if cfg.fresh_critic:
                model.fresh_critic()
        # The learner is built after fresh_critic: its optimiser holds the parameters it finds.
        self.learner: PPOLearner | SACfDLearner
        if cfg.algorithm == "ppo":
            self.learner = PPOLearner(model, cfg.ppo, seed=cfg.seed)
        else:
            self.learner = SACfDLearner(model, cfg.sacfd, seed=cfg.seed)
        self.updates = 0
        self.episodes_seen = 0
        self.transitions_seen = 0
        self.episodes_since_push = 0
        self.updates_since_push = 0
        self.pushes = 0
        self.owed_updates = 0  # SACfD: updates earned by new transitions and not yet run
        self._pending: LatentEpisodes | None = None  # PPO: new episodes not yet used
        self._successes: list[str] = []
        self._seen: set[str] = set()
        self._last_push = time.monotonic()
        self.resumed_from: int | None = None
        if resumed is not None:
            self._restore(*resumed)

    # ---- data in ----
    def _new_only(self, batch: LatentEpisodes) -> LatentEpisodes | None:
        if (
            batch.latent_dim != self.model.config.latent_dim
            or batch.action_dim != self.model.config.action_dim
        ):
            raise Stage1Error(
                f"episodes have latent/action dims ({batch.latent_dim}, {batch.action_dim}), the model "
                f"({self.model.config.latent_dim}, {self.model.config.action_dim})"
            )
        keep = [i for i, e in enumerate(batch.episode_ids) if e not in self._seen]
        if len(set(batch.episode_ids[i] for i in keep)) != len(keep):
            raise Stage1Error(f"duplicate episode ids within one batch: {batch.episode_ids}")
        if not keep:
            return None
        if len(keep) == batch.episodes:
            return batch
        return LatentEpisodes.concat([batch.episode(i) for i in keep])

    def add_episodes(self, batch: LatentEpisodes) -> int:
        """New episodes of the policy (successes and failures); returns how many were new (others: ignored).

        Steps the operator commanded (`interventions`, a takeover) are not the policy's actions: SACfD puts those
        transitions into its demo buffer and the rest into the online buffer, as HIL-SERL does; PPO keeps the
        whole episode for its advantages but leaves them out of its loss (ppo.PPOLearner.update)."""
        new = self._new_only(batch)
        if new is None:
            return 0
        if self.config.algorithm == "ppo":
            self._pending = new if self._pending is None else self._pending.append(new)
            self.transitions_seen += len(new)
        else:
            operator, policy = new.by_commander()
            added = 0
            for part, demo in ((operator, True), (policy, False)):
                if part is not None:
                    added += self.learner.add_episodes(part, demo=demo)  # type: ignore[call-arg]
            self.transitions_seen += added
            if self.episodes_seen + new.episodes > self.config.learning_starts:
                self.owed_updates += added * self.config.sacfd.utd_ratio
        self.episodes_seen += new.episodes
        self.episodes_since_push += new.episodes
        self._seen.update(new.episode_ids)
        self._successes += new.success_ids()
        return new.episodes

    def add_demos(self, batch: LatentEpisodes) -> int:
        """Demonstrations into SACfD's demo buffer (D_e and/or the initial VLA's successful episodes)."""
        if self.config.algorithm != "sacfd":
            raise Stage1Error("add_demos: PPO learns on-policy only; demonstrations need algorithm 'sacfd'")
        new = self._new_only(batch)
        if new is None:
            return 0
        self.learner.add_episodes(new, demo=True)  # type: ignore[call-arg]
        self._seen.update(new.episode_ids)
        return new.episodes

    def calibrate_exploration(self, demos: LatentEpisodes) -> list[float] | None:
        """On a fresh start (not a resume), set the exploration std per action dimension to the running policy's
        RMS error on `demos` (the demonstrations, latents of this encoder), within the configured bounds, and
        return it; None when off or resumed. The version's own log_std is a constant of its config (Stage 0 and
        2 do not train it), usually far wider than the policy's error where it is competent, so sampled actions
        failed where the deterministic ones succeeded."""
        cfg = self.config
        if not cfg.calibrate_exploration or self.resumed_from is not None or not len(demos):
            return None
        with torch.no_grad():
            latents = torch.from_numpy(demos.latents).to(self.model.log_std.device)
            actions = torch.from_numpy(demos.actions).to(self.model.log_std.device)
            rms = (self.model.action_mean(latents) - actions).pow(2).mean(dim=0).sqrt()
            std = rms.clamp(cfg.exploration_min_std, cfg.exploration_max_std)
            self.model.log_std.copy_(std.log())
        return [round(float(v), 4) for v in std]

    # ---- learning ----
    def step(self) -> dict[str, float] | None:
        """Run an update if enough new data is there; checkpoint on schedule; None when nothing was done."""
        cfg = self.config
        if cfg.algorithm == "ppo":
            if self._pending is None or self._pending.episodes < cfg.episodes_per_update:
                return None
            batch, self._pending = self._pending, None
            stats = self.learner.update(batch)  # type: ignore[arg-type]
        else:
            learner: SACfDLearner = self.learner  # type: ignore[assignment]
            if self.owed_updates < 1 or not learner.ready():
                return None
            warm = learner.warm_start_critic()  # once, before the first online update; None after
            n = min(self.owed_updates, cfg.max_updates_per_step)
            stats = learner.update(n)
            if warm is not None:
                stats["warm_start_critic_loss"] = warm["critic_loss"]
            self.owed_updates -= n
        self.updates += 1
        self.updates_since_push += 1
        if (
            self.checkpointer is not None
            and cfg.checkpoint_every_updates
            and self.updates % cfg.checkpoint_every_updates == 0
        ):
            self.checkpoint()
        stats.update(self.counters())
        return stats

    # ---- pushing heads to the robot ----
    def should_push(self, now: float) -> bool:
        """True when the heads changed since the last push and N episodes or T seconds (time.monotonic) passed."""
        cfg = self.config
        if self.updates_since_push == 0:
            return False
        by_count = cfg.push_every_episodes > 0 and self.episodes_since_push >= cfg.push_every_episodes
        by_time = cfg.push_every_seconds > 0 and now - self._last_push >= cfg.push_every_seconds
        return by_count or by_time

    def mark_pushed(self, now: float) -> None:
        self._last_push = now
        self.episodes_since_push = 0
        self.updates_since_push = 0
        self.pushes += 1

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the trained tensors (action head, critic head, log_std), model state-dict names."""
        return {
            k: v.detach().clone()
            for k, v in self.model.state_dict().items()
            if k.split(".")[0] in HEAD_GROUPS
        }

    # ---- what it saw ----
    def successes(self) -> list[str]:
        """Ids of the successful policy episodes seen, in arrival order (they go to D_RL)."""
        return list(self._successes)

    def seen_episode_ids(self) -> set[str]:
        return set(self._seen)

    def counters(self) -> dict[str, int]:
        return {
            "updates": self.updates,
            "gradient_steps": int(
                getattr(self.learner, "gradient_steps", getattr(self.learner, "updates", 0))
            ),
            "episodes_seen": self.episodes_seen,
            "transitions_seen": self.transitions_seen,
            "successes": len(self._successes),
            "pushes": self.pushes,
            "owed_updates": self.owed_updates,
            "pending_episodes": 0 if self._pending is None else self._pending.episodes,
        }

    # ---- checkpoints ----
    def checkpoint(self) -> Path:
        if self.checkpointer is None:
            raise Stage1Error("this OnlineRL has no checkpoint_dir")
        state = {
            "format": _FORMAT,
            "algorithm": self.config.algorithm,
            "config": self.config.to_dict(),
            "encoder_key": self.encoder_key,
            "heads": self.heads_state_dict(),
            "learner": self.learner.state_dict(),
            "rng": rng_state(),
            "counters": {
                "updates": self.updates,
                "episodes_seen": self.episodes_seen,
                "transitions_seen": self.transitions_seen,
                "episodes_since_push": self.episodes_since_push,
                "updates_since_push": self.updates_since_push,
                "pushes": self.pushes,
                "owed_updates": self.owed_updates,
            },
            "pending": _episodes_state(self._pending),
            "successes": list(self._successes),
            "seen": sorted(self._seen),
        }
        return self.checkpointer.save(self.updates, state)

    def _restore(self, step: int, state: Mapping[str, Any]) -> None:
        if state.get("format") != _FORMAT or state.get("algorithm") != self.config.algorithm:
            raise Stage1Error(
                f"checkpoint {step} is format {state.get('format')} / algorithm {state.get('algorithm')!r}; "
                f"this run is format {_FORMAT} / {self.config.algorithm!r}"
            )
        if state.get("encoder_key") != self.encoder_key:
            raise Stage1Error(
                f"checkpoint {step} was trained on another backbone (encoder key differs): its latents and heads "
                "do not fit this model; use a new checkpoint directory"
            )
        own = self.model.state_dict()
        heads = with_residual_defaults(state["heads"], self.model)  # checkpoints before the residual had none
        expected = {k for k in own if k.split(".")[0] in HEAD_GROUPS}
        if set(heads) != expected or any(own[k].shape != heads[k].shape for k in heads):
            raise CheckpointError(f"checkpoint {step}: its head tensors do not match the model's")
        with torch.no_grad():
            for k, v in heads.items():
                own[k].copy_(v)
        self.learner.load_state_dict(state["learner"])
        set_rng_state(state["rng"])
        for k, v in state["counters"].items():
            setattr(self, k, int(v))
        self._pending = _episodes_from_state(state["pending"])
        self._successes = list(state["successes"])
        self._seen = set(state["seen"])
        self.resumed_from = step
        _LOG.info(
            "Stage 1 resumed from checkpoint %d (%d updates, %d episodes)",
            step,
            self.updates,
            self.episodes_seen,
        )
