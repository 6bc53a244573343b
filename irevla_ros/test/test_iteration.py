"""The iteration runner with real parts: a real episode store, a real model store, Stage 1 (PPO on the heads),
Stage 2 (supervised), validation and announcement; a SIGKILL in the middle of Stage 2 and a restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from iteration_helpers import TINY, write_episode

from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.config import SFTConfig, Stage1Config
from irevla_ros.train.evaluation import EvalReport, TaskEval
from irevla_ros.train.iteration import IterationConfig, IterationRecord, IterationRequest, IterationRunner
from irevla_ros.train.metrics import MetricsLog, read_metrics
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore


def config(**changes: object) -> IterationConfig:
    base = {
        "episode_budget": 4,
        "stage1": Stage1Config(push_every_episodes=2, episodes_per_update=2, threads=1),
        "stage2": SFTConfig(steps=4, batch_size=4, threads=1, checkpoint_every=1),
    }
    return IterationConfig(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def first_version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models") / "models"
    return root, ModelStore(root).save(VLAModel(TINY), parent=None, stage="stage0_sft").version_id


@pytest.fixture
def cell(tmp_path: Path, first_version) -> tuple[EpisodeStore, ModelStore, str]:
    shutil.copytree(first_version[0], tmp_path / "models")  # saving is the slow part: once per module
    models, v1 = ModelStore(tmp_path / "models"), first_version[1]
    store = EpisodeStore(tmp_path / "store")
    for i in range(3):
        write_episode(store, f"expert-{i}", "expert", "success", "", seed=i)
    yield store, models, v1
    store.close()


def test_one_iteration_pushes_heads_then_promotes_a_stage2_version(cell, tmp_path):
    store, models, v1 = cell
    announced = []
    progress: list[tuple[str, float, str]] = []
    metrics = MetricsLog(tmp_path / "run")
    runner = IterationRunner(
        tmp_path / "run",
        store,
        models,
        config(),
        announce=announced.append,
        metrics=metrics,
        progress=lambda *p: progress.append(p),
    )
    runner.start("")  # the newest version
    assert runner.record.running_version == v1
    # a success of another version (an earlier session): in D_RL, but not this session's Stage 1 data
    write_episode(store, "stray", "policy", "success", "v9999-other", seed=3)
    runner.on_episode_stored(store.get("stray"))
    outcomes = ["success", "timeout", "failure", "success"]
    for i, outcome in enumerate(outcomes):
        version = runner.record.running_version  # what the policy node runs after each announcement
        write_episode(store, f"policy-{i}", "policy", outcome, version, seed=10 + i)
        runner.on_episode_stored(store.get(f"policy-{i}"))
        runner.work_once()
        if i == 1:  # two episodes: one PPO update, heads pushed
            assert [a.stage for a in announced] == ["stage1_rl"]
            heads = announced[0]
            assert heads.meta["heads_only"] and runner.record.running_version == heads.version_id
    metrics.close()  # the 4th episode reached the budget: Stage 2, validation, announcement ran

    record = IterationRecord.load(tmp_path / "run" / "iteration.json")
    assert record.iteration == 2 and record.phase == "session"
    # the status line of the next session is about that session, not the last validation step
    assert progress[-2][0] == "validation"
    assert progress[-1] == ("session", 0.0, f"iteration 2: session with {record.running_version}")
    verdict = record.history[0]
    assert verdict["end_reason"] == "episode_budget" and verdict["promoted"], verdict
    assert verdict["session_episodes"] == 4 and verdict["session_success_rate"] == 0.5
    assert [a.stage for a in announced] == ["stage1_rl", "stage1_rl", "stage2_sft"]  # a push every 2 episodes
    heads, stage2 = announced[1], announced[2]
    assert heads.parent == announced[0].version_id and stage2.parent == heads.version_id
    assert record.base_version == record.running_version == stage2.version_id
    assert set(stage2.data["rl_episodes"]) == {"policy-0", "policy-3", "stray"}  # D_RL: policy successes
    # Stage 1 moved only the heads; Stage 2 moved LoRA and the action head
    m1, _, _ = models.load(v1)
    mh, _, _ = models.load(heads.version_id)
    m2, _, _ = models.load(stage2.version_id)
    groups1, groupsh, groups2 = (m.named_parameter_groups() for m in (m1, mh, m2))
    for group in ("lora", "backbone_new", "token_learner", "pretrained"):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(groups1[group], groupsh[group], strict=True))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(groupsh["lora"], groups2["lora"], strict=True))
    assert not torch.equal(groups1["critic_head"][0][1], groupsh["critic_head"][0][1])
    names = {row["name"] for row in read_metrics(tmp_path / "run")}
    assert {"stage2/loss", "session/success_rate"} <= names and any(n.startswith("stage1/") for n in names)
    report = tmp_path / "run" / "report"
    assert (report / "success_rate.png").stat().st_size > 0 and (report / "losses.png").stat().st_size > 0


def test_candidate_failing_validation_is_not_announced(cell, tmp_path):
    store, models, v1 = cell
    announced = []
    runner = IterationRunner(tmp_path / "run", store, models, config(), announce=announced.append)
    runner.start(v1)
    request = runner.request_iteration(IterationRequest(reason="operator"))
    # Stage 2 runs; its version is then corrupted on disk before validation reads it.
    original = runner._validate

    def corrupt_then_validate(candidate: str, req: IterationRequest) -> dict:
        weights = models.get(candidate).path / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
        return original(candidate, req)

    runner._validate = corrupt_then_validate  # type: ignore[method-assign]
    runner.work_once()
    assert request.done.is_set() and not request.result["promoted"]
    assert "checksum" in request.result["why"] or "validation failed" in request.result["why"]
    assert announced == []
    assert runner.record.iteration == 2 and runner.record.running_version == v1


def test_validation_holds_candidates_to_the_best_version_so_far(cell, tmp_path):
    """Two candidates, each within the margin of the version it would replace (0.9 -> 0.8 -> 0.7): the second is
    refused because it is worse than the best promoted version by more than the margin."""
    store, models, v1 = cell
    rates: dict[str, int] = {v1: 9}
    calls: list[tuple[str, int]] = []

    def scripted_evaluation(version: str, tasks, episodes: int, seed: int) -> EvalReport:
        # Test double of the simulated cell's evaluation (train/evaluation.evaluate runs MuJoCo episodes; what is
        # under test here is the promotion rule): each new version does one success fewer in 10 than the last.
        rates.setdefault(version, min(rates.values()) - 1)
        calls.append((version, seed))
        seeds = list(range(seed, seed + episodes))
        return EvalReport(
            version,
            {t: TaskEval(t, episodes, rates[version], [5] * episodes, seeds) for t in tasks},
            seed,
            True,
            5,
        )

    cfg = config(validation_episodes=10, validation_tasks=("button-press-v3",), validation_margin=0.1)
    announced = []
    runner = IterationRunner(
        tmp_path / "run", store, models, cfg, announce=announced.append, evaluate=scripted_evaluation
    )
    runner.start(v1)
    first = runner.request_iteration(IterationRequest(reason="operator"))
    runner.work_once()
    assert first.result["promoted"], first.result
    second_version = first.result["new_version"]
    assert rates[second_version] == 8 and runner.record.running_version == second_version
    assert runner.record.best_version == v1  # 0.8 replaced 0.9: the best is still v1
    assert set(first.result["evaluation"]) == {"running", "candidate"}

    second = runner.request_iteration(IterationRequest(reason="operator"))
    runner.work_once()
    result = second.result
    assert not result["promoted"], result  # 0.7 is within 0.1 of the running 0.8, not of the best 0.9
    assert set(result["evaluation"]) == {"best", "running", "candidate"}
    assert f"vs {v1} 0.900 (margin 0.100): worse" in result["why"]
    assert f"vs {second_version} 0.800 (margin 0.100): not worse" in result["why"]
    assert [a.version_id for a in announced if a.stage == "stage2_sft"] == [second_version]
    # every version of one validation on the same scenes
    assert len({seed for _, seed in calls[:2]}) == 1 and len({seed for _, seed in calls[2:]}) == 1
    record = IterationRecord.load(tmp_path / "run" / "iteration.json")
    assert record.best_version == v1 and record.running_version == second_version


def test_sigkill_during_stage2_resumes_in_that_phase(cell, tmp_path):
    store, _, v1 = cell
    for i in range(2):
        write_episode(store, f"policy-{i}", "policy", "success", v1, seed=20 + i)
    store.close()
    run = tmp_path / "run"
    script = f"""
