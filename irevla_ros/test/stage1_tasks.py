"""Small tasks for the Stage 1 tests: the real VLAModel heads on latents from a frozen random feature map.

`Reach`: a batch of 2-D reaches. A point starts anywhere in [-0.6, 0.6]^2 and moves by 0.2 * action[:2] per step;
the episode succeeds (sparse reward 1, terminal) when it is within 0.15 of its goal, and times out (truncated)
after `horizon` steps. The observation (position, goal, their difference) goes through a fixed random
tanh(W x + b) into the model's latent space, standing in for the frozen VLM: the heads see only the latent.
The initial VLA's action mean is ~0 (the action head's last layer starts near zero), so before RL the
deterministic policy only succeeds when it starts at the goal.
"""

from __future__ import annotations

import numpy as np
import torch

from irevla_ros.train.latents import LatentEpisodes
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.model import VLAModel

SMALL = VLAConfig(
    image_size=32,
    latent_dim=32,
    head_hidden=(64, 64),
    fusion_layers=1,
    fusion_heads=2,
    token_learner_hidden=32,
    text_tokens=1,
    lora_rank=4,
)


def small_model(seed: int = 0) -> VLAModel:
    torch.manual_seed(seed)
    return VLAModel(SMALL, load_pretrained=False)


class Reach:
    def __init__(self, seed: int, latent_dim: int = 32, horizon: int = 10) -> None:
        self.rng = np.random.default_rng(seed)
        self.horizon = horizon
        g = torch.Generator().manual_seed(1234)  # the same frozen features for every instance
        self.w = torch.randn(6, latent_dim, generator=g)
        self.b = torch.randn(latent_dim, generator=g) * 0.5

    def features(self, position: np.ndarray, goal: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.concatenate([position, goal, position - goal], 1).astype(np.float32))
        return torch.tanh(x @ self.w + self.b)

    def rollout(
        self, model: VLAModel, n: int, *, deterministic: bool, prefix: str = "ep"
    ) -> tuple[LatentEpisodes, float]:
        """n episodes of `model` (exploring unless deterministic) -> (latent episodes, success rate)."""
        position = self.rng.uniform(-0.6, 0.6, (n, 2))
        goal = self.rng.uniform(-0.6, 0.6, (n, 2))
        generator = torch.Generator().manual_seed(int(self.rng.integers(2**31)))
        alive = np.ones(n, bool)
        success = np.zeros(n, bool)
        latents: list[list[np.ndarray]] = [[] for _ in range(n)]
        actions: list[list[np.ndarray]] = [[] for _ in range(n)]
        log_probs: list[list[float]] = [[] for _ in range(n)]
        for _ in range(self.horizon):
            z = self.features(position, goal)
            out = model.act(None, None, None, deterministic=deterministic, generator=generator, latent=z)  # type: ignore[arg-type]
            a = out.action.numpy()
            for i in np.flatnonzero(alive):
                latents[i].append(z[i].numpy())
                actions[i].append(a[i])
                log_probs[i].append(float(out.log_prob[i]))
            position = np.where(alive[:, None], position + 0.2 * a[:, :2], position)
            hit = alive & (np.linalg.norm(position - goal, axis=1) < 0.15)
            success |= hit
            alive &= ~hit
        episodes = [
            LatentEpisodes.from_episode(
                f"{prefix}-{i}",
                np.stack(latents[i]),
                np.stack(actions[i]),
                "success" if success[i] else "timeout",
                np.asarray(log_probs[i], np.float32),
            )
            for i in range(n)
        ]
        return LatentEpisodes.concat(episodes), float(success.mean())

    def demos(self, n: int, prefix: str = "demo") -> LatentEpisodes:
        """A scripted expert (straight at the goal): the demonstrations of the SACfD demo buffer."""
        episodes = []
        for i in range(n):
            position = self.rng.uniform(-0.6, 0.6, 2)
            goal = self.rng.uniform(-0.6, 0.6, 2)
            latents, actions = [], []
            ok = False
            for _ in range(self.horizon):
                latents.append(self.features(position[None], goal[None])[0].numpy())
                a = np.zeros(4, np.float32)
                a[:2] = np.clip((goal - position) / 0.2, -1.0, 1.0)
                actions.append(a)
                position = position + 0.2 * a[:2]
                ok = bool(np.linalg.norm(position - goal) < 0.15)
                if ok:
                    break
            outcome = "success" if ok else "timeout"
            episodes.append(
                LatentEpisodes.from_episode(f"{prefix}-{i}", np.stack(latents), np.stack(actions), outcome)
            )
        return LatentEpisodes.concat(episodes)


def behaviour_clone(model: VLAModel, demos: LatentEpisodes, steps: int, lr: float = 1e-3) -> VLAModel:
    """Stage 0 on the latents: the action head's mean regressed on the demonstrations' actions (full batch,
    Adam), so Stage 1 starts, as in iRe-VLA, from a policy that solves the task some of the time."""
    latents, actions = torch.from_numpy(demos.latents), torch.from_numpy(demos.actions)
    optimiser = torch.optim.Adam(model.action_head.parameters(), lr=lr)
    for _ in range(steps):
        loss = (model.action_mean(latents) - actions).pow(2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model
