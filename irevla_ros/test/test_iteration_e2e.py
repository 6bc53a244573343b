"""End to end in simulation through the real node graph: a VLA session with Stage 1 live in the trainer, the end
of the session by its episode budget, Stage 2, validation in the simulated cell, the announcement, the policy node's
hot swap to the validated version, and a second session run by it (the `irevla demo` path at a tiny scale)."""

from __future__ import annotations

from pathlib import Path

import pytest

from irevla_ros.bringup.demo import exit_summary, run_iteration_sessions
from irevla_ros.policies.scripted import ScriptedExpertPolicy
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.iteration import IterationRecord
from irevla_ros.train.rollout import RolloutSettings, make_cell, run_episode, write_to_store
from irevla_ros.train.stage0 import train_first_version
from irevla_ros.vla.model_store import ModelStore

TASK = "button-press-v3"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_session_stage2_validated_version_hot_swapped_into_the_running_policy(ros_domain, tmp_path: Path):
    store_path, models, trainer_dir = tmp_path / "store", tmp_path / "models", tmp_path / "trainer"
    # D_e from the scripted expert, by direct rollouts in the same cell (the graph's settings)
    settings = RolloutSettings.from_graph(cameras=("camera",))
    cell = make_cell(settings, [TASK])
    try:
        with EpisodeStore(store_path) as store:
            for seed in (1, 2):
                episode = run_episode(cell, ScriptedExpertPolicy(), settings, TASK, seed, max_steps=60)
                write_to_store(store, episode, source="expert")
    finally:
        cell.close()
    v1 = train_first_version(store_path, models, ["camera"], steps=3, batch_size=4)

    session1, session2, verdict = run_iteration_sessions(
        1, store_path, models, trainer_dir, tmp_path / "logs",
        ["/policy.policy=vla", f"/policy.model_store={models}", f"/policy.version={v1.version_id}",
         "/episode_manager.source=policy", f"/episode_manager.tasks=[{TASK}]",
         "/episode_manager.episode_timeout=4.0", f"/trainer.model_store={models}",
         f"/trainer.run_dir={trainer_dir}", f"/trainer.initial_version={v1.version_id}",
         "/trainer.max_iterations=1", "/trainer.stage2.steps=3", "/trainer.stage2.batch_size=4",
         "/trainer.stage1.push_every_episodes=1", "/trainer.stage1.episodes_per_update=1",
         "/trainer.validation_episodes=1", f"/trainer.validation_tasks=[{TASK}]",
         # The evaluation runs, but one episode of 3-step models is a coin flip: promotion must not hang on it
         # here (a worse candidate kept out is test_iteration.py's).
         "/trainer.validation_margin=1.0"],
        ["camera"], 900.0,
    )  # fmt: skip

    for session in (session1, session2):
        assert session["episodes"] == 1 and session["lost_steps"] == 0 and session["incomplete"] == 0, session
    assert exit_summary({"vla": session1, "vla_after": session2})["failed"] == [], session2["exit_codes"]
    record = IterationRecord.load(trainer_dir / "iteration.json")
    assert record.iteration == 2 and verdict["promoted"], verdict
    candidate = ModelStore(models).get(verdict["candidate"])
    assert candidate.stage == "stage2_sft"
    # Stage 1 pushed heads during session 1, and Stage 2 started from them
    heads = ModelStore(models).get(candidate.parent)
    assert heads.stage == "stage1_rl" and heads.meta["heads_only"] and heads.parent == v1.version_id
    assert verdict["evaluation"]["candidate"]["tasks"][TASK]["episodes"] == 1
    # every step of session 1 names the version that acted, every step of session 2 the promoted one
    with EpisodeStore(store_path, read_only=True) as store:
        policy_rows = store.list(source="policy")
        assert len(policy_rows) == 2
        first, second = sorted(policy_rows, key=lambda r: r.started_ns)
        assert {s.policy_version for s in store.read(first.episode_id).steps} <= {
            v1.version_id,
            heads.version_id,
        }
        assert {s.policy_version for s in store.read(second.episode_id).steps} == {candidate.version_id}
    assert (trainer_dir / "report" / "success_rate.png").exists()
