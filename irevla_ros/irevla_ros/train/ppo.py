"""PPO for Stage 1 of iRe-VLA: the VLM is frozen, only the heads learn (action head, critic head, log_std).

CleanRL's continuous PPO (clipped surrogate, clipped value loss, entropy bonus, GAE, minibatch epochs,
per-minibatch advantage normalisation, global gradient clipping, target-KL early stop), on whole stored episodes
of sparse binary reward instead of a vectorised environment:

- The behaviour log-probabilities come from the step records (what the robot's policy computed when it acted);
  where a record has none (NaN) the current policy's is used, which makes those steps on-policy by assumption.
- Bootstrapping: a successful episode ends in a terminal state (value 0 after it); any other ending (timeout,
  failure label, abort) is a truncation, whose next state is unknown: its value is estimated by the value of the
  last observed state (the best estimate there is without the next observation).
- Target KL: measured against the policy at the start of this update (not the behaviour policy, which may be a
  few pushes old), so stale data cannot stop every update before its first step.
- Operator takeovers: steps with `interventions` set were commanded by the operator, not sampled from the
  policy, so they have no behaviour log-probability of the policy's and are not its actions: they stay in the
  episode for GAE (their rewards and values carry the return back to the policy's earlier steps) but no
  minibatch holds them (no policy, value or entropy term); an update on episodes without takeovers is
  unchanged, sample for sample.

`ppo_loss(model, latent, minibatch, cfg)` is the one loss; `PPOLearner.update(batch, latent_fn=None)` feeds it
latents from the cache, or (for the equivalence test and the benchmark) from `latent_fn`, which recomputes them
through the backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from irevla_ros.train.config import PPOConfig, PPOConfigError
from irevla_ros.train.latents import LatentEpisodes
from irevla_ros.vla.model import VLAModel


def compute_gae(
    rewards: np.ndarray,
    values: np.ndarray,
    dones: np.ndarray,
    terminals: np.ndarray,
    gamma: float,
    gae_lambda: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) for steps of whole episodes in order. After a terminal step the value is 0; after a
    truncated last step it is that step's own value (see the module docstring)."""
    n = len(rewards)
    advantages = np.zeros(n, np.float32)
    last = 0.0
    for t in reversed(range(n)):
        if dones[t]:
            next_value = 0.0 if terminals[t] else float(values[t])
            last = 0.0  # advantages never flow across an episode boundary
        else:
            next_value = float(values[t + 1])
        delta = float(rewards[t]) + gamma * next_value - float(values[t])
        last = delta + gamma * gae_lambda * last
        advantages[t] = last
    return advantages, advantages + values.astype(np.float32)


