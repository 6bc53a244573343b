"""Stage 1 checkpoints: OnlineRL killed with SIGKILL in a child process resumes from its last checkpoint (counters
continue, weights are the checkpoint's, never re-initialised); a SACfD run interrupted and resumed ends bitwise
where the uninterrupted run ends; push cadence; a checkpoint of another backbone or algorithm is refused."""

from __future__ import annotations

import copy
import multiprocessing
import os
import signal
import time

import pytest
import torch
from stage1_tasks import Reach, small_model

from irevla_ros.train.checkpoint import Checkpointer
from irevla_ros.train.ppo import PPOConfig
from irevla_ros.train.sacfd import SACfDConfig
from irevla_ros.train.stage1 import OnlineRL, Stage1Config, Stage1Error
from irevla_ros.vla.model import HEAD_GROUPS

torch.set_num_threads(1)

PPO = Stage1Config(
    algorithm="ppo",
    episodes_per_update=8,
    checkpoint_every_updates=1,
    threads=1,
    ppo=PPOConfig(minibatch_size=32, update_epochs=2, lr=1e-3),
)
SAC = Stage1Config(
    algorithm="sacfd",
    checkpoint_every_updates=2,
    threads=1,
    # Every SACfD learner state in play: LayerNorm critics, their targets, n-step sampling, the warm-start count.
    sacfd=SACfDConfig(batch_size=32, min_transitions=16, utd_ratio=1, n_step=3, critic_warm_start_updates=5),
)
# The residual actor (a bounded correction on the frozen action head) and its anchor's copy are learner state too.
SAC_RESIDUAL = Stage1Config(
    **{**SAC.__dict__, "sacfd": SACfDConfig(**{**SAC.sacfd.__dict__, "residual_scale": 0.5})}
)


@pytest.fixture(scope="module")
def base_model():
    return small_model()


def _train_forever(model, checkpoint_dir: str, config: Stage1Config = PPO) -> None:
    """The child: a Stage 1 trainer that never ends on its own."""
    try:
        rl = OnlineRL(model, config, checkpoint_dir)
        task = Reach(seed=int(rl.episodes_seen) + 1)
        if config.algorithm == "sacfd":
            rl.add_demos(task.demos(6))
        it = 0
        while True:
            batch, _ = task.rollout(model, 8, deterministic=False, prefix=f"child{it}")
            rl.add_episodes(batch)
            rl.step()
            it += 1
    finally:
        os._exit(3)  # never run the parent's pytest machinery in the child


def test_sigkilled_trainer_resumes_from_its_last_checkpoint(base_model, tmp_path):
    ckpt_dir = tmp_path / "stage1"
    initial = {k: v.clone() for k, v in base_model.state_dict().items()}
    child = multiprocessing.get_context("fork").Process(
        target=_train_forever, args=(copy.deepcopy(base_model), str(ckpt_dir))
    )
    child.start()
    checkpointer = Checkpointer(ckpt_dir)
    deadline = time.monotonic() + 60
    while len(checkpointer.steps()) < 2 or checkpointer.steps()[-1] < 4:
        assert child.is_alive(), f"the training child died on its own (exit code {child.exitcode})"
        assert time.monotonic() < deadline, f"no progress: checkpoints {checkpointer.steps()}"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)  # mid-training: it may be writing the next checkpoint right now
    child.join(10)
    assert child.exitcode == -signal.SIGKILL

    step, state = checkpointer.latest()
    assert step >= 4
    model = copy.deepcopy(base_model)
    rl = OnlineRL(model, PPO, ckpt_dir)
    assert rl.resumed_from == step and rl.updates == step == state["counters"]["updates"]
    assert rl.learner.updates == step and rl.learner.gradient_steps == state["learner"]["gradient_steps"] > 0
    assert rl.episodes_seen == state["counters"]["episodes_seen"] == 8 * step
    own = model.state_dict()
    for name, saved in state["heads"].items():
        assert torch.equal(own[name], saved), name  # the checkpoint's weights, bitwise
    assert not torch.equal(own["action_head.0.weight"], initial["action_head.0.weight"])  # trained, not fresh
    assert not torch.equal(own["critic_head.0.weight"], initial["critic_head.0.weight"])
    # Optimiser moments came back too (Adam's state for every head parameter).
    assert len(rl.learner.optimiser.state) == len(rl.learner.params)

    # Episodes already inside are ignored when the caller re-adds what it finds in its store.
    assert len(rl.seen_episode_ids()) == 8 * step
    task = Reach(seed=77)
    old_ids = sorted(rl.seen_episode_ids())[:8]
    replay, _ = task.rollout(model, 8, deterministic=False, prefix="replay")
    replay.episode_ids = old_ids
    assert rl.add_episodes(replay) == 0
    # Counters continue from the checkpoint.
    batch, _ = task.rollout(model, 8, deterministic=False, prefix="after")
    assert rl.add_episodes(batch) == 8
    stats = rl.step()
    assert stats is not None and stats["updates"] == step + 1
    assert checkpointer.steps()[-1] == step + 1


