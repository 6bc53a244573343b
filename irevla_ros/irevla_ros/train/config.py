"""The training settings: one dataclass per stage, one documented field per setting (CleanRL style).

These dataclasses are the only place a training default, description or range is written: the trainer node's
ROS parameters are generated from `IterationConfig` (nested configs become dotted names: `stage1.ppo.lr`,
`stage2.steps`) and the trainer builds its config back from them with `from_parameters`. Each `__post_init__`
checks its fields against those same declarations (`check_settings`), so a range has no second copy here.
Plain Python without torch, so that the parameter schema (read by every node and by `irevla check-config`) does
not load it.
The learners re-export their config from here (`train.ppo.PPOConfig` is `train.config.PPOConfig`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from irevla_ros.param_spec import check_settings, group, internal, setting
from irevla_ros.sim import DEFAULT_TASKS

ALGORITHMS = ("ppo", "sacfd")
TRAINABLE_SETS = ("lora_and_action_head", "full")
DEVICES = ("cpu", "cuda", "auto")


class PPOConfigError(ValueError):
    """A PPO hyperparameter is out of range; the message names it."""


class SACfDConfigError(ValueError):
    """A SACfD hyperparameter is out of range; the message names it."""


class Stage1Error(ValueError):
    """Stage 1 was given a bad config, data that does not fit, or a checkpoint of another run."""


class SFTConfigError(ValueError):
    """A supervised-stage setting or its input data is wrong; the message names what."""


class ResumeError(SFTConfigError):
    """A checkpoint belongs to another run (other settings or other data) than the one asked to resume."""


# ---------------------------------------------------------------- Stage 1: PPO


@dataclass
class PPOConfig:
    lr: float = setting(3e-4, "PPO: Adam learning rate of the heads", min=0.0, min_exclusive=True)
    adam_eps: float = setting(1e-5, "PPO: Adam epsilon", min=0.0, min_exclusive=True)
    gamma: float = setting(0.99, "PPO: discount factor", min=0.0, max=1.0)
    gae_lambda: float = setting(0.95, "PPO: GAE lambda", min=0.0, max=1.0)
    update_epochs: int = setting(4, "PPO: passes over each on-policy batch", min=1)
    minibatch_size: int = setting(64, "PPO: steps per minibatch", min=1)
    clip_coef: float = setting(0.2, "PPO: surrogate clipping coefficient", min=0.0, min_exclusive=True)
    clip_vloss: bool = setting(True, "PPO: clip the value loss like the surrogate")
    vf_coef: float = setting(0.5, "PPO: value loss coefficient", min=0.0)
    # Sparse binary reward: exploration comes from log_std, which PPO also adapts.
    ent_coef: float = setting(0.0, "PPO: entropy bonus coefficient", min=0.0)
    max_grad_norm: float = setting(0.5, "PPO: global gradient clipping norm", min=0.0, min_exclusive=True)
    target_kl: float = setting(0.05, "PPO: stop an update's epochs above this KL (0: never)", min=0.0)
    norm_adv: bool = setting(True, "PPO: normalise advantages per minibatch")

    def __post_init__(self) -> None:
        check_settings(self, PPOConfigError, "PPO")


# ---------------------------------------------------------------- Stage 1: SACfD


@dataclass
class SACfDConfig:
    gamma: float = setting(0.99, "SACfD: discount factor", min=0.0, max=1.0)
    tau: float = setting(
        0.005, "SACfD: polyak step of the target critics", min=0.0, max=1.0, min_exclusive=True
    )
    actor_lr: float = setting(3e-4, "SACfD: actor learning rate", min=0.0, min_exclusive=True)
    critic_lr: float = setting(3e-4, "SACfD: critic learning rate", min=0.0, min_exclusive=True)
    alpha_lr: float = setting(3e-4, "SACfD: temperature learning rate", min=0.0, min_exclusive=True)
    batch_size: int = setting(256, "SACfD: transitions per gradient update", min=1)
    demo_fraction: float = setting(
        0.5, "SACfD: share of each batch from the demo buffer (when both hold data)", min=0.0, max=1.0
    )
    # 4 and LayerNorm critics: what worked best of the RLPD parts measured on the frozen-feature reach task
    # (train/sacfd.py's docstring has the numbers); n-step returns and the critic warm-start did not add to it.
    utd_ratio: int = setting(4, "SACfD: gradient updates per new online transition", min=1)
    n_critics: int = setting(2, "SACfD: critics in the ensemble", min=2)
    critic_layer_norm: bool = setting(True, "SACfD: LayerNorm in the critics' hidden layers (RLPD)")
    n_step: int = setting(1, "SACfD: n-step returns (1: one-step TD)", min=1)
    critic_warm_start_updates: int = setting(
        0, "SACfD: critic-only updates on the demo buffer before the first online update (0: none)", min=0
    )
    bc_weight: float = setting(
        1.0,
        "SACfD: weight of a behaviour-cloning term on the actor (MSE of its mean to the demo actions of the batch's "
        "demo part; 0: off, as RLPD): keeps the one action head, shared by every task, close to what it was shown",
        min=0.0,
    )
    anchor_weight: float = setting(
        1.0,
        "SACfD: weight of an anchor on the actor (MSE of its mean to the mean of the action head as Stage 1 found it, "
        "on every state of the batch, online ones included; 0: off): the one action head serves every task, and "
        "without it the critic's early gradients moved it off the task being learned (train/sacfd.py has the numbers)",
        min=0.0,
    )
    residual_scale: float = setting(
        0.0,
        "SACfD: train a residual actor instead of the action head (PLD, EXPO-FT): a correction of at most this much "
        "per action dimension (pre-tanh) on top of the running policy's head, which stays frozen; the next Stage 2 "
        "distils it into the action head (0: off, the actor is the action head)",
        min=0.0,
        max=2.0,
    )
    # The reward is 0/1: a large start temperature would drown it.
    init_temperature: float = setting(0.01, "SACfD: initial entropy temperature", min=0.0, min_exclusive=True)
    target_entropy: float | None = internal(None, "SACfD: target entropy; None: -action_dim / 2 (RLPD)")
    actor_delay: int = setting(1, "SACfD: one actor/temperature update every N critic updates", min=1)
    max_grad_norm: float = setting(10.0, "SACfD: gradient clipping norm", min=0.0, min_exclusive=True)
    min_transitions: int = setting(
        64, "SACfD: no update before the buffers hold this many transitions", min=1
    )
    demo_capacity: int = setting(
        1_000_000, "SACfD: demo buffer transitions (oldest episodes go first)", min=1
    )
    online_capacity: int = setting(1_000_000, "SACfD: online buffer transitions", min=1)

    def __post_init__(self) -> None:
        check_settings(self, SACfDConfigError, "SACfD")


# ---------------------------------------------------------------- Stage 1


@dataclass
class Stage1Config:
    algorithm: str = setting(
        "ppo", "Stage 1 algorithm: ppo (simulation, on-policy) or sacfd (robot, demos + off-policy)",
        choices=ALGORITHMS,
    )  # fmt: skip
    episodes_per_update: int = setting(2, "PPO: new policy episodes per Stage 1 update", min=1)
    max_updates_per_step: int = setting(
        2000, "SACfD: gradient updates one step runs at most (the rest is owed)", min=1
    )
    learning_starts: int = setting(
        0,
        "SACfD: online episodes collected before the first update (their transitions earn no updates): the first "
        "actor updates then follow a critic that has seen the new task",
        min=0,
    )
    push_every_episodes: int = setting(
        2, "push Stage 1 head updates to the policy every N episodes (0: not by count)", min=0
    )
    push_every_seconds: float = setting(0.0, "... or every N seconds (0: not by time)", min=0.0)
    checkpoint_every_updates: int = setting(
        1, "Stage 1 checkpoint every N updates (0: on request only)", min=0
    )
    keep_checkpoints: int = setting(2, "Stage 1 checkpoints kept", min=1)
    seed: int = setting(0, "Stage 1 seed (torch and numpy RNGs of a fresh start)", min=0)
    # The heads' ops are tiny: a second thread does not help them, and on a busy 2-core host it made each
    # gradient step ~50x slower (OpenMP waiting for a core).
    threads: int = setting(1, "Stage 1 torch intra-op threads (0: leave torch's setting)", min=0)
    fresh_critic: bool = setting(
        True, "a fresh Stage 1 start replaces the critic head (the paper); a resume never does"
    )
    calibrate_exploration: bool = setting(
        True,
        "a fresh Stage 1 start sets the exploration std (log_std) per action dimension to the running version's "
        "RMS error on the demonstrations (clipped to exploration_min_std..max_std): it explores where it is unsure",
    )
    exploration_min_std: float = setting(
        0.05, "calibrated exploration std: lower bound", min=0.0, min_exclusive=True
    )
    exploration_max_std: float = setting(
        0.37, "calibrated exploration std: upper bound", min=0.0, min_exclusive=True
    )
    ppo: PPOConfig = group(PPOConfig, "PPO settings (update_epochs = PPO's updates per batch)")
    sacfd: SACfDConfig = group(SACfDConfig, "SACfD settings (utd_ratio = SACfD's updates per transition)")

    def __post_init__(self) -> None:
        if isinstance(self.ppo, Mapping):
            self.ppo = _sub_config(PPOConfig, self.ppo, "ppo")
        if isinstance(self.sacfd, Mapping):
            self.sacfd = _sub_config(SACfDConfig, self.sacfd, "sacfd")
        check_settings(self, Stage1Error, "Stage 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage1Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Stage1Error(
                f"unknown Stage 1 config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**dict(data))


def _sub_config(kind: type, data: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise Stage1Error(f"unknown Stage 1 config key(s) {where}.{', '.join(unknown)}")
    return kind(**dict(data))


# ---------------------------------------------------------------- Stage 0 / Stage 2 (supervised)


@dataclass
class SFTConfig:
    steps: int = setting(150, "supervised optimiser steps", min=1)
    batch_size: int = setting(16, "supervised batch size (global: all processes together)", min=1)
    lr: float = setting(3e-4, "learning rate of token learner, action head, new backbone layers", min=0.0)
    lr_lora: float = setting(
        1e-4, "learning rate of LoRA (and, trainable=full, the pretrained backbone weights)", min=0.0
    )
    weight_decay: float = setting(0.01, "AdamW weight decay", min=0.0)
    rl_fraction: float = setting(
        0.5, "share of each batch drawn from D_RL when it is given", min=0.0, max=1.0
    )
    grad_clip: float = setting(1.0, "gradient clipping norm", min=0.0)
    seed: int = setting(0, "supervised seed", min=0)
    threads: int = setting(2, "torch intra-op threads of the supervised stage", min=1)
    trainable: str = setting("lora_and_action_head", "what learns (see train/sft.py)", choices=TRAINABLE_SETS)
    checkpoint_every: int = setting(
        50, "steps between checkpoints (when a checkpoint folder is given)", min=1
    )
    keep_checkpoints: int = setting(2, "supervised checkpoints kept", min=1)
    device: str = setting("auto", "cpu, cuda, or auto: cuda when torch sees a GPU", choices=DEVICES)

    def __post_init__(self) -> None:
        check_settings(self, SFTConfigError, "supervised")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SFTConfig:
        if not isinstance(data, Mapping):
            raise SFTConfigError(f"an SFTConfig must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SFTConfigError(
                f"unknown SFTConfig key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SFTConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SFTConfigError(f"SFTConfig is not valid JSON: {exc}") from exc


# ---------------------------------------------------------------- the iteration loop


@dataclass
class IterationConfig:
    # end of a session (besides the operator's RunIteration goal)
    episode_budget: int = setting(
        0, "policy episodes per session, then Stage 2 (0: the operator decides)", min=0
    )
    plateau_window: int = setting(
        0, "end a session when the last N episodes did not beat the N before by plateau_delta (0: off)", min=0
    )
    plateau_delta: float = setting(
        0.05, "success-rate gain below which a session has plateaued", min=0.0, max=1.0
    )
    auto_iterate: bool = setting(True, "start Stage 2 by itself when a session ends by budget or plateau")
    max_iterations: int = setting(0, "stop iterating after N iterations (0: never)", min=0)
    stage1_enabled: bool = setting(True, "online RL on the heads (VLM frozen) during sessions")
    stage1: Stage1Config = group(Stage1Config, "Stage 1 (online RL) settings")
    stage2: SFTConfig = group(SFTConfig, "Stage 2 (supervised on D_e and D_RL) settings")
    stage2_launcher: str = setting(
        "local", "where Stage 2 runs: local, torchrun, or a remote command template with {job}"
    )
    stage2_nproc: int = setting(1, "torchrun processes for Stage 2", min=1)
    validation_tasks: tuple[str, ...] = setting(
        DEFAULT_TASKS, "simulation: tasks the candidate is evaluated on"
    )
    validation_episodes: int = setting(
        0, "simulation: evaluation episodes per task (0: finite-output and ONNX checks only)", min=0
    )
    validation_margin: float = setting(
        0.1,
        "promote unless the candidate's success rate is lower than the running or the best promoted version's by "
        "more than this",
        min=0.0,
        max=1.0,
    )
    validation_seed: int = setting(10_000, "first scene seed of the evaluation episodes", min=0)

    def __post_init__(self) -> None:
        check_settings(self, ValueError, "iteration")
