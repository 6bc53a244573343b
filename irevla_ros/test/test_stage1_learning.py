"""The chosen Stage 1 (SACfD with its defaults: RLPD's 50/50 demo/online batches, LayerNorm twin critics,
update-to-data ratio 4, the behaviour-cloning term and the anchor to the policy Stage 1 starts from) learns, from
frozen features, a task the initial policy solves rarely, within a bounded number of episodes; the same criterion
is not met by a learner whose actor does not learn, so the test can fail. As in iRe-VLA, Stage 1 starts from a
Stage 0 policy: the action head behaviour-cloned on 3 demonstrations, which solves about a quarter of the scenes.
Real torch, the real VLAModel heads (small random config), latents from the fixed random feature map of
stage1_tasks.Reach standing in for the frozen VLM. Deterministic: every RNG is seeded."""

from __future__ import annotations

import copy

import pytest
import torch
from stage1_tasks import Reach, behaviour_clone, small_model
from test_stage1_rl import _assert_only_heads_changed

from irevla_ros.train.sacfd import SACfDConfig
from irevla_ros.train.stage1 import OnlineRL, Stage1Config

torch.set_num_threads(1)

EPISODE_BUDGET = 24  # online episodes (6 rounds of 4), after 10 demonstrations
LEVEL = 0.7  # deterministic success rate to reach within the budget


@pytest.fixture(scope="module")
def base_model():
    return behaviour_clone(small_model(), Reach(seed=7).demos(3, prefix="sft"), steps=100)  # Stage 0


def _success_rate(model) -> float:
    return Reach(seed=98).rollout(model, 200, deterministic=True)[1]


def _learn(model, sacfd: SACfDConfig) -> list[float]:
    """Success after each round of 4 online episodes (the first entry: before any)."""
    rl = OnlineRL(model, Stage1Config(algorithm="sacfd", seed=0, threads=1, sacfd=sacfd))
    task = Reach(seed=100)
    rl.add_demos(task.demos(10))
    curve = [_success_rate(model)]
    for it in range(EPISODE_BUDGET // 4):
        batch, _ = task.rollout(model, 4, deterministic=False, prefix=f"it{it}")
        rl.add_episodes(batch)
        rl.step()  # None until the buffers hold min_transitions
        curve.append(_success_rate(model))
    return curve


def _criterion_met(curve: list[float]) -> bool:
    return curve[0] < 0.3 and max(curve) >= LEVEL


# Only the learning rates and gamma/tau sized to this 10-step task; the rest is the shipped default.
TASK_SIZED = dict(batch_size=128, actor_lr=1e-3, critic_lr=1e-3, gamma=0.95, tau=0.01)


def test_default_sacfd_solves_the_task_within_the_episode_budget(base_model):
    model = copy.deepcopy(base_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    curve = _learn(model, SACfDConfig(**TASK_SIZED))
    assert _criterion_met(curve), curve
    _assert_only_heads_changed(model, before)  # the VLM (and LoRA, token learner) stayed frozen


def test_the_criterion_fails_for_a_learner_that_does_not_learn(base_model):
    # The same run with the actor's learning rate ~0: the critics learn, the policy does not move.
    curve = _learn(copy.deepcopy(base_model), SACfDConfig(**{**TASK_SIZED, "actor_lr": 1e-12}))
    assert not _criterion_met(curve), curve
    assert max(curve) < curve[0] + 0.1, curve
