"""The policy slot: what the policy node runs at the control rate. A policy is swappable (scripted expert, random,
the VLA of issue 4) behind this one interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

ACTION_DIM = 4  # end-effector delta (x, y, z) + gripper, normalised to [-1, 1]
# Observation.extras key of the simulator's scripted expert action (the scripted expert acts on it).
EXPERT_ACTION_KEY = "expert_action"


@dataclass
class Observation:
    images: dict[str, np.ndarray]  # camera name -> HxWx3 uint8 at policy resolution
    proprioception: np.ndarray  # float32: ee x, y, z (m), gripper opening
    instruction: str
    stamp: float  # seconds, ROS time of the tick
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. the simulator's expert action


@dataclass
class PolicyOutput:
    action: np.ndarray  # (ACTION_DIM,) float32
    log_prob: float | None = None
    value: float | None = None


class PolicyError(RuntimeError):
    """The policy cannot act on this observation (missing input); the node holds the arm and logs why."""


class Policy(Protocol):
    name: str
    version: str

    def reset(self, instruction: str) -> None: ...

    def act(self, observation: Observation) -> PolicyOutput: ...
