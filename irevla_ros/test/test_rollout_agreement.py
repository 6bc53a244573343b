"""The direct rollout (train/rollout.py, no ROS) agrees with the full node graph (real processes, real DDS).

One episode of a fixed task and cell seed through `run_session` (sim cell, camera, arm controller, policy,
episode manager, trainer), read back from the episode store, against `run_episode` on a cell built from the
same parameter files. The graph's lock-step makes the two the same computation, so they are compared exactly:

- every stored image, proprioception and action of the graph equals the direct rollout's at the same step
  (the sim cell publishes frames and arm state of time t before /clock t; the arm controller times its safety
  layer on the cell's clock; the reset resets the safety layer at the new scene's first moment; the policy acts
  on that moment when START arrives after its tick);
- the graph's stored file, read independently (mcap_ros2), has its steps one control period apart and no image
  newer than its step;
- the same outcome, and the graph one step longer at most: the policy's tick at the moment the episode manager
  ends the episode (success or timeout) runs before END reaches it, and that step is recorded (the direct
  rollout stops there).

The graph runs with `/sim_cell.max_wall_wait=6` (default 2 s): a command that misses it inserts a hold period
(the arm held for a period, the command lands in the next) and the trajectories part, which the exact comparison
would report; on a loaded 2-core host a starved policy process could miss 2 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from episode_timing_check import store_timing_problems

from irevla_ros.bringup.demo import run_session
from irevla_ros.policies.scripted import ScriptedExpertPolicy
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.evaluation import load_policy
from irevla_ros.train.rollout import EpisodeResult, RolloutSettings, make_cell, run_episode

TASK, SEED = "button-press-v3", 3


def _common(tmp: Path, timeout: float) -> list[str]:
    return [
        f"/sim_cell.tasks=[{TASK}]",
        f"/episode_manager.tasks=[{TASK}]",
        f"/sim_cell.seed={SEED}",
        f"/episode_manager.episode_timeout={timeout}",
        f"/trainer.run_dir={tmp / 'trainer'}",
        "/trainer.iterate=false",  # the trainer only stores episodes here
        "/sim_cell.max_wall_wait=6.0",
    ]


def _graph_episode(tmp: Path, settings: list[str]) -> dict[str, np.ndarray | str | int | None]:
    summary = run_session("agreement", 1, tmp / "store", tmp / "logs", settings, ("camera",), timeout=240.0)
    assert summary["episodes"] == 1 and summary["lost_steps"] == 0, summary
    with EpisodeStore(tmp / "store", read_only=True) as store:
        row = store.list()[0]
        steps = store.read(row.episode_id).steps
    assert not any(s.hold for s in steps), [s.step_index for s in steps if s.hold]
    # The stored file, read independently: steps one control period apart, no image newer than its step.
    period_ns = round(RolloutSettings.from_graph(overrides=settings).control_period * 1e9)
    timing = store_timing_problems(tmp / "store", period_ns)
    assert len(timing) == 1 and not any(timing.values()), timing
    return {
        "outcome": row.outcome,
        "steps": row.num_steps,
        "proprio": np.stack([s.proprioception for s in steps]),
        "actions": np.stack([s.action for s in steps]),
        "images": np.stack([s.images["camera"] for s in steps]),
        "scene_seed": row.scene_seed,
    }


def _direct_episode(settings: list[str], policy: object) -> EpisodeResult:
    rollout = RolloutSettings.from_graph(overrides=settings)
    # The episode manager's reset asks for no seed, so the sim cell draws the task's first scene seed: the same
    # cell construction + a reset with no seed draws the same one (and the graph recorded it).
    cell = make_cell(rollout, [TASK])
    try:
        return run_episode(cell, policy, rollout, TASK, seed=None)  # type: ignore[arg-type]
    finally:
        cell.close()


def _assert_same_episode(graph: dict[str, object], direct: EpisodeResult) -> None:
    assert graph["scene_seed"] == direct.seed  # the graph stored the layout seed its scene was reset with
    assert graph["outcome"] == direct.outcome
    assert int(graph["steps"]) - direct.steps in (0, 1), (graph["steps"], direct.steps)  # type: ignore[call-overload]
    n = direct.steps
    assert direct.images is not None
    np.testing.assert_array_equal(graph["images"][:n], direct.images[:, 0])  # type: ignore[index]
    np.testing.assert_array_equal(graph["proprio"][:n], direct.proprio)  # type: ignore[index]
    np.testing.assert_array_equal(graph["actions"][:n], direct.actions)  # type: ignore[index]


def test_scripted_expert_graph_and_direct_rollout_agree(ros_domain, tmp_path):
    settings = [*_common(tmp_path, 15.0), "/policy.policy=scripted_expert", "/policy.action_noise=0.0"]
    graph = _graph_episode(tmp_path, settings)
    direct = _direct_episode(settings, ScriptedExpertPolicy())
    assert direct.outcome == "success"
    _assert_same_episode(graph, direct)


@pytest.fixture
def tiny_vla(tmp_path: Path) -> tuple[str, str]:
    from irevla_ros.vla.config import VLAConfig
    from irevla_ros.vla.model import VLAModel
    from irevla_ros.vla.model_store import ModelStore
    from irevla_ros.vla.tiny_models import make_tiny_blip2

    base = make_tiny_blip2(tmp_path / "blip2")
    torch.manual_seed(0)
    model = VLAModel(
        VLAConfig(backbone="hf", hf_model_dir=str(base), latent_dim=64, head_hidden=(64,), lora_rank=4)
    )
    with torch.no_grad():  # actions well away from 0, so the arm moves and the comparison means something
        model.action_head[-1].weight.normal_(0.0, 0.5)
    info = ModelStore(tmp_path / "models").save(model, parent=None, stage="stage0_sft")
    return str(tmp_path / "models"), info.version_id


def test_vla_graph_and_direct_rollout_agree(ros_domain, tmp_path, tiny_vla):
    models, version = tiny_vla
    settings = [
        *_common(tmp_path, 3.0),
        "/policy.policy=vla",
        f"/policy.model_store={models}",
        f"/policy.version={version}",
        "/policy.deterministic=true",
        "/episode_manager.source=policy",
    ]
    graph = _graph_episode(tmp_path, settings)
    direct = _direct_episode(settings, load_policy(models, version, deterministic=True))
    assert direct.outcome == "timeout" and direct.steps == 30  # episode_timeout 3 s at 10 Hz
    assert np.abs(direct.actions[:, :3]).max() > 0.1  # the arm is really driven
    _assert_same_episode(graph, direct)
