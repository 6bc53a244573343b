"""SACfD for Stage 1 on a real robot: off-policy actor-critic from demonstrations, in latent space.

As the paper (and SERL / RLPD) do it: a replay buffer of latents with a demo part (D_e and/or the initial VLA's
successful episodes) and an online part; every batch takes `demo_fraction` of its samples from the demo part
(50/50 by default); twin Q critics with target networks (polyak averaging); the entropy temperature tuned
towards a target entropy; a configurable update-to-data ratio (the caller decides how many updates to run per
new transition, see stage1.OnlineRL).

The actor is the VLA's own action head and log_std (the clipped Gaussian of vla/distribution.py), so what this
trains deploys as-is; or, with `residual_scale` > 0, the VLA's action residual and log_std on top of the frozen
action head (residual RL as PLD and EXPO-FT do it: the running policy's action plus a correction bounded by the
scale, zero at the start; Stage 2 then distils the successes into the action head and resets the residual).
Samples are reparameterised (mean + std * noise, clipped to [-1, 1]); their log-probability is the clipped
Gaussian's, whose bound mass stands in for a density at the bounds (the recorded log-probs of the robot use the
same rule). The critics are an ensemble of MLPs of the action head's structure taking
[latent, action]; the model's own critic head (a V function) is not used by SACfD.

Transitions come from whole latent episodes: step t's next state is step t+1 of the same episode; a terminal
last step (success) needs none; a truncated last step (timeout, failure label, abort) has no recorded next
state and is left out of the buffer.

RLPD parts, measured on the frozen-feature reach task of test/stage1_tasks.py (10 demos, then rounds of 4 online
episodes; deterministic success on 200 scenes, mean over seeds 0-5, 2026-12-02): plain critics 0.34 after 32
episodes (seeds 0-2); LayerNorm critics 0.47 after 16 and 0.90 after 32; + n-step 3: 0.66 / 0.85; + utd 4: 0.79 /
0.83 (0.49 after 8, against 0.13); + a 500-update critic warm-start on D_e: no consistent gain. Defaults: LayerNorm,
utd 4, n_step 1, no warm-start; the others stay settings.

A behaviour-cloning term (`bc_weight`, default 1): the actor's mean is also pulled, by MSE, to the actions of the
batch's demo part. The VLA has one action head for every task, and on a new task whose online episodes mostly
fail the Q-gradient alone moved it off the tasks it knew: after 30 SACfD episodes on button-press-wall (3 expert
tasks, 5 demos each, 2026-12-07) the expert tasks fell from 0.87 to 0.23 with bc_weight 0 and stayed at 0.87 with
1, and after Stage 2 they were 0.63 and 1.00. The Reach task still learns with it (test_stage1_learning).

An anchor (`anchor_weight`, default 1): the actor's mean is also pulled, by MSE, to the mean of a frozen copy of
the action head as the learner found it (the running version) on every state of the batch, online ones included:
a behaviour-regularised actor-critic (BRAC) with the running policy as the prior. The BC term covers only the
tasks with demonstrations; on the RL task, which has none, a fresh critic learned from a handful of successes
pulled the shared head off the behaviour that already succeeded. Measured on button-press-topdown-wall (split b,
seed 0, SFT 0.6 on it and 0.88 on the 5 expert tasks, 30 Stage 1 episodes then Stage 2, 10 evaluation episodes
per task, 2026-12-07): without the anchor 2/30 Stage 1 successes, the task at 0.0 after Stage 1 and 0.3 after
Stage 2; weight 1: 17/30, 0.6 and 0.7 (expert 0.88); weight 10: 18/30, 0.6 and 0.8 (expert 0.90). The anchor also
holds back what Stage 1 can learn on its own: on the reach task from a Stage 0 policy at 0.27, 24 online episodes
reach 0.97 without it, 0.78 with weight 1 and 0.32 with weight 10 (test_stage1_learning), hence 1.

Checkpoints: `state_dict()` holds the critics, targets, anchor, temperature, optimisers, sampling RNG, warm-start
count and both buffers in full (latents are small: 256 float32 per step), so a restart needs nothing but the
checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import nn

from irevla_ros.train.config import SACfDConfig, SACfDConfigError
from irevla_ros.train.latents import LatentEpisodes
from irevla_ros.vla.distribution import ClippedNormal
from irevla_ros.vla.model import VLAModel, mlp


def layer_norm_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, final_std: float) -> nn.Sequential:
    """The action head's MLP with a LayerNorm after every hidden Linear (RLPD: it bounds Q extrapolation on
    actions the small demo/online data never shows, which is what made high update-to-data ratios stable)."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.LayerNorm(h), nn.GELU()]
        in_dim = h
    last = nn.Linear(in_dim, out_dim)
    nn.init.normal_(last.weight, std=final_std)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class QEnsemble(nn.Module):
    """n Q(latent, action) critics, each an MLP of the action head's structure with one output."""

    def __init__(
        self, latent_dim: int, action_dim: int, hidden: Sequence[int], n: int, layer_norm: bool = False
    ) -> None:
        super().__init__()
        build = layer_norm_mlp if layer_norm else mlp
        self.members = nn.ModuleList(
            build(latent_dim + action_dim, hidden, 1, final_std=0.01) for _ in range(n)
        )

    def forward(self, latent: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([latent, action], dim=-1)
        return torch.stack([m(x).squeeze(-1) for m in self.members])  # (n, B)


def rsample(dist: ClippedNormal) -> torch.Tensor:
    """A reparameterised sample of the clipped Gaussian (gradients flow to mean and log_std inside the box)."""
    noise = torch.randn_like(dist.mean)
    return (dist.mean + dist.std * noise).clamp(-1.0, 1.0)


class LatentReplay:
    """Transitions of whole latent episodes: latents stored once, `next_index` points at the next step."""

    _ARRAYS = ("latents", "actions", "rewards", "terminals", "next_index", "episode_lengths")

    def __init__(self, latent_dim: int, action_dim: int, capacity: int) -> None:
        self.capacity = capacity
        self.latents = np.zeros((0, latent_dim), np.float32)
        self.actions = np.zeros((0, action_dim), np.float32)
        self.rewards = np.zeros(0, np.float32)
        self.terminals = np.zeros(0, bool)
        self.next_index = np.zeros(0, np.int64)  # -1: no recorded next state (a truncated end: never sampled)
        self.episode_lengths = np.zeros(0, np.int64)
        self.episode_ids: list[str] = []
        self._valid = np.zeros(0, np.int64)

    def __len__(self) -> int:
        """Sampleable transitions."""
        return int(self._valid.shape[0])

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])

    def add(self, batch: LatentEpisodes) -> int:
        """Append every episode of `batch`; returns the transitions added."""
        before = len(self)
        offset = self.steps
        nexts = []
        for s in batch.episode_slices():
            idx = np.arange(s.start, s.stop, dtype=np.int64) + offset
            nxt = idx + 1
            nxt[-1] = idx[-1] if batch.terminals[s.stop - 1] else -1  # terminal: masked, any index will do
            nexts.append(nxt)
        self.latents = np.concatenate([self.latents, batch.latents])
        self.actions = np.concatenate([self.actions, batch.actions])
        self.rewards = np.concatenate([self.rewards, batch.rewards])
        self.terminals = np.concatenate([self.terminals, batch.terminals])
        self.next_index = np.concatenate([self.next_index, *nexts])
        lengths = [s.stop - s.start for s in batch.episode_slices()]
        self.episode_lengths = np.concatenate([self.episode_lengths, np.asarray(lengths, np.int64)])
        self.episode_ids += list(batch.episode_ids)
        self._evict()
        self._valid = np.flatnonzero(self.next_index >= 0)
        return len(self) - before

    def _evict(self) -> None:
        drop_episodes = 0
        steps = self.steps
        while steps > self.capacity and drop_episodes < len(self.episode_lengths) - 1:
            steps -= int(self.episode_lengths[drop_episodes])
            drop_episodes += 1
        if not drop_episodes:
            return
        cut = int(self.episode_lengths[:drop_episodes].sum())
        self.latents = self.latents[cut:]
        self.actions = self.actions[cut:]
        self.rewards = self.rewards[cut:]
        self.terminals = self.terminals[cut:]
        self.next_index = np.where(self.next_index[cut:] >= 0, self.next_index[cut:] - cut, -1)
        self.episode_lengths = self.episode_lengths[drop_episodes:]
        self.episode_ids = self.episode_ids[drop_episodes:]

    def sample(
        self, n: int, generator: torch.Generator, n_step: int = 1, gamma: float = 0.99
    ) -> dict[str, np.ndarray]:
        """n transitions; with n_step > 1 each one's reward is the discounted sum over up to `n_step` steps of
        its episode and `discount` is gamma^k for the k steps taken (shorter at a terminal, which ends the sum,
        and before a truncated end, whose last step has no next state to bootstrap from)."""
        pick = self._valid[torch.randint(len(self), (n,), generator=generator).numpy()]
        ret = np.zeros(n, np.float32)
        discount = np.ones(n, np.float32)
        terminal = np.zeros(n, bool)
        cur = pick.copy()
        boot = pick.copy()
        active = np.ones(n, bool)
        for j in range(n_step):
            ret[active] += discount[active] * self.rewards[cur[active]]
            discount[active] *= gamma
            ended = active & self.terminals[cur]
            terminal |= ended
            nxt = self.next_index[cur]
            boot[active] = nxt[active]
            active = active & ~ended & (j < n_step - 1)
            # Go on only where the next step is itself a transition (it has a next state or is terminal).
            active &= self.next_index[np.where(active, nxt, 0)] >= 0
            cur = np.where(active, nxt, cur)
        return {
            "latent": self.latents[pick],
            "action": self.actions[pick],
            "reward": ret,
            "discount": discount,
            "terminal": terminal.astype(np.float32),
            "next_latent": self.latents[boot],
        }

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            k: torch.from_numpy(np.ascontiguousarray(getattr(self, k))) for k in self._ARRAYS
        }
        state["episode_ids"] = list(self.episode_ids)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._ARRAYS:
            setattr(self, k, state[k].numpy().copy())
        self.episode_ids = list(state["episode_ids"])
        self._valid = np.flatnonzero(self.next_index >= 0)