def _sac_data(plain):
    task = Reach(seed=11)
    demos = task.demos(6)
    batches = [task.rollout(plain, 4, deterministic=False, prefix=f"b{i}")[0] for i in range(6)]
    return demos, batches


@pytest.mark.parametrize("config", [SAC, SAC_RESIDUAL], ids=["action_head", "residual"])
def test_sacfd_resume_continues_exactly_where_it_stopped(base_model, tmp_path, config):
    demos, batches = _sac_data(base_model)  # collected by the untrained policy, once for both runs

    def run(model, directory, parts):
        rl = OnlineRL(model, config, directory)
        if rl.resumed_from is None:
            rl.add_demos(demos)
        for batch in parts:
            rl.add_episodes(batch)
            rl.step()
        return rl

    straight_model = copy.deepcopy(base_model)
    straight = run(straight_model, tmp_path / "a", batches)

    first = run(copy.deepcopy(base_model), tmp_path / "b", batches[:4])
    assert first.updates == 4 and Checkpointer(tmp_path / "b").steps()[-1] == 4
    del first
    resumed_model = copy.deepcopy(base_model)
    resumed = run(resumed_model, tmp_path / "b", batches[4:])
    assert resumed.resumed_from == 4 and resumed.updates == straight.updates == 6
    assert resumed.learner.updates == straight.learner.updates
    assert len(resumed.learner.demo) == len(straight.learner.demo) > 0
    assert len(resumed.learner.online) == len(straight.learner.online) > 0
    for (name, a), (_, b) in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for part in ("critic", "target", "anchor", "anchor_residual"):
        for (name, a), (_, b) in zip(
            getattr(straight.learner, part).state_dict().items(),
            getattr(resumed.learner, part).state_dict().items(),
            strict=True,
        ):
            assert torch.equal(a, b), f"{part}.{name}"
    assert any("1.weight" in k for k in resumed.learner.critic.state_dict())  # the LayerNorms are in it
    assert resumed.learner.warm_start_updates == straight.learner.warm_start_updates == 5
    assert torch.equal(resumed.learner.log_alpha, straight.learner.log_alpha)
    assert resumed.successes() == straight.successes()
    moved = [
        k for k, v in resumed_model.state_dict().items() if not torch.equal(v, base_model.state_dict()[k])
    ]
    actor = "action_residual." if config.sacfd.residual_scale else "action_head."
    assert any(k.startswith(actor) for k in moved), moved


