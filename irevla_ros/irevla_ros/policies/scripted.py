"""Policies that need no model: Meta-World's scripted expert (optionally noisy) and a uniform random policy."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from irevla_ros.policies.base import ACTION_DIM, EXPERT_ACTION_KEY, Observation, PolicyError, PolicyOutput

__all__ = ["EXPERT_ACTION_KEY", "RandomPolicy", "ScriptedExpertPolicy", "expert_slot", "random_slot"]


class ScriptedExpertPolicy:
    """Follows the simulator's scripted expert, with Gaussian exploration noise.

    The expert's action arrives from the simulated cell (it needs the simulator state, not pixels); the noise makes
    demonstrations diverse, and the log-probability of the executed action under N(expert, sigma^2), before
    clipping, is recorded like any behaviour policy's.
    """

    name = "scripted_expert"

    def __init__(self, noise_std: float = 0.0, seed: int = 0, version: str = "scripted-expert") -> None:
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.noise_std = noise_std
        self.version = version
        self._rng = np.random.default_rng(seed)

    def reset(self, instruction: str) -> None:
        del instruction

    def act(self, observation: Observation) -> PolicyOutput:
        expert = observation.extras.get(EXPERT_ACTION_KEY)
        if expert is None:
            raise PolicyError("no expert action from the simulator yet")
        expert = np.asarray(expert, dtype=np.float64)
        if expert.shape != (ACTION_DIM,) or not np.all(np.isfinite(expert)):
            raise PolicyError(f"malformed expert action {expert!r}")
        if self.noise_std == 0.0:
            return PolicyOutput(np.clip(expert, -1, 1).astype(np.float32), log_prob=None)
        noise = self._rng.normal(0.0, self.noise_std, ACTION_DIM)
        log_prob = float(
            -0.5 * np.sum((noise / self.noise_std) ** 2)
            - ACTION_DIM * math.log(self.noise_std * math.sqrt(2 * math.pi))
        )
        return PolicyOutput(np.clip(expert + noise, -1, 1).astype(np.float32), log_prob=log_prob)


class RandomPolicy:
    """Uniform actions in [-1, 1]^4 (the log-density of a uniform is constant)."""

    name = "random"

    def __init__(self, seed: int = 0, version: str = "random") -> None:
        self.version = version
        self._rng = np.random.default_rng(seed)

    def reset(self, instruction: str) -> None:
        del instruction

    def act(self, observation: Observation) -> PolicyOutput:
        del observation
        return PolicyOutput(
            self._rng.uniform(-1, 1, ACTION_DIM).astype(np.float32), log_prob=-ACTION_DIM * math.log(2.0)
        )


def expert_slot(params: Mapping[str, object]) -> tuple[ScriptedExpertPolicy, None]:
    """Registry factory `scripted_expert` (see irevla_ros.policies): takes no versions."""
    return ScriptedExpertPolicy(noise_std=float(params["action_noise"]), seed=int(params["seed"])), None  # type: ignore[arg-type, call-overload]


def random_slot(params: Mapping[str, object]) -> tuple[RandomPolicy, None]:
    """Registry factory `random`: takes no versions."""
    return RandomPolicy(seed=int(params["seed"])), None  # type: ignore[call-overload]