class SACfDLearner:
    """Critics, temperature, buffers and optimisers of SACfD; the actor is `model`'s action head + log_std."""

    def __init__(self, model: VLAModel, config: SACfDConfig | None = None, *, seed: int = 0) -> None:
        self.model = model
        self.config = cfg = config or SACfDConfig()
        mc = model.config
        model.set_trainable("heads")
        device = model.log_std.device
        # The actor: the action head itself, or (residual) a bounded correction on top of the frozen head.
        actor = "action_residual" if cfg.residual_scale else "action_head"
        groups = model.named_parameter_groups()
        if cfg.residual_scale and not float(model.action_residual.scale):
            # A plain version: the residual starts at no correction. One that carries a residual (a Stage 1
            # heads update not yet distilled) keeps it and its bound, and learning goes on from there.
            model.action_residual.reset(cfg.residual_scale)
        for _, p in groups["action_residual" if actor == "action_head" else "action_head"]:
            p.requires_grad_(False)
        self.actor_params = [p for g in (actor, "log_std") for _, p in groups[g]]
        with torch.random.fork_rng(devices=[]):  # seeded critics without moving the caller's global RNG
            torch.manual_seed(seed)
            self.critic = QEnsemble(
                mc.latent_dim, mc.action_dim, mc.head_hidden, cfg.n_critics, layer_norm=cfg.critic_layer_norm
            ).to(device)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(float(np.log(cfg.init_temperature)), device=device, requires_grad=True)
        self.target_entropy = (
            -0.5 * mc.action_dim if cfg.target_entropy is None else float(cfg.target_entropy)
        )
        # The policy as Stage 1 found it (the running version): the anchor's reference, frozen for the stage.
        self.anchor = copy.deepcopy(model.action_head).requires_grad_(False)
        self.anchor_residual = copy.deepcopy(model.action_residual).requires_grad_(False)
        self.actor_optimiser = torch.optim.Adam(self.actor_params, lr=cfg.actor_lr)
        self.critic_optimiser = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.alpha_optimiser = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        self.demo = LatentReplay(mc.latent_dim, mc.action_dim, cfg.demo_capacity)
        self.online = LatentReplay(mc.latent_dim, mc.action_dim, cfg.online_capacity)
        self.generator = torch.Generator().manual_seed(seed)
        self.updates = 0
        self.warm_start_updates = 0

    @property
    def device(self) -> torch.device:
        return self.model.log_std.device

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def add_episodes(self, batch: LatentEpisodes, demo: bool) -> int:
        """Whole latent episodes into the demo or the online buffer; returns the transitions added."""
        if (
            batch.latent_dim != self.model.config.latent_dim
            or batch.action_dim != self.model.config.action_dim
        ):
            raise SACfDConfigError(
                f"episodes have latent/action dims ({batch.latent_dim}, {batch.action_dim}), the model "
                f"({self.model.config.latent_dim}, {self.model.config.action_dim})"
            )
        return (self.demo if demo else self.online).add(batch)

    def ready(self) -> bool:
        return len(self.demo) + len(self.online) >= self.config.min_transitions

    def _sample(self, demo_only: bool = False) -> dict[str, torch.Tensor]:
        cfg = self.config
        n_demo = round(cfg.batch_size * cfg.demo_fraction)
        if demo_only or not len(self.online):
            n_demo = cfg.batch_size
        elif not len(self.demo):
            n_demo = 0
        parts = []
        if n_demo:
            parts.append(self.demo.sample(n_demo, self.generator, cfg.n_step, cfg.gamma))
        if cfg.batch_size - n_demo:
            parts.append(self.online.sample(cfg.batch_size - n_demo, self.generator, cfg.n_step, cfg.gamma))
        batch = {k: torch.from_numpy(np.concatenate([p[k] for p in parts])).to(self.device) for k in parts[0]}
        batch["is_demo"] = (torch.arange(cfg.batch_size, device=self.device) < n_demo).float()
        return batch

    def update(self, num_updates: int) -> dict[str, float]:
        """`num_updates` critic updates (and an actor + temperature update every `actor_delay` of them)."""
        cfg = self.config
        if num_updates < 1:
            raise SACfDConfigError(f"num_updates must be >= 1, got {num_updates}")
        if not self.ready():
            raise SACfDConfigError(
                f"the buffers hold {len(self.demo) + len(self.online)} transitions, fewer than "
                f"min_transitions={cfg.min_transitions}"
            )
        stats = self._run(num_updates, warm_start=False)
        stats.update(
            updates=float(self.updates),
            demo_transitions=float(len(self.demo)),
            online_transitions=float(len(self.online)),
            log_std_mean=float(self.model.log_std.detach().mean()),
        )
        return stats

    def warm_start_critic(self) -> dict[str, float] | None:
        """`critic_warm_start_updates` critic-only updates on the demo buffer, once per learner (the actor and
        the temperature stay as they are): the first online updates then follow a critic that already values
        what the demonstrations did, instead of a random one. None when already done, off, or no demos."""
        n = self.config.critic_warm_start_updates
        if self.warm_start_updates or not n or not len(self.demo):
            return None
        stats = self._run(n, warm_start=True)
        return stats

    def _run(self, num_updates: int, *, warm_start: bool) -> dict[str, float]:
        cfg = self.config
        model = self.model
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}

        def record(**values: torch.Tensor) -> None:
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1

        for _ in range(num_updates):
            b = self._sample(demo_only=warm_start)
            alpha = self.log_alpha.detach().exp()

            # Critics: soft (n-step) Bellman target from the target critics' minimum.
            with torch.no_grad():
                next_dist = model.distribution(b["next_latent"])
                next_action = rsample(next_dist)
                next_log_prob = next_dist.log_prob(next_action)
                next_q = self.target(b["next_latent"], next_action).min(dim=0).values
                target_q = b["reward"] + b["discount"] * (1.0 - b["terminal"]) * (
                    next_q - alpha * next_log_prob
                )
            q = self.critic(b["latent"], b["action"])
            critic_loss = ((q - target_q.unsqueeze(0)) ** 2).mean(dim=1).sum()
            self.critic_optimiser.zero_grad(set_to_none=True)
            critic_loss.backward()
            nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
            self.critic_optimiser.step()
            record(critic_loss=critic_loss.detach(), q_mean=q.detach().mean(), target_mean=target_q.mean())

            if not warm_start and self.updates % cfg.actor_delay == 0:
                # Actor: maximise min-Q minus alpha * log-prob of its own reparameterised sample.
                dist = model.distribution(b["latent"])
                action = rsample(dist)
                log_prob = dist.log_prob(action)
                q_pi = self.critic(b["latent"], action).min(dim=0).values
                actor_loss = (alpha * log_prob - q_pi).mean()
                if cfg.bc_weight and float(b["is_demo"].sum()):
                    # dist.mean is the actor's mean (model.action_mean), already computed for this batch
                    error = (dist.mean - b["action"]).pow(2).mean(dim=1)
                    bc = (error * b["is_demo"]).sum() / b["is_demo"].sum()
                    actor_loss = actor_loss + cfg.bc_weight * bc
                    record(bc_loss=bc.detach())
                if cfg.anchor_weight:
                    with torch.no_grad():
                        head = self.anchor(b["latent"])
                        reference = torch.tanh(head + self.anchor_residual(b["latent"], head))
                    anchor = (dist.mean - reference).pow(2).mean()
                    actor_loss = actor_loss + cfg.anchor_weight * anchor
                    record(anchor_loss=anchor.detach())
                self.actor_optimiser.zero_grad(set_to_none=True)
                actor_loss.backward()
                nn.utils.clip_grad_norm_(self.actor_params, cfg.max_grad_norm)
                self.actor_optimiser.step()
                # Temperature: towards the target entropy.
                alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
                self.alpha_optimiser.zero_grad(set_to_none=True)
                alpha_loss.backward()
                self.alpha_optimiser.step()
                record(actor_loss=actor_loss.detach(), entropy=-log_prob.detach().mean(), alpha=alpha)

            with torch.no_grad():
                for tp, p in zip(self.target.parameters(), self.critic.parameters(), strict=True):
                    tp.lerp_(p, cfg.tau)
            if warm_start:
                self.warm_start_updates += 1
            else:
                self.updates += 1

        return {k: sums[k] / counts[k] for k in sums}

    # ---- checkpoints ----
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "critic": self.critic.state_dict(),
            "target": self.target.state_dict(),
            "anchor": self.anchor.state_dict(),
            "anchor_residual": self.anchor_residual.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_optimiser": self.actor_optimiser.state_dict(),
            "critic_optimiser": self.critic_optimiser.state_dict(),
            "alpha_optimiser": self.alpha_optimiser.state_dict(),
            "generator": self.generator.get_state(),
            "updates": self.updates,
            "warm_start_updates": self.warm_start_updates,
            "demo": self.demo.state_dict(),
            "online": self.online.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])
        if "anchor" in state:  # checkpoints before the anchor: the head the learner was built on stands in
            self.anchor.load_state_dict(state["anchor"])
        if "anchor_residual" in state:  # checkpoints before the residual: none (the one built here is zero)
            self.anchor_residual.load_state_dict(state["anchor_residual"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_optimiser.load_state_dict(state["actor_optimiser"])
        self.critic_optimiser.load_state_dict(state["critic_optimiser"])
        self.alpha_optimiser.load_state_dict(state["alpha_optimiser"])
        self.generator.set_state(state["generator"])
        self.updates = int(state["updates"])
        self.warm_start_updates = int(state["warm_start_updates"])
        self.demo.load_state_dict(state["demo"])
        self.online.load_state_dict(state["online"])