@pytest.mark.parametrize("config", [SAC, SAC_RESIDUAL], ids=["action_head", "residual"])
def test_sigkilled_sacfd_trainer_resumes_buffers_critics_targets_and_optimisers(base_model, tmp_path, config):
    ckpt_dir = tmp_path / "sacfd"
    child = multiprocessing.get_context("fork").Process(
        target=_train_forever, args=(copy.deepcopy(base_model), str(ckpt_dir), config)
    )
    child.start()
    checkpointer = Checkpointer(ckpt_dir)
    deadline = time.monotonic() + 120
    while not checkpointer.steps() or checkpointer.steps()[-1] < 4:
        assert child.is_alive(), f"the training child died on its own (exit code {child.exitcode})"
        assert time.monotonic() < deadline, f"no progress: checkpoints {checkpointer.steps()}"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    assert child.exitcode == -signal.SIGKILL

    step, state = checkpointer.latest()
    model = copy.deepcopy(base_model)
    with torch.no_grad():  # a head that is neither the checkpoint's nor the one Stage 1 started from
        for p in model.action_head.parameters():
            p.add_(0.5)
    rl = OnlineRL(model, config, ckpt_dir)
    learner = rl.learner
    # The anchor's reference is the head Stage 1 started from, restored from the checkpoint (not rebuilt from
    # whatever head the restarted process had before it loaded the checkpoint).
    for name, start in base_model.action_head.state_dict().items():
        assert torch.equal(learner.anchor.state_dict()[name], start), f"anchor.{name}"
    for name, saved in state["learner"]["anchor_residual"].items():
        assert torch.equal(learner.anchor_residual.state_dict()[name], saved), f"anchor_residual.{name}"
    if config.sacfd.residual_scale:  # the residual trained and came back; the head it corrects did not move
        assert float(model.action_residual.scale) == 0.5
        assert any(state["heads"][k].any() for k in state["heads"] if k.startswith("action_residual.net.4"))
        for name, start in base_model.action_head.state_dict().items():
            assert torch.equal(state["heads"][f"action_head.{name}"], start), name
    assert rl.resumed_from == step and learner.updates == state["learner"]["updates"] > 0
    assert learner.warm_start_updates == 5
    assert len(learner.demo) > 0 and len(learner.online) > 0
    assert learner.online.episode_ids == state["learner"]["online"]["episode_ids"]
    for part in ("critic", "target"):
        for name, saved in state["learner"][part].items():
            assert torch.equal(getattr(learner, part).state_dict()[name], saved), f"{part}.{name}"
    # The target trails the critic (polyak): restored as its own state, not re-copied from the critic.
    assert any(
        not torch.equal(learner.critic.state_dict()[k], v) for k, v in learner.target.state_dict().items()
    )
    for opt in ("actor_optimiser", "critic_optimiser", "alpha_optimiser"):
        assert getattr(learner, opt).state_dict()["state"], opt  # Adam moments came back
    for name, saved in state["heads"].items():
        assert torch.equal(model.state_dict()[name], saved), name
    # It goes on learning from where it stopped; the demos are not warm-started twice.
    batch, _ = Reach(seed=55).rollout(model, 8, deterministic=False, prefix="after")
    assert rl.add_episodes(batch) == 8
    stats = rl.step()
    assert stats is not None and "warm_start_critic_loss" not in stats
    assert learner.warm_start_updates == 5


def test_push_cadence_by_episodes_and_by_time(base_model):
    config = Stage1Config(
        episodes_per_update=8, push_every_episodes=16, push_every_seconds=100.0, threads=1, ppo=PPO.ppo
    )
    model = copy.deepcopy(base_model)
    rl = OnlineRL(model, config)
    now = time.monotonic()
    task = Reach(seed=3)
    assert not rl.should_push(now + 1000)  # nothing learned yet: nothing to push, however long it has been
    rl.add_episodes(task.rollout(model, 8, deterministic=False, prefix="a")[0])
    assert rl.step() is not None
    assert not rl.should_push(now)  # 8 < 16 episodes, 0 s < 100 s
    assert rl.should_push(now + 101)
    rl.add_episodes(task.rollout(model, 8, deterministic=False, prefix="b")[0])
    rl.step()
    assert rl.should_push(now)  # 16 episodes
    heads = rl.heads_state_dict()
    assert set(heads) == {k for k in model.state_dict() if k.split(".")[0] in HEAD_GROUPS}
    assert any(k.startswith("action_residual.") for k in heads)
    rl.mark_pushed(now)
    assert not rl.should_push(now + 1000) and rl.counters()["pushes"] == 1


def test_a_checkpoint_of_another_backbone_or_algorithm_is_refused(base_model, tmp_path):
    model = copy.deepcopy(base_model)
    rl = OnlineRL(model, PPO, tmp_path / "c")
    rl.add_episodes(Reach(seed=4).rollout(model, 8, deterministic=False)[0])
    assert rl.step() is not None
    other = copy.deepcopy(base_model)
    with torch.no_grad():
        other.token_learner.out_norm.bias.add_(0.1)
    with pytest.raises(Stage1Error, match="another backbone"):
        OnlineRL(other, PPO, tmp_path / "c")
    with pytest.raises(Stage1Error, match="algorithm"):
        OnlineRL(copy.deepcopy(base_model), SAC, tmp_path / "c")
