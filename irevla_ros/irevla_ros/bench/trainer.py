"""bench/results/trainer.json: the trainer's compute, measured in one run.

- stage1: Stage 1 gradient updates per second on cached latents vs recomputing the backbone (bench/stage1.py);
- stage2: Stage 2 samples per second and peak memory, LoRA vs full fine-tuning (bench/stage2.py);
- iteration: wall-clock of one full iteration at the default scale (the demo's: 5 scripted demonstrations,
  Stage 0, a 3-episode session with Stage 1, Stage 2 of 150 steps, validation in simulation on one episode per
  task for both versions), driven through the same IterationRunner the trainer node runs, with episodes from
  direct rollouts in the simulated cell written through the episode store.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from irevla_ros.bench.harness import log, write_result
from irevla_ros.node_parameters import DEFAULT_TASKS


def iteration_wall_clock(work: Path, quick: bool) -> dict[str, Any]:
    from irevla_ros.policies.scripted import ScriptedExpertPolicy
    from irevla_ros.store.episode_store import EpisodeStore
    from irevla_ros.train.config import SFTConfig, Stage1Config
    from irevla_ros.train.evaluation import load_policy
    from irevla_ros.train.iteration import IterationConfig, IterationRunner, simulation_evaluator
    from irevla_ros.train.rollout import RolloutSettings, make_cell, run_episode, write_to_store
    from irevla_ros.train.stage0 import train_first_version
    from irevla_ros.vla.model_store import ModelStore

    demos, session, steps = (2, 1, 5) if quick else (5, 3, 150)
    tasks = DEFAULT_TASKS[:2] if quick else DEFAULT_TASKS
    store_path, models = work / "store", work / "models"
    settings = RolloutSettings.from_graph(cameras=("camera",))
    cell = make_cell(settings, tasks)
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        with EpisodeStore(store_path) as store:
            for i in range(demos):
                task = tasks[i % len(tasks)]
                write_to_store(store, run_episode(cell, ScriptedExpertPolicy(0.1, seed=i), settings, task, i),
                               source="expert")  # fmt: skip
        timings["demonstrations_s"] = time.monotonic() - t0
        t0 = time.monotonic()
        v1 = train_first_version(store_path, models, ["camera"], steps=steps)
        timings["stage0_s"] = time.monotonic() - t0
        policy = load_policy(models, v1.version_id, deterministic=False)
        t0 = time.monotonic()
        episodes = []
        for i in range(session):
            episodes.append(run_episode(cell, policy, settings, tasks[i % len(tasks)], 100 + i))
        timings["session_rollouts_s"] = time.monotonic() - t0
    finally:
        cell.close()

    marks: list[tuple[str, float]] = []
    config = IterationConfig(
        episode_budget=session,
        stage1=Stage1Config(push_every_episodes=max(1, session - 1), episodes_per_update=max(1, session - 1)),
        stage2=SFTConfig(steps=steps, batch_size=16),
        validation_tasks=tuple(tasks),
        validation_episodes=1,
    )
    with EpisodeStore(store_path) as store:
        runner = IterationRunner(
            work / "trainer", store, ModelStore(models), config, announce=lambda info: None,
            progress=lambda stage, value, message: marks.append((stage, time.monotonic())),
            log=lambda text: print(f"[bench:trainer] {text}", file=sys.stderr, flush=True),
            evaluate=simulation_evaluator(models),
        )  # fmt: skip
        runner.start(v1.version_id)
        started = time.monotonic()
        for episode in episodes:
            row = write_to_store(store, episode, source="policy")
            runner.on_episode_stored(row)
            runner.work_once()  # Stage 1 on the episode; at the budget: Stage 2, validation, announcement
        total = time.monotonic() - started
    verdict = runner.record.history[-1]
    firsts: dict[str, float] = {}
    for stage, at in marks:
        firsts.setdefault(stage, at)
    order = [s for s in ("stage2", "validation") if s in firsts]
    phase_s = {}
    for i, stage in enumerate(order):
        end = firsts[order[i + 1]] if i + 1 < len(order) else started + total
        phase_s[f"{stage}_s"] = round(end - firsts[stage], 2)
    phase_s["stage1_s"] = round(firsts.get("stage2", started + total) - started, 2)
    return {
        "scale": {"demonstrations": demos, "session_episodes": session, "sft_steps": steps, "tasks": tasks},
        **{k: round(v, 2) for k, v in timings.items()},
        "iteration_s": round(total, 2),
        "phases": phase_s,
        "promoted": bool(verdict.get("promoted")),
        "evaluation": {
            k: (verdict.get("evaluation") or {}).get(k, {}).get("success_rate")
            for k in ("running", "candidate")
        },
    }


def run(out: Path, work: Path, quick: bool) -> dict[str, Any]:
    from irevla_ros.bench import stage1, stage2

    measures: dict[str, Any] = {}
    log("trainer: Stage 1 cached vs recomputed latents")
    measures["stage1"] = stage1.run(quick=quick)
    log("trainer: Stage 2 LoRA vs full fine-tuning")
    measures["stage2"] = stage2.run(quick=quick)
    log("trainer: one full iteration")
    measures["iteration"] = iteration_wall_clock(work, quick)
    write_result(out / "trainer.json", "trainer", {"quick": quick}, {"measures": measures})
    return measures
