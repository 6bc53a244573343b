"""Stage 1 (online RL on the heads, VLM frozen): latent episodes and their cache from a real episode store, GAE,
PPO and SACfD losses, heads-only updates, cached latents == recomputed backbone, and learning a task each
algorithm fails at first. Real torch, the real VLAModel (small random config), real files."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from stage1_tasks import Reach, small_model

from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import EpisodeMeta, StepData
from irevla_ros.train.datasets import load_transitions
from irevla_ros.train.latents import (
    HEAD_GROUPS,
    BackboneLatents,
    LatentCache,
    LatentDataError,
    LatentEpisodes,
    encoder_key,
    from_transitions,
    latent_episodes_from_store,
)
from irevla_ros.train.ppo import PPOConfig, PPOConfigError, PPOLearner, compute_gae
from irevla_ros.train.sacfd import SACfDConfig, SACfDConfigError, SACfDLearner
from irevla_ros.train.stage1 import OnlineRL, Stage1Config, Stage1Error
from irevla_ros.vla.preprocess import preprocess_images

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_model():
    return small_model()


@pytest.fixture
def model(base_model):
    return copy.deepcopy(base_model)


def _write(store: EpisodeStore, episode_id: str, outcome: str, n: int, seed: int) -> None:
    assembler = EpisodeAssembler()
    instruction = f"reach {episode_id[:1]}"
    assembler.start(EpisodeMeta(episode_id, "reach-v3", instruction, "v1", "policy", started_ns=1))
    rng = np.random.default_rng(seed)
    for i in range(n):
        assembler.add_step(
            StepData(
                episode_id=episode_id,
                step_index=i,
                stamp_ns=i * 100_000_000,
                images={"camera": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)},
                image_stamps_ns={"camera": i},
                proprioception=rng.normal(size=4).astype(np.float32),
                proprioception_names=["x", "y", "z", "g"],
                instruction=instruction,
                action=rng.uniform(-1, 1, 4).astype(np.float32),
                log_prob=float(rng.normal()) if i else None,
                value=None,
                policy_version="v1",
                intervention=False,
                hold=False,
            )
        )
    store.write(assembler.end(episode_id, outcome, "simulator", n, ended_ns=2))


def _non_head_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] not in HEAD_GROUPS}


def _assert_only_heads_changed(model, before_all: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    frozen = [k for k in before_all if k.split(".")[0] not in HEAD_GROUPS]
    assert any("lora_" in k for k in frozen) and any(k.startswith("token_learner.") for k in frozen)
    assert any(k.startswith("backbone.vision.") for k in frozen) and any(
        k.startswith("backbone.text.") for k in frozen
    )
    changed_frozen = [k for k in frozen if not torch.equal(before_all[k], after[k])]
    assert changed_frozen == []
    for prefix in ("action_head.", "log_std"):
        assert any(not torch.equal(before_all[k], after[k]) for k in after if k.startswith(prefix)), prefix


# ---------------------------------------------------------------- data


def test_latent_episodes_boundaries_terminals_and_errors():
    a = LatentEpisodes.from_episode(
        "a", np.zeros((3, 8), np.float32), np.zeros((3, 4), np.float32), "success"
    )
    b = LatentEpisodes.from_episode("b", np.ones((2, 8), np.float32), np.zeros((2, 4), np.float32), "timeout")
    both = a.append(b)
    assert len(both) == 5 and both.episodes == 2 and both.episode_starts.tolist() == [0, 3]
    assert both.rewards.tolist() == [0, 0, 1, 0, 0]
    assert both.dones.tolist() == [False, False, True, False, True]
    assert both.terminals.tolist() == [False, False, True, False, False]  # a timeout is truncated
    assert both.success_ids() == ["a"] and np.isnan(both.log_probs).all()
    assert both.episode(1).episode_ids == ["b"] and np.array_equal(both.episode(1).latents, b.latents)
    with pytest.raises(LatentDataError, match="latents must be float32"):
        dataclasses.replace(both, latents=both.latents.astype(np.float64))
    with pytest.raises(LatentDataError, match=r"\[-1, 1\]"):
        LatentEpisodes.from_episode(
            "c", np.zeros((3, 8), np.float32), np.full((3, 4), 2, np.float32), "success"
        )
    with pytest.raises(LatentDataError, match="different"):
        LatentEpisodes.concat(
            [
                a,
                LatentEpisodes.from_episode(
                    "d", np.zeros((1, 9), np.float32), np.zeros((1, 4), np.float32), "failure"
                ),
            ]
        )
    broken = copy.copy(both)
    broken.dones = np.array([False, False, True, True, True])
    with pytest.raises(LatentDataError, match="dones"):
        broken.validate()


def test_latents_from_store_are_the_backbones_and_cached(model, tmp_path):
    store = EpisodeStore(tmp_path / "store")
    _write(store, "p1", "success", 5, seed=1)
    _write(store, "p2", "timeout", 4, seed=2)
    _write(store, "q3", "failure", 3, seed=3)
    rows = store.trainable(source="policy")
    calls = []
    hook = model.token_learner.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    cache = LatentCache(tmp_path / "latents", encoder_key(model))
    data = latent_episodes_from_store(model, store, rows, cache=cache, batch_size=2)
    assert sum(calls) == 12  # every step encoded once
    assert data.episode_ids == ["p1", "p2", "q3"] and len(data) == 12
    assert data.terminals.nonzero()[0].tolist() == [4]  # only the success is terminal
    assert data.rewards.nonzero()[0].tolist() == [4]

    # The same latents as the backbone gives for the same stored observations, through the one preprocessing.
    transitions = load_transitions(store, rows, ("camera",))
    images = torch.from_numpy(
        np.stack([preprocess_images(list(s), model.config) for s in transitions.images])
    )
    with torch.no_grad():
        text = model.encode_instruction(transitions.instructions)
        ids = torch.from_numpy(transitions.instruction_ids.astype(np.int64))
        direct = model.encode(images, text[ids], torch.from_numpy(transitions.proprio)).numpy()
    np.testing.assert_allclose(data.latents, direct, atol=1e-5)
    np.testing.assert_array_equal(data.actions, transitions.actions)
    np.testing.assert_array_equal(data.log_probs, transitions.log_probs)  # NaN where the record had none
    via = from_transitions(model, transitions, batch_size=5, outcomes=["success", "timeout", "failure"])
    np.testing.assert_allclose(via.latents, data.latents, atol=1e-5)
    assert via.terminals.tolist() == data.terminals.tolist()

    # A restarted trainer (new cache object) does not run the backbone again; a relabel needs no re-encoding.
    calls.clear()
    store.relabel("p2", "success", "operator", stamp_ns=3)
    again = latent_episodes_from_store(
        model,
        store,
        store.trainable(source="policy"),
        cache=LatentCache(tmp_path / "latents", encoder_key(model)),
    )
    assert calls == [] and np.array_equal(again.latents, data.latents)
    assert again.success_ids() == ["p1", "p2"] and again.terminals.nonzero()[0].tolist() == [4, 8]
    # A damaged cache file is a miss: recomputed, same latents.
    cache.path("q3", store.get("q3").sha256).write_bytes(b"not an npz")
    third = latent_episodes_from_store(model, store, store.trainable(source="policy"), cache=cache)
    assert calls == [3] and np.allclose(third.latents, data.latents, atol=1e-6)
    hook.remove()
    # Heads do not change the key (a Stage 1 version keeps its latents); the backbone does.
    key = encoder_key(model)
    with torch.no_grad():
        model.action_head[0].weight.add_(1.0)
        assert encoder_key(model) == key
        model.token_learner.out_norm.weight.add_(1.0)
    assert encoder_key(model) != key
    with pytest.raises(LatentDataError, match="model key"):
        latent_episodes_from_store(model, store, rows, cache=cache)


def test_gae_bootstraps_truncated_but_not_terminal_endings():
    rewards = np.array([0, 0, 1, 0, 0], np.float32)
    values = np.array([0.5, 0.6, 0.7, 0.2, 0.3], np.float32)
    dones = np.array([0, 0, 1, 0, 1], bool)
    terminals = np.array([0, 0, 1, 0, 0], bool)
    adv, ret = compute_gae(rewards, values, dones, terminals, gamma=0.9, gae_lambda=1.0)
    # Episode 1 (success, terminal): discounted returns 0.81, 0.9, 1.0.
    np.testing.assert_allclose(ret[:3], [0.81, 0.9, 1.0], rtol=1e-6)
    # Episode 2 (timeout): the last step bootstraps from its own value: 0.9 * 0.3, then 0.9 * that.
    np.testing.assert_allclose(ret[3:], [0.9 * 0.9 * 0.3, 0.9 * 0.3], rtol=1e-6)
    np.testing.assert_allclose(adv, ret - values, rtol=1e-6)


# ---------------------------------------------------------------- losses and trainable set


def test_ppo_reduces_its_loss_and_changes_only_the_heads(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch, _ = Reach(seed=3).rollout(model, 16, deterministic=False)
    learner = PPOLearner(model, PPOConfig(minibatch_size=64, update_epochs=2, target_kl=0.0, lr=1e-3))
    stats = [learner.update(batch) for _ in range(15)]
    assert stats[-1]["value_loss"] < 0.5 * stats[0]["value_loss"]
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert learner.gradient_steps == 15 * 2 * int(np.ceil(len(batch) / 64))
    _assert_only_heads_changed(model, before)
    for k in ("approx_kl", "clip_frac", "explained_variance", "value_mean", "entropy", "policy_loss"):
        assert np.isfinite(stats[-1][k]), k
    with pytest.raises(PPOConfigError, match="clip_coef"):
        PPOConfig(clip_coef=0)


def test_ppo_target_kl_stops_the_update_early(model):
    batch, _ = Reach(seed=4).rollout(model, 16, deterministic=False)
    learner = PPOLearner(model, PPOConfig(minibatch_size=16, update_epochs=50, target_kl=1e-4, lr=3e-3))
    stats = learner.update(batch)
    assert stats["early_stopped"] == 1.0 and stats["epochs"] < 50 and stats["minibatch_steps"] >= 1


def test_sacfd_reduces_critic_loss_and_changes_only_the_heads(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = Reach(seed=5)
    learner = SACfDLearner(model, SACfDConfig(batch_size=64, critic_lr=1e-3, min_transitions=16), seed=0)
    assert learner.add_episodes(task.demos(10), demo=True) > 0
    online, _ = task.rollout(model, 10, deterministic=False)
    added = learner.add_episodes(online, demo=False)
    truncated = int((online.dones & ~online.terminals).sum())
    assert added == len(online) - truncated  # a truncated end has no next state: not a transition
    first = learner.update(1)
    later = [learner.update(50) for _ in range(4)]
    assert later[-1]["critic_loss"] < 0.5 * first["critic_loss"]
    assert learner.updates == 201
    _assert_only_heads_changed(model, before)
    with pytest.raises(SACfDConfigError, match="demo_fraction"):
        SACfDConfig(demo_fraction=1.5)


def test_sacfd_batches_mix_demo_and_online_as_configured(model):
    task = Reach(seed=6)
    learner = SACfDLearner(model, SACfDConfig(batch_size=100, demo_fraction=0.3, min_transitions=1), seed=0)
    demos = task.demos(5)
    online, _ = task.rollout(model, 5, deterministic=False)
    learner.add_episodes(demos, demo=True)
    learner.add_episodes(online, demo=False)
    sample = learner._sample()
    demo_rows = {row.tobytes() for row in demos.latents}
    online_rows = {row.tobytes() for row in online.latents}
    assert not demo_rows & online_rows  # so each sampled latent says which buffer it came from
    picked = [row.tobytes() for row in sample["latent"].numpy()]
    assert sum(r in demo_rows for r in picked) == 30 and sum(r in online_rows for r in picked) == 70


def test_cached_latents_give_the_same_update_as_recomputing_the_backbone(model, tmp_path):
    store = EpisodeStore(tmp_path / "store")
    for i, outcome in enumerate(("success", "timeout", "failure", "success")):
        _write(store, f"p{i}", outcome, 6 + i, seed=10 + i)
    rows = store.trainable(source="policy")
    transitions = load_transitions(store, rows, ("camera",))
    batch = from_transitions(model, transitions, outcomes=[r.outcome for r in rows])
    twin = copy.deepcopy(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PPOConfig(minibatch_size=12, update_epochs=2, target_kl=0.0, lr=1e-3)
    cached = PPOLearner(model, cfg, seed=7)
    recomputed = PPOLearner(twin, cfg, seed=7)
    stats_cached = cached.update(batch)
    stats_recomputed = recomputed.update(batch, latent_fn=BackboneLatents(twin, transitions))
    assert stats_cached["minibatch_steps"] == stats_recomputed["minibatch_steps"] == 6
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # The update did move the heads: the comparison is not between two no-ops.
    head_change = max(
        float((v - initial[k]).abs().max())
        for k, v in model.state_dict().items()
        if k.startswith("action_head.")
    )
    assert head_change > 1e-4
    assert np.isclose(stats_cached["value_loss"], stats_recomputed["value_loss"], rtol=1e-4)


# ---------------------------------------------------------------- learning


def _success_rate(model, seed: int) -> float:
    return Reach(seed=seed).rollout(model, 200, deterministic=True)[1]


def test_ppo_with_frozen_features_learns_a_task_it_fails_at_first(model):
    before = _success_rate(model, seed=99)
    config = Stage1Config(
        algorithm="ppo", episodes_per_update=64, seed=0, threads=1,
        ppo=PPOConfig(lr=1e-3, minibatch_size=128, update_epochs=4, target_kl=0.0),
    )  # fmt: skip
    rl = OnlineRL(model, config)
    task = Reach(seed=0)
    for it in range(15):
        batch, _ = task.rollout(model, 64, deterministic=False, prefix=f"it{it}")
        assert rl.add_episodes(batch) == 64
        assert rl.step() is not None  # one PPO update per 64 new episodes
    after = _success_rate(model, seed=99)
    assert before < 0.3 and after > 0.8, (before, after)
    assert rl.counters()["updates"] == 15 and len(rl.successes()) > 0


def test_sacfd_from_demos_learns_a_task_it_fails_at_first(model):
    before = _success_rate(model, seed=98)
    config = Stage1Config(
        algorithm="sacfd", seed=0, threads=1,
        # No anchor: it holds the head Stage 1 starts from, here an untrained one, and this test is about the
        # critics and the actor learning from scratch (the anchored default is tested from a Stage 0 policy in
        # test_stage1_learning.py).
        sacfd=SACfDConfig(batch_size=128, actor_lr=1e-3, critic_lr=1e-3, gamma=0.95, tau=0.01, anchor_weight=0.0),
    )  # fmt: skip
    rl = OnlineRL(model, config)
    task = Reach(seed=1)
    assert rl.add_demos(task.demos(20)) == 20
    for it in range(12):
        batch, _ = task.rollout(model, 8, deterministic=False, prefix=f"it{it}")
        rl.add_episodes(batch)
        stats = rl.step()
        assert stats is not None and stats["owed_updates"] == 0
    after = _success_rate(model, seed=98)
    assert before < 0.3 and after > 0.8, (before, after)


def test_exploration_std_is_calibrated_to_the_error_on_the_demonstrations(model, tmp_path):
    demos = Reach(seed=3).demos(10)
    config = Stage1Config(
        algorithm="sacfd", seed=0, threads=1, exploration_min_std=0.05, exploration_max_std=0.37
    )
    rl = OnlineRL(model, config, tmp_path / "ckpt")
    with torch.no_grad():
        mean = model.action_mean(torch.from_numpy(demos.latents))
        rms = (mean - torch.from_numpy(demos.actions)).pow(2).mean(dim=0).sqrt()
    std = rl.calibrate_exploration(demos)
    expected = rms.clamp(0.05, 0.37)
    assert std == pytest.approx(expected.tolist(), abs=1e-4)
    assert torch.allclose(model.log_std.detach().exp(), expected, atol=1e-5)
    assert float(expected.min()) < 0.37  # the untrained head is nearer some demo actions than the default std
    rl.add_demos(demos)
    rl.checkpoint()
    resumed = OnlineRL(model, config, tmp_path / "ckpt")  # a resume keeps what the checkpoint has
    before = model.log_std.detach().clone()
    assert resumed.calibrate_exploration(demos) is None and torch.equal(model.log_std.detach(), before)
    off = OnlineRL(model, dataclasses.replace(config, calibrate_exploration=False))
    assert off.calibrate_exploration(demos) is None


def test_sacfd_bc_weight_keeps_the_actor_near_the_demonstrations(model):
    # Online episodes that never succeed, demos that do: the Q-gradient alone moves the one action head away from
    # what the demos showed; the behaviour-cloning term holds it there (the shared head of every task).
    task = Reach(seed=4)
    demos = task.demos(10)
    failures, _ = task.rollout(model, 16, deterministic=False, prefix="fail")
    failures = dataclasses.replace(failures, rewards=np.zeros_like(failures.rewards),
                                   terminals=np.zeros_like(failures.terminals),
                                   outcomes=["failure"] * failures.episodes)  # fmt: skip
    start = copy.deepcopy(model.state_dict())
    errors = {}
    for weight in (0.0, 2.0):
        model.load_state_dict(start)
        learner = SACfDLearner(model, SACfDConfig(batch_size=64, actor_lr=3e-3, bc_weight=weight), seed=0)
        learner.add_episodes(demos, demo=True)
        learner.add_episodes(failures, demo=False)
        stats = learner.update(200)
        assert ("bc_loss" in stats) == bool(weight)
        with torch.no_grad():
            mean = model.action_mean(torch.from_numpy(demos.latents))
            errors[weight] = float((mean - torch.from_numpy(demos.actions)).pow(2).mean())
    assert errors[2.0] < 0.5 * errors[0.0], errors


def test_sacfd_anchor_keeps_the_actor_near_the_policy_stage1_started_from(model):
    # Online episodes of a task with no demonstrations, all failures: the critic's gradient moves the action head
    # on those states; the anchor holds its mean near the head as the learner found it (the running version).
    task = Reach(seed=6)
    failures, _ = task.rollout(model, 16, deterministic=False, prefix="fail")
    failures = dataclasses.replace(failures, rewards=np.zeros_like(failures.rewards),
                                   terminals=np.zeros_like(failures.terminals),
                                   outcomes=["failure"] * failures.episodes)  # fmt: skip
    start = copy.deepcopy(model.state_dict())
    online = torch.from_numpy(failures.latents)
    with torch.no_grad():
        reference = model.action_mean(online)
    drift = {}
    for weight in (0.0, 10.0):
        model.load_state_dict(start)
        config = SACfDConfig(batch_size=64, actor_lr=3e-3, bc_weight=0.0, anchor_weight=weight)
        learner = SACfDLearner(model, config, seed=0)
        learner.add_episodes(failures, demo=False)
        stats = learner.update(200)
        assert ("anchor_loss" in stats) == bool(weight)
        with torch.no_grad():
            drift[weight] = float((model.action_mean(online) - reference).pow(2).mean())
            # The reference is a frozen copy: training moved the head, not the anchor.
            assert torch.allclose(torch.tanh(learner.anchor(online)), reference)
    model.load_state_dict(start)
    assert drift[0.0] > 1e-3, drift  # without it the head does move (the anchor has something to hold)
    assert drift[10.0] < 0.2 * drift[0.0], drift


def test_sacfd_learning_starts_after_the_configured_online_episodes(model):
    task = Reach(seed=5)
    config = Stage1Config(algorithm="sacfd", seed=0, threads=1, learning_starts=2,
                          sacfd=SACfDConfig(batch_size=16, min_transitions=4))  # fmt: skip
    rl = OnlineRL(model, config)
    rl.add_demos(task.demos(4))
    before = copy.deepcopy(model.action_head.state_dict())
    for i in range(2):  # the first two online episodes earn no updates, though the buffers are ready
        batch, _ = task.rollout(model, 1, deterministic=False, prefix=f"warm{i}")
        rl.add_episodes(batch)
        assert rl.step() is None and rl.owed_updates == 0
    assert all(torch.equal(v, model.action_head.state_dict()[k]) for k, v in before.items())
    batch, _ = task.rollout(model, 1, deterministic=False, prefix="third")
    seen = rl.transitions_seen
    rl.add_episodes(batch)
    added = rl.transitions_seen - seen
    assert added > 0 and rl.owed_updates == added * config.sacfd.utd_ratio  # the third one's transitions do
    assert rl.step() is not None


def test_stage1_config_errors_name_the_problem(model):
    with pytest.raises(Stage1Error, match="algorithm"):
        Stage1Config(algorithm="dqn")
    with pytest.raises(Stage1Error, match=r"unknown Stage 1 config key.*episodes_per_updat"):
        Stage1Config.from_dict({"episodes_per_updat": 3})
    with pytest.raises(Stage1Error, match=r"ppo\.lrr"):
        Stage1Config.from_dict({"ppo": {"lrr": 1.0}})
    assert Stage1Config.from_dict(Stage1Config(algorithm="sacfd").to_dict()) == Stage1Config(
        algorithm="sacfd"
    )
    rl = OnlineRL(model, Stage1Config(threads=1))
    demos = Reach(seed=0).demos(2)
    with pytest.raises(Stage1Error, match="on-policy"):
        rl.add_demos(demos)
    wrong = LatentEpisodes.from_episode(
        "w", np.zeros((2, 5), np.float32), np.zeros((2, 4), np.float32), "success"
    )
    with pytest.raises(Stage1Error, match="dims"):
        rl.add_episodes(wrong)


def test_sacfd_n_step_returns_stop_at_terminals_and_before_truncated_ends():
    from irevla_ros.train.sacfd import LatentReplay

    # Episode "s": 4 steps ending in success (terminal); episode "t": 3 steps ending in a timeout (truncated).
    s = LatentEpisodes.from_episode(
        "s", np.arange(4, dtype=np.float32)[:, None], np.zeros((4, 1), np.float32), "success"
    )
    t = LatentEpisodes.from_episode(
        "t", 10 + np.arange(3, dtype=np.float32)[:, None], np.zeros((3, 1), np.float32), "timeout"
    )
    replay = LatentReplay(1, 1, 100)
    replay.add(s.append(t))
    assert len(replay) == 6  # t's last step has no next state
    b = replay.sample(500, torch.Generator().manual_seed(0), n_step=3, gamma=0.5)
    rows = {}
    for i in range(500):
        rows[float(b["latent"][i, 0])] = (
            float(b["reward"][i]),
            float(b["discount"][i]),
            float(b["terminal"][i]),
            float(b["next_latent"][i, 0]),
        )
    assert sorted(rows) == [0, 1, 2, 3, 10, 11]
    assert rows[0] == (0.0, 0.125, 0.0, 3.0)  # 3 steps, bootstrap from step 3
    assert rows[1] == (0.25, 0.125, 1.0, 3.0)  # reaches the success at its third step: reward 0.5^2, terminal
    assert rows[3] == (1.0, 0.5, 1.0, 3.0)  # the terminal step itself
    assert rows[10] == (0.0, 0.25, 0.0, 12.0)  # stops before the truncated end, bootstraps from its latent
    assert rows[11] == (0.0, 0.5, 0.0, 12.0)
    one = replay.sample(200, torch.Generator().manual_seed(1))
    assert np.allclose(one["discount"], 0.99)
    live = one["terminal"] == 0
    assert np.all(one["next_latent"][live] == one["latent"][live] + 1)
