"""evaluate() and direct rollouts: real MuJoCo, real model-store versions (a tiny BLIP-2 VLA), real files.

The graph-vs-direct agreement test is in test_rollout_agreement.py (it starts the node graph).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from irevla_ros import cli
from irevla_ros.policies.scripted import ScriptedExpertPolicy
from irevla_ros.sim.cell import UnknownTaskError
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.datasets import expert_set
from irevla_ros.train.evaluation import (
    EvalReport,
    EvaluationError,
    TaskEval,
    evaluate,
    load_policy,
    not_worse,
    wilson_interval,
)
from irevla_ros.train.rollout import (
    RolloutSettings,
    episode_seed,
    make_cell,
    run_episode,
    to_transitions,
    write_to_store,
)
from irevla_ros.vla.model_store import InvalidVersionError, ModelStore, UnknownVersionError

TASK = "button-press-v3"


@pytest.fixture(scope="module")
def tiny_version(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real model-store version (tiny random BLIP-2 backbone, ONNX export) whose actions are not ~0."""
    from irevla_ros.vla.config import VLAConfig
    from irevla_ros.vla.model import VLAModel
    from irevla_ros.vla.tiny_models import make_tiny_blip2

    root = tmp_path_factory.mktemp("tiny-vla")
    base = make_tiny_blip2(root / "blip2")
    torch.manual_seed(0)
    model = VLAModel(
        VLAConfig(backbone="hf", hf_model_dir=str(base), latent_dim=64, head_hidden=(64,), lora_rank=4)
    )
    with torch.no_grad():  # the fresh head's near-zero init would leave the arm still
        model.action_head[-1].weight.normal_(0.0, 0.5)
    info = ModelStore(root / "models").save(model, parent=None, stage="stage0_sft")
    return str(root / "models"), info.version_id


