"""The residual actor of Stage 1 (SACfDConfig.residual_scale; PLD, EXPO-FT): a bounded correction on top of the
frozen action head, learned by SACfD from frozen features, then distilled into the action head by the next
supervised stage, which resets it. Real torch and the real VLAModel heads (small random config) on the
frozen-feature reach task of stage1_tasks; deterministic (every RNG seeded)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from stage1_tasks import Reach, behaviour_clone, small_model
from test_stage1_learning import TASK_SIZED, _learn, _success_rate

from irevla_ros.train.sacfd import SACfDConfig
from irevla_ros.train.sft import supervised_parameters, trainable_state
from irevla_ros.train.stage2_job import apply_adapter
from irevla_ros.vla.model import HEAD_GROUPS, with_residual_defaults

torch.set_num_threads(1)

SCALE = 0.5


@pytest.fixture(scope="module")
def base_model():
    return behaviour_clone(small_model(), Reach(seed=7).demos(3, prefix="sft"), steps=100)  # Stage 0


@pytest.fixture(scope="module")
def residual_run(base_model):
    model = copy.deepcopy(base_model)
    curve = _learn(model, SACfDConfig(**TASK_SIZED, residual_scale=SCALE, anchor_weight=0.0))
    return model, curve


def _latents(n: int = 512) -> torch.Tensor:
    return torch.tanh(torch.randn(n, 32, generator=torch.Generator().manual_seed(3)) * 2)


def test_a_version_has_no_residual_until_stage1_sets_one():
    model = small_model()
    z = _latents()
    assert float(model.action_residual.scale) == 0.0
    with torch.no_grad():
        assert torch.equal(model.action_mean(z), torch.tanh(model.action_head(z)))
    assert "action_residual" in HEAD_GROUPS  # stored by heads-only versions, replaced by pushes, checkpointed


def test_the_residual_learns_the_task_and_only_it_moves(base_model, residual_run):
    model, curve = residual_run
    # From a Stage 0 policy at 0.27 to >= 0.6 within 24 online episodes (the same reach task and budget as the
    # action-head learner of test_stage1_learning; the bound holds it below that one's 0.78).
    assert curve[0] < 0.3 and max(curve) >= 0.6, curve
    before, after = base_model.state_dict(), model.state_dict()
    moved = {k.split(".")[0] for k in after if not torch.equal(before[k], after[k])}
    # the critic head is the fresh one every Stage 1 starts with (SACfD's critics are its own)
    assert moved == {"action_residual", "critic_head", "log_std"}
    assert float(model.action_residual.scale) == SCALE


def test_the_correction_stays_within_its_bound(residual_run):
    model, _ = residual_run
    z = _latents()
    with torch.no_grad():
        plain = torch.tanh(model.action_head(z))
        corrected = model.action_mean(z)
        assert (corrected - plain).abs().max() <= SCALE + 1e-6
        assert (corrected - plain).abs().max() > 0.05  # it does correct
        # however large its weights grow, the correction cannot leave the bound
        wild = copy.deepcopy(model)
        for p in wild.action_residual.net.parameters():
            p.mul_(100.0)
        assert (wild.action_mean(z) - plain).abs().max() <= SCALE + 1e-6


def test_a_learner_without_the_residual_leaves_it_alone(base_model):
    model = copy.deepcopy(base_model)
    _learn(model, SACfDConfig(**TASK_SIZED))
    before, after = base_model.state_dict(), model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("action_residual."))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("action_head."))


def test_stage2_distils_the_residual_into_the_action_head(residual_run):
    model, _ = residual_run
    rate_with_residual = _success_rate(model)
    # D_RL: the residual policy's successes (exploring, as Stage 1 collects them); D_e: the demonstrations.
    task = Reach(seed=200)
    episodes, _ = task.rollout(model, 200, deterministic=False, prefix="rl")
    successes = [i for i, o in enumerate(episodes.outcomes) if o == "success"]
    d_rl = type(episodes).concat([episodes.episode(i) for i in successes])
    data = type(episodes).concat([task.demos(10), d_rl])
    student = copy.deepcopy(model)
    supervised_parameters(student)  # what every supervised stage does first: the residual is reset
    assert float(student.action_residual.scale) == 0.0
    assert all(not p.any() for p in student.action_residual.net[-1].parameters())
    z = _latents()
    with torch.no_grad():
        assert torch.equal(student.action_mean(z), torch.tanh(student.action_head(z)))
    behaviour_clone(student, data, steps=300)
    distilled = _success_rate(student)
    assert distilled >= rate_with_residual - 0.1, (distilled, rate_with_residual)


def test_a_stage2_job_result_applied_on_a_stage1_version_carries_no_residual(residual_run, tmp_path):
    stage1_version, _ = residual_run
    trained = copy.deepcopy(stage1_version)
    supervised_parameters(trained)
    save_file(trainable_state(trained), str(tmp_path / "adapter.safetensors"))
    parent = copy.deepcopy(stage1_version)  # the job's parent is the running (Stage 1) version
    apply_adapter(parent, tmp_path / "adapter.safetensors")
    z = _latents()
    with torch.no_grad():
        assert torch.equal(parent.action_mean(z), trained.action_mean(z))
    assert float(parent.action_residual.scale) == 0.0


def test_weights_saved_before_the_residual_existed_load_as_no_correction(residual_run):
    model, _ = residual_run
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("action_residual.")}
    completed = with_residual_defaults(old, model)
    fresh = small_model(seed=5)
    fresh.load_state_dict(completed, strict=True)
    z = _latents()
    with torch.no_grad():
        assert torch.equal(fresh.action_mean(z), torch.tanh(model.action_head(z)))
    # a state that has a residual is left as it is
    assert with_residual_defaults(model.state_dict(), model).keys() == model.state_dict().keys()
    assert torch.equal(
        with_residual_defaults(model.state_dict(), model)["action_residual.scale"], torch.tensor(SCALE)
    )