import sys, threading
from pathlib import Path
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.iteration import IterationConfig, IterationRequest, IterationRunner
from irevla_ros.train.config import SFTConfig, Stage1Config
from irevla_ros.train.evaluation import EvalReport, TaskEval
from irevla_ros.vla.model_store import ModelStore
store = EpisodeStore(Path({str(tmp_path / "store")!r}))
cfg = IterationConfig(stage1_enabled=False, stage2=SFTConfig(steps=int(sys.argv[1]), batch_size=4, threads=1,
                      checkpoint_every=1))
announced = []
runner = IterationRunner(Path({str(run)!r}), store, ModelStore(Path({str(tmp_path / "models")!r})), cfg,
                         announce=lambda info: announced.append(info.version_id))
runner.start({v1!r})
if runner.record.phase == "session":
    runner.request_iteration(IterationRequest(reason="operator"))
runner.work_once()
print("ANNOUNCED", announced, flush=True)
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", script, "60"], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    checkpoints: list[Path] = []
    while time.monotonic() < deadline and child.poll() is None:
        state = run / "iteration.json"
        if state.exists() and json.loads(state.read_text())["phase"] == "supervised":
            checkpoints = list((run / "iteration-001" / "stage2").rglob("ckpt-*.json"))
            if len(checkpoints) >= 2:
                break
        time.sleep(0.2)
    assert child.poll() is None, "the child finished before it could be killed mid-Stage 2"
    assert checkpoints, "no Stage 2 checkpoint appeared"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert IterationRecord.load(run / "iteration.json").phase == "supervised"
    resumed = subprocess.run(
        [sys.executable, "-c", script, "60"], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = IterationRecord.load(run / "iteration.json")
    assert record.iteration == 2 and record.history[0]["promoted"], record.history
    stage2 = [v for v in ModelStore(tmp_path / "models").versions() if v.stage == "stage2_sft"]
    assert len(stage2) == 1 and f"ANNOUNCED ['{stage2[0].version_id}']" in resumed.stdout
    assert stage2[0].metrics["resumed_from"] >= 2, stage2[0].metrics  # from a checkpoint, not from step 0
