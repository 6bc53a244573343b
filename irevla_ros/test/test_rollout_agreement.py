"""The direct rollout (sim/rollout.py, no ROS) agrees with the full node graph (real processes, real DDS).

One episode of a fixed task and cell seed through `run_session` (sim cell, camera, arm controller, policy,
episode manager, trainer), read back from the episode store, against `run_episode` on a cell built from the
same parameter files. Exact where the two are deterministic functions of the same state, within stated
tolerances where the graph's own timing varies run to run:

- image of step 0: bitwise (render at the cell's size, camera node resize, policy node resize);
- action of step 0: bitwise for the scripted expert (a function of the simulator state after the reset);
  within 0.05 for the VLA, whose step-0 input in the graph holds the arm pose published before the reset
  (up to ~5 mm away; see the report to the lead), which the direct rollout does not reproduce;
- positions of steps 1..29: within 0.02 m of the direct position of the same step or of one or two steps
  before. The window: the policy node takes the newest `~/ee_pose`, which races `/clock`, so its proprioception
  is up to two ticks stale (seen in the stored records). The 0.02 m: the graph's lock-step inserts a hold
  period when a command misses `max_wall_wait` (and at the start when START reaches the policy after the
  reset's first clock tick), each shifting the trajectory by at most one tick's motion (max_step = 0.01 m) —
  measured here 0.000-0.014 m over 6 runs; a wrong period, scale or step rule is off by several centimetres;
- success and length: the same outcome; lengths within 4 steps (one tick after success before the policy sees
  END, and up to 3 inserted hold periods; measured 0-3).

The graph runs with `/sim_cell.max_wall_wait=6` (default 2 s): on a loaded 2-core host a starved policy process
misses 2 s often enough to insert several hold periods (position errors of 3.5 cm were seen at load 8). Every
episode start waits that long once: the reset's first /clock tick reaches the policy before START does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from irevla_ros.bringup.demo import run_session
from irevla_ros.policies.scripted import ScriptedExpertPolicy
from irevla_ros.sim.rollout import EpisodeResult, RolloutSettings, make_cell, run_episode
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.evaluation import load_policy

TASK, SEED = "button-press-v3", 3
POSITION_TOL = 0.02
LAG_WINDOW = 2


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


def _graph_episode(tmp: Path, settings: list[str]) -> dict[str, np.ndarray | str | int]:
    summary = run_session("agreement", 1, tmp / "store", tmp / "logs", settings, ("camera",), timeout=240.0)
    assert summary["episodes"] == 1 and summary["lost_steps"] == 0, summary
    with EpisodeStore(tmp / "store", read_only=True) as store:
        row = store.list()[0]
        steps = store.read(row.episode_id).steps
    assert not any(s.hold for s in steps), [s.step_index for s in steps if s.hold]
    return {
        "outcome": row.outcome,
        "steps": row.num_steps,
        "proprio": np.stack([s.proprioception for s in steps]),
        "actions": np.stack([s.action for s in steps]),
        "image0": steps[0].images["camera"],
    }


def _direct_episode(settings: list[str], policy: object) -> EpisodeResult:
    rollout = RolloutSettings.from_graph(overrides=settings)
    # The sim cell's constructor starts an episode and the episode manager's reset draws the next layout of
    # the task's stream: the same cell construction + a reset with no seed gives the same scene.
    cell = make_cell(rollout, [TASK])
    try:
        return run_episode(cell, policy, rollout, TASK, seed=None)  # type: ignore[arg-type]
    finally:
        cell.close()


def _lagged_position_error(graph: np.ndarray, direct: np.ndarray, steps: range) -> np.ndarray:
    return np.array(
        [
            min(
                float(np.abs(graph[k, :3] - direct[j, :3]).max())
                for j in range(k - LAG_WINDOW, k + 1)
                if j >= 0
            )
            for k in steps
        ]
    )


def test_scripted_expert_graph_and_direct_rollout_agree(ros_domain, tmp_path):
    settings = [*_common(tmp_path, 15.0), "/policy.policy=scripted_expert", "/policy.action_noise=0.0"]
    graph = _graph_episode(tmp_path, settings)
    direct = _direct_episode(settings, ScriptedExpertPolicy())
    assert graph["outcome"] == direct.outcome == "success"
    assert abs(int(graph["steps"]) - direct.steps) <= 4, (graph["steps"], direct.steps)
    assert direct.images is not None
    np.testing.assert_array_equal(graph["image0"], direct.images[0, 0])
    np.testing.assert_array_equal(graph["actions"][0], direct.actions[0])
    errors = _lagged_position_error(graph["proprio"], direct.proprio, range(1, 30))  # type: ignore[arg-type]
    assert errors.max() <= POSITION_TOL, np.round(errors, 4)


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
    assert graph["outcome"] == direct.outcome
    assert direct.images is not None
    np.testing.assert_array_equal(graph["image0"], direct.images[0, 0])
    first = np.abs(graph["actions"][0] - direct.actions[0]).max()  # type: ignore[operator]
    assert first <= 0.05, (graph["actions"][0], direct.actions[0])
    assert np.abs(direct.actions[:, :3]).max() > 0.1  # the arm is really driven
    n = min(int(graph["steps"]), direct.steps, 20)
    errors = _lagged_position_error(graph["proprio"], direct.proprio, range(1, n))  # type: ignore[arg-type]
    assert errors.max() <= POSITION_TOL, np.round(errors, 4)