def ppo_loss(
    model: VLAModel, latent: torch.Tensor, mb: dict[str, torch.Tensor], cfg: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The PPO objective on one minibatch. `mb`: actions, behaviour_log_probs, start_log_probs, advantages,
    returns, start_values (all from before this update)."""
    dist = model.distribution(latent)
    new_log_prob = dist.log_prob(mb["actions"])
    log_ratio = new_log_prob - mb["behaviour_log_probs"]
    ratio = log_ratio.exp()

    advantages = mb["advantages"]
    if cfg.norm_adv and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss = torch.max(
        -advantages * ratio, -advantages * ratio.clamp(1.0 - cfg.clip_coef, 1.0 + cfg.clip_coef)
    ).mean()

    new_value = model.value(latent)
    if cfg.clip_vloss:
        clipped = mb["start_values"] + (new_value - mb["start_values"]).clamp(-cfg.clip_coef, cfg.clip_coef)
        v_loss = 0.5 * torch.max((new_value - mb["returns"]) ** 2, (clipped - mb["returns"]) ** 2).mean()
    else:
        v_loss = 0.5 * ((new_value - mb["returns"]) ** 2).mean()
    entropy = dist.entropy().mean()
    loss = pg_loss - cfg.ent_coef * entropy + cfg.vf_coef * v_loss

    with torch.no_grad():
        start_log_ratio = new_log_prob - mb["start_log_probs"]
        info = {
            "loss": loss.detach(),
            "policy_loss": pg_loss.detach(),
            "value_loss": v_loss.detach(),
            "entropy": entropy.detach(),
            # k3 estimator (Schulman): unbiased, always >= 0
            "approx_kl": ((start_log_ratio.exp() - 1) - start_log_ratio).mean(),
            "behaviour_kl": ((ratio - 1) - log_ratio).mean(),
            "clip_frac": ((ratio - 1.0).abs() > cfg.clip_coef).float().mean(),
        }
    return loss, info


LatentFn = Callable[[torch.Tensor], torch.Tensor]  # step indices (cpu int64) -> (len, latent_dim) latents


def update_batch(
    actions: torch.Tensor,
    log_probs: np.ndarray,
    rewards: np.ndarray,
    dones: np.ndarray,
    terminals: np.ndarray,
    start_values: torch.Tensor,
    start_log_probs: torch.Tensor,
    cfg: PPOConfig,
) -> dict[str, torch.Tensor]:
    """What one PPO update trains on: behaviour log-probabilities (the policy's own before the update where the
    step record has none), GAE advantages and returns from the values before the update."""
    device = start_values.device
    behaviour = torch.from_numpy(log_probs).to(device)
    behaviour = torch.where(torch.isnan(behaviour), start_log_probs, behaviour)
    advantages, returns = compute_gae(
        rewards, start_values.cpu().numpy(), dones, terminals, cfg.gamma, cfg.gae_lambda
    )
    return {
        "actions": actions,
        "behaviour_log_probs": behaviour,
        "start_log_probs": start_log_probs,
        "advantages": torch.from_numpy(advantages).to(device),
        "returns": torch.from_numpy(returns).to(device),
        "start_values": start_values,
    }


class PPOLearner:
    """Optimiser and counters of PPO over the heads. Build it after model.fresh_critic(): it holds the
    parameters it was given."""

    def __init__(self, model: VLAModel, config: PPOConfig | None = None, *, seed: int = 0) -> None:
        self.model = model
        self.config = config or PPOConfig()
        self.params = model.set_trainable("heads")
        self.optimiser = torch.optim.Adam(self.params, lr=self.config.lr, eps=self.config.adam_eps)
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0
        self.gradient_steps = 0
        self.samples = 0

    @property
    def device(self) -> torch.device:
        return self.model.log_std.device

    def _latents(
        self, batch: LatentEpisodes, index: torch.Tensor, latent_fn: LatentFn | None
    ) -> torch.Tensor:
        if latent_fn is not None:
            return latent_fn(index).to(self.device)
        return torch.from_numpy(batch.latents)[index].to(self.device)

    def update(self, batch: LatentEpisodes, latent_fn: LatentFn | None = None) -> dict[str, float]:
        """One PPO update (all epochs) on a batch of whole episodes."""
        cfg = self.config
        n = len(batch)
        if n == 0:
            raise PPOConfigError("PPO update on an empty batch")
        if (
            batch.action_dim != self.model.config.action_dim
            or batch.latent_dim != self.model.config.latent_dim
        ):
            raise PPOConfigError(
                f"batch has latent/action dims ({batch.latent_dim}, {batch.action_dim}), the model "
                f"({self.model.config.latent_dim}, {self.model.config.action_dim})"
            )
        device = self.device
        actions = torch.from_numpy(batch.actions).to(device)

        # Values and log-probabilities of the policy as it is before this update.
        start_values = torch.empty(n, device=device)
        start_log_probs = torch.empty(n, device=device)
        with torch.no_grad():
            for lo in range(0, n, cfg.minibatch_size):
                index = torch.arange(lo, min(n, lo + cfg.minibatch_size))
                latent = self._latents(batch, index, latent_fn)
                start_values[index] = self.model.value(latent)
                start_log_probs[index] = self.model.distribution(latent).log_prob(actions[index])
        data = update_batch(
            actions,
            batch.log_probs,
            batch.rewards,
            batch.dones,
            batch.terminals,
            start_values,
            start_log_probs,
            cfg,
        )
        values_np, returns_np = start_values.cpu().numpy(), data["returns"].cpu().numpy()

        infos: list[dict[str, torch.Tensor]] = []
        stopped = False
        epochs = 0
        own = torch.from_numpy(np.flatnonzero(~batch.interventions))  # the policy's own steps
        for _epoch in range(cfg.update_epochs):
            perm = own[torch.randperm(len(own), generator=self.generator)]
            for lo in range(0, len(own), cfg.minibatch_size):
                index = perm[lo : lo + cfg.minibatch_size]
                latent = self._latents(batch, index, latent_fn)
                loss, info = ppo_loss(self.model, latent, {k: v[index] for k, v in data.items()}, cfg)
                # SB3's rule: a minibatch that finds the policy already too far from the start is not applied.
                if cfg.target_kl and info["approx_kl"].item() > cfg.target_kl:
                    stopped = True
                    break
                self.optimiser.zero_grad(set_to_none=True)
                loss.backward()
                info["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm).detach()
                self.optimiser.step()
                self.gradient_steps += 1
                infos.append(info)
            epochs += 1
            if stopped:
                break
        self.updates += 1
        self.samples += len(own)

        returns_var = float(np.var(returns_np))
        stats: dict[str, float] = {
            k: float(torch.stack([i[k] for i in infos]).mean()) for k in (infos[0] if infos else {})
        }
        stats.update(
            first_loss=float(infos[0]["loss"]) if infos else float("nan"),
            last_loss=float(infos[-1]["loss"]) if infos else float("nan"),
            explained_variance=(
                float("nan")
                if returns_var == 0
                else 1.0 - float(np.var(returns_np - values_np)) / returns_var
            ),
            value_mean=float(values_np.mean()),
            return_mean=float(returns_np.mean()),
            early_stopped=float(stopped),
            epochs=float(epochs),
            minibatch_steps=float(len(infos)),
            samples=float(len(own)),
            intervention_steps=float(n - len(own)),
            episodes=float(batch.episodes),
            batch_success_rate=float(np.mean(batch.successful())) if batch.episodes else float("nan"),
            log_std_mean=float(self.model.log_std.detach().mean()),
            updates=float(self.updates),
            gradient_steps=float(self.gradient_steps),
        )
        return stats

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "optimiser": self.optimiser.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
            "gradient_steps": self.gradient_steps,
            "samples": self.samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimiser.load_state_dict(state["optimiser"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
        self.gradient_steps = int(state["gradient_steps"])
        self.samples = int(state["samples"])
