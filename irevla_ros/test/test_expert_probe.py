"""The scripted-expert probe (bench/expert_probe.py) on real MuJoCo and Meta-World: its CLI and result files, the
benchmark's code path without cameras, and the expert solving push-v3 in the cell as it does in Meta-World's loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from irevla_ros.bench import expert_probe
from irevla_ros.policies.scripted import ScriptedExpertPolicy
from irevla_ros.train.rollout import RolloutSettings, make_cell, run_episode

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")

TASKS = ("button-press-v3", "push-v3")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    code = expert_probe.main(["--tasks", ",".join(TASKS), "--episodes", "2", "--out", str(out)])
    assert code == 0
    return out


def test_probe_writes_a_result_and_a_table_of_every_task(result):
    doc = json.loads((result / "expert_probe.json").read_text())
    assert doc["benchmark"] == "expert_probe"
    p = doc["parameters"]
    # The benchmark's demonstration settings: noise 0.1, the graph's 150 steps at its 0.1 s control period.
    assert p["tasks"] == list(TASKS) and p["episodes"] == 2
    assert p["demo_noise"] == 0.1 and p["max_steps"] == 150 and p["control_period"] == 0.1
    for task in TASKS:
        row = doc["tasks"][task]
        assert len(row["seeds"]) == 2 and len(set(row["seeds"])) == 2
        for column in ("demo_noise", "noise_0", "metaworld"):
            col = row[column]
            assert col["episodes"] == 2 and len(col["steps"]) == 2
            assert col["successes"] == sum(s is not None for s in col["steps"])
            lo, hi = col["ci95"]
            assert 0.0 <= lo <= col["success_rate"] <= hi <= 1.0
            solved = [s for s in col["steps"] if s is not None]
            if solved:
                assert col["steps_to_success"]["max"] == max(solved) <= p["max_steps"]
                assert col["steps_to_success"]["median"] == pytest.approx(float(np.median(solved)))
            else:
                assert col["steps_to_success"] == {"median": None, "max": None}
    # The known-good task: the expert presses the button at the demonstration noise, in well under 150 steps.
    button = doc["tasks"]["button-press-v3"]
    assert button["demo_noise"]["successes"] == 2 and button["demo_noise"]["steps_to_success"]["max"] < 100
    # The probe's speed-up keeps the trajectory: rendering reads the physics, never changes it.
    rc = doc["render_comparison"]
    assert rc["same_trajectory"] is True and rc["ms_per_step_without_cameras"] < rc["ms_per_step_rendering"]
    md = (result / "expert_probe.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ") and "-v3" in line]
    assert [line.split(" | ")[0][2:] for line in lines] == expert_probe.order(doc["tasks"])
    assert "python -m irevla_ros.bench.expert_probe --tasks button-press-v3,push-v3 --episodes 2" in md
    # --report rebuilds the same table from the result alone.
    (result / "expert_probe.md").unlink()
    assert expert_probe.main(["--report", str(result / "expert_probe.json")]) == 0
    assert (result / "expert_probe.md").read_text().splitlines()[:-1] == md.splitlines()[:-1]


def test_push_is_solved_in_the_cell_as_in_metaworlds_own_loop(result):
    # push-v3 closes its gripper while descending on the puck: with fingers that closed 8 env steps' worth per
    # 0.1 s control period the expert shut them before reaching it and pushed nothing (0/15; Meta-World 15/15).
    push = json.loads((result / "expert_probe.json").read_text())["tasks"]["push-v3"]
    assert push["metaworld"]["successes"] == 2
    assert push["noise_0"]["successes"] == 2
    assert push["demo_noise"]["successes"] >= 1


def test_reference_env_builds_the_cells_scene_for_a_seed():
    settings = RolloutSettings.from_graph()
    cell = make_cell(settings, ["push-v3"])
    env = expert_probe.metaworld_env("push-v3")
    try:
        for seed in (5, 123456789):
            cell.reset("push-v3", seed=seed)
            env.seed(seed)
            obs, _ = env.reset()
            np.testing.assert_array_equal(env._last_rand_vec, cell.object_layout())
            np.testing.assert_array_equal(obs[-3:], env._target_pos)  # the goal is observed, as in MT1
    finally:
        cell.close()
        env.close()


def test_no_render_refuses_to_keep_images_and_bad_arguments_exit_2(capsys):
    settings = RolloutSettings.from_graph()
    cell = make_cell(settings, ["reach-v3"])
    try:
        with pytest.raises(ValueError, match="render"):
            run_episode(cell, ScriptedExpertPolicy(), settings, "reach-v3", 0, render=False)
        ep = run_episode(
            cell, ScriptedExpertPolicy(), settings, "reach-v3", 0, keep_images=False, render=False
        )
        assert ep.images is None and ep.steps >= 1
    finally:
        cell.close()
    assert expert_probe.main(["--tasks", "push-v9", "--episodes", "1"]) == 2
    assert "push-v9" in capsys.readouterr().err
    assert expert_probe.main(["--tasks", "push-v3", "--episodes", "0"]) == 2