def test_wilson_interval_matches_known_values():
    # Reference values (Wilson score, z = 1.96) from Brown, Cai & DasGupta (2001) / any statistics package.
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(1, 10)
    assert lo == pytest.approx(0.0179, abs=1e-4) and hi == pytest.approx(0.4042, abs=1e-4)
    # Independently: the Wilson bounds are the p solving (k/n - p)^2 = z^2 p (1 - p) / n (found by bisection).
    k, n, z = 81, 263, 1.959963984540054

    def root(a: float, b: float) -> float:
        f = lambda p: (k / n - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731
        for _ in range(100):
            m = 0.5 * (a + b)
            a, b = (m, b) if (f(a) > 0) == (f(m) > 0) else (a, m)
        return 0.5 * (a + b)

    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(root(0.0, k / n), abs=1e-9) and hi == pytest.approx(root(k / n, 1.0), abs=1e-9)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(EvaluationError, match="successes <= n"):
        wilson_interval(3, 2)


def test_scripted_expert_solves_an_easy_task():
    report = evaluate(ScriptedExpertPolicy(), [TASK], 2, seed=0)
    entry = report.tasks[TASK]
    assert entry.episodes == 2 and report.episodes == 2
    assert entry.successes == 2 and report.success_rate == 1.0
    assert all(0 < n < report.max_steps for n in entry.lengths)  # ended by success, not by the timeout
    assert report.max_steps == 150  # episode_timeout 15 s / control period 0.1 s, from the graph's yaml
    lo, hi = report.ci95
    assert lo == pytest.approx(wilson_interval(2, 2)[0]) and hi == 1.0
    assert len(set(entry.seeds)) == 2  # a different scene per episode
    assert report.environment_steps == sum(entry.lengths)


def test_two_evaluations_of_one_version_agree_exactly(tiny_version):
    models, version = tiny_version
    runs: list[list[np.ndarray]] = [[], []]
    reports = []
    for i in range(2):
        reports.append(
            evaluate(
                version,
                [TASK],
                2,
                seed=7,
                models=models,
                max_steps=12,
                on_episode=lambda ep, i=i: runs[i].append(np.c_[ep.actions, ep.ee_after]),
            )
        )
    a, b = (r.to_dict() for r in reports)
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    assert reports[0].policy_version == version
    for x, y in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(x, y)  # bitwise: same scenes, deterministic actions, same physics
    # the two episodes are different scenes, and the VLA actually moved the arm
    assert not np.array_equal(runs[0][0], runs[0][1])
    assert np.abs(runs[0][0][:, :3]).max() > 0.05
    # another seed is another set of scenes
    assert episode_seed(7, TASK, 0) != episode_seed(8, TASK, 0)


def test_bad_requests_fail_with_clear_errors(tiny_version, tmp_path):
    models, version = tiny_version
    with pytest.raises(UnknownTaskError, match="unknown tasks \\['buton-press-v3'\\]"):
        evaluate(ScriptedExpertPolicy(), ["buton-press-v3"], 1, seed=0)
    with pytest.raises(UnknownVersionError, match="no version v0042-stage2_sft"):
        evaluate("v0042-stage2_sft", [TASK], 1, seed=0, models=models)
    with pytest.raises(UnknownVersionError, match="not a version id"):
        load_policy(models, "latest-and-greatest")
    with pytest.raises(EvaluationError, match="does not exist"):
        load_policy(tmp_path / "nowhere", version)
    with pytest.raises(EvaluationError, match="without a model store"):
        evaluate(version, [TASK], 1, seed=0)
    with pytest.raises(EvaluationError, match="episodes_per_task"):
        evaluate(ScriptedExpertPolicy(), [TASK], 0, seed=0)
    with pytest.raises(EvaluationError, match="at least one task"):
        evaluate(ScriptedExpertPolicy(), [], 1, seed=0)
    assert issubclass(UnknownVersionError, InvalidVersionError) and issubclass(
        InvalidVersionError, ValueError
    )


def test_irevla_eval_prints_a_table_and_a_json_line(tiny_version, tmp_path, capsys):
    models, version = tiny_version
    out = tmp_path / "eval.json"
    code = cli.main(
        ["eval", "--models", models, "--version", version, "--tasks", TASK, "--episodes", "1",
         "--seed", "3", "--max-steps", "5", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert stdout[0] == f"evaluation of {version} (seed 3)"
    assert any(line.startswith(TASK) for line in stdout) and any(
        line.startswith("overall") for line in stdout
    )
    line = json.loads(stdout[-1])
    assert line == json.loads(out.read_text())
    assert (
        line["episodes"] == 1 and line["tasks"][TASK]["lengths"] == [5] and line["policy_version"] == version
    )
    assert cli.main(["eval", "--models", models, "--version", "v0009-x", "--tasks", TASK]) == 2
    assert "no version v0009-x" in capsys.readouterr().err


def _report(version: str, successes: int, seeds: list[int]) -> EvalReport:
    lengths = [10] * len(seeds)
    return EvalReport(version, {TASK: TaskEval(TASK, len(seeds), successes, lengths, seeds)}, 0, True, 150)


def test_promotion_rule_compares_the_same_scenes():
    running, candidate = (
        _report("v1", 6, [1, 2, 3, 4, 5, 6, 7, 8]),
        _report("v2", 5, [1, 2, 3, 4, 5, 6, 7, 8]),
    )
    assert candidate.success_rate == 0.625 and running.success_rate == 0.75
    assert not_worse(running, candidate, 0.0)[0]
    ok, why = not_worse(candidate, running, 0.1)
    assert not ok and why == "v2 0.625 vs v1 0.750 (margin 0.100): worse"
    assert not_worse(candidate, running, 0.125)[0]  # exactly at the margin is not worse
    with pytest.raises(EvaluationError, match="same tasks and scenes"):
        not_worse(_report("v3", 5, [9, 2, 3, 4, 5, 6, 7, 8]), running, 0.1)
    with pytest.raises(EvaluationError, match="margin"):
        not_worse(candidate, running, 1.5)
    assert candidate.group([TASK])["success_rate"] == 0.625
    with pytest.raises(EvaluationError, match="not evaluated"):
        candidate.group(["door-open-v3"])


def test_direct_episodes_go_through_the_store_into_the_same_datasets(tmp_path):
    settings = RolloutSettings.from_graph()
    cell = make_cell(settings, [TASK])
    try:
        episode = run_episode(cell, ScriptedExpertPolicy(noise_std=0.1, seed=1), settings, TASK, seed=11)
    finally:
        cell.close()
    assert episode.success and episode.images is not None
    assert episode.images.shape == (episode.steps, 1, 128, 128, 3)
    assert np.isfinite(episode.log_probs).all() and np.isnan(episode.values).all()
    with EpisodeStore(tmp_path / "store") as store:
        row = write_to_store(store, episode, source="expert")
        assert row.complete and row.outcome == "success" and row.num_steps == episode.steps
    with EpisodeStore(tmp_path / "store", read_only=True) as store:
        from_store = expert_set(store)
    direct = to_transitions([episode])
    for name in ("images", "proprio", "actions", "log_probs", "rewards", "dones", "instruction_ids"):
        np.testing.assert_array_equal(getattr(direct, name), getattr(from_store, name), err_msg=name)
    assert direct.instructions == from_store.instructions == ["press the button"]
    assert direct.rewards[-1] == 1.0 and direct.rewards[:-1].sum() == 0.0
    assert math.isclose(float(direct.log_probs[0]), float(episode.log_probs[0]))
