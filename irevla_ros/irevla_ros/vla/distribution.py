"""Gaussian exploration around the tanh-bounded action mean, clipped to the action box [-1, 1].

The executed action is the clipped sample, and its log-probability is that of the clipped Gaussian: the normal
density inside the box and the tail mass at a bound (log Phi). So the log-probability recorded with a step is
exactly reproducible later from the stored action (`log_prob(action)`), as PPO's ratio needs, without storing the
unclipped sample. In evaluation the action is the mean.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class ClippedNormal:
    """Independent per-dimension N(mean, std^2) clipped to [-1, 1] (torch; differentiable in mean and log_std)."""

    def __init__(self, mean: torch.Tensor, log_std: torch.Tensor) -> None:
        self.mean = mean
        self.log_std = log_std.expand_as(mean)
        self.std = self.log_std.exp()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            noise = torch.randn(
                self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device
            )
            return (self.mean + self.std * noise).clamp(-1.0, 1.0)

    def log_prob(self, action: torch.Tensor) -> torch.Tensor:
        """(B, A) actions in [-1, 1] -> (B,) log-probabilities."""
        z = (action - self.mean) / self.std
        inside = -0.5 * z**2 - self.log_std - _LOG_SQRT_2PI
        low = torch.special.log_ndtr((-1.0 - self.mean) / self.std)
        high = torch.special.log_ndtr((self.mean - 1.0) / self.std)
        per_dim = torch.where(action <= -1.0, low, torch.where(action >= 1.0, high, inside))
        return per_dim.sum(-1)

    def entropy(self) -> torch.Tensor:
        # The Gaussian's entropy (an upper bound of the clipped one's differential part); the usual PPO bonus.
        return (self.log_std + 0.5 + _LOG_SQRT_2PI).sum(-1)


def _log_ndtr(x: np.ndarray) -> np.ndarray:
    """log Phi(x) for float64 arrays, stable in the far left tail (numpy has no erfc; torch is not needed here)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    far = x < -20.0
    near = ~far
    out[near] = np.log(0.5 * np.array([math.erfc(-v / math.sqrt(2.0)) for v in x[near]]))
    xf = x[far]
    out[far] = -0.5 * xf**2 - np.log(-xf) - _LOG_SQRT_2PI
    return out


def clipped_normal_log_prob(action: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> float:
    """numpy twin of ClippedNormal.log_prob for one action (A,)."""
    action = np.asarray(action, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    log_std = np.broadcast_to(np.asarray(log_std, dtype=np.float64), mean.shape)
    std = np.exp(log_std)
    inside = -0.5 * ((action - mean) / std) ** 2 - log_std - _LOG_SQRT_2PI
    low = _log_ndtr((-1.0 - mean) / std)
    high = _log_ndtr((mean - 1.0) / std)
    per_dim = np.where(action <= -1.0, low, np.where(action >= 1.0, high, inside))
    return float(per_dim.sum())


def sample_action(
    mean: np.ndarray, log_std: np.ndarray, rng: np.random.Generator, *, deterministic: bool
) -> tuple[np.ndarray, float]:
    """(action in [-1, 1] as float32, its log-probability) for one observation; the mean when deterministic."""
    mean = np.asarray(mean, dtype=np.float64)
    if deterministic:
        action = np.clip(mean, -1.0, 1.0)
    else:
        std = np.exp(np.broadcast_to(np.asarray(log_std, dtype=np.float64), mean.shape))
        action = np.clip(mean + std * rng.standard_normal(mean.shape), -1.0, 1.0)
    action32 = action.astype(np.float32)
    return action32, clipped_normal_log_prob(action32, mean, log_std)
