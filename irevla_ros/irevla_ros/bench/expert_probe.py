"""Which Meta-World tasks the scripted expert can demonstrate in this cell: the probe behind task choices.

    python -m irevla_ros.bench.expert_probe                          # every Meta-World v3 task, 15 episodes each
    python -m irevla_ros.bench.expert_probe --tasks push-v3,reach-v3 --episodes 5     # scratch results
    irevla bench-sim --probe-experts [--tasks ...] [--episodes N]    # the same through the CLI

Each task runs exactly as the simulation benchmark collects its demonstrations (`ire_vla_sim.collect_demos`):
`train/rollout.run_episode` on a cell made by `make_cell` from the sim graph's parameter files, the scripted expert
(`ScriptedExpertPolicy`, noise `demo_noise`), every action turned into a target by the arm controller's
SafetyLayer, the benchmark's episode limit (the graph's 150 steps) and its training scene seeds. Without cameras
(`render=False`): the expert acts on the simulator state, and the trajectory is the same as with them.

Per task, three columns of the same scenes:
- the expert at the demonstration noise (what `irevla bench-sim` and `irevla demo` record);
- the expert at noise 0 (a task failing here too is not the noise's doing);
- Meta-World's own policy driving its own env (no irevla code: `policy.get_action(obs)`, `env.step`, one env step
  per action), the reference of what the expert can do at all.

Results: bench/results/expert_probe.json and .md (a table sorted by success at the demonstration noise, with the
command that produced it). A run of some tasks or fewer episodes writes to scratch unless `--out` names a folder;
`--report RESULT_JSON` rebuilds the table of a result file.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irevla_ros import durable
from irevla_ros.bench.harness import RESULTS_DIR, log, write_result

DEFAULT_EPISODES = 15
# At or above this success rate at the demonstration noise a task is listed as one the expert demonstrates.
RELIABLE_RATE = 0.8


class ProbeError(ValueError):
    """A probe setting or a result file is unusable; the message says which."""


def all_tasks() -> list[str]:
    """Every Meta-World v3 task of the installed metaworld (MT50), sorted."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def outcome_summary(steps: Sequence[int | None], seconds: float) -> dict[str, Any]:
    """Episodes, successes, success rate with its Wilson 95% interval, and steps to success (median, max) of one
    column; `steps` holds each episode's steps to success, None for a failure."""
    from irevla_ros.train.evaluation import wilson_interval

    n = len(steps)
    solved = sorted(int(s) for s in steps if s is not None)
    lo, hi = wilson_interval(len(solved), n) if n else (0.0, 1.0)
    return {
        "episodes": n,
        "successes": len(solved),
        "success_rate": round(len(solved) / n, 4) if n else 0.0,
        "ci95": [round(lo, 4), round(hi, 4)],
        "steps_to_success": {
            "median": float(statistics.median(solved)) if solved else None,
            "max": solved[-1] if solved else None,
        },
        "steps": [None if s is None else int(s) for s in steps],
        "seconds_per_episode": round(seconds / n, 3) if n else None,
    }


def expert_in_cell(
    task: str,
    seeds: Sequence[int],
    noise: float,
    settings: Any,
    max_steps: int,
    cell_seed: int,
    policy_seed: int,
    render: bool = False,
) -> tuple[list[int | None], float]:
    """The scripted expert at `noise` on `task`, one episode per layout seed, through the benchmark's code path;
    returns each episode's steps to success (None: not within `max_steps`) and the wall seconds taken."""
    from irevla_ros.policies.scripted import ScriptedExpertPolicy
    from irevla_ros.train.rollout import make_cell, run_episode

    started = time.monotonic()
    cell = make_cell(settings, [task], seed=cell_seed)
    try:
        # One policy per task, as collect_demos makes one: its noise stream runs on across the task's episodes.
        policy = ScriptedExpertPolicy(noise_std=noise, seed=policy_seed)
        steps: list[int | None] = []
        for seed in seeds:
            ep = run_episode(
                cell, policy, settings, task, seed, keep_images=False, max_steps=max_steps, render=render
            )
            steps.append(ep.steps if ep.success else None)
    finally:
        cell.close()
    return steps, time.monotonic() - started


def metaworld_env(task: str) -> Any:
    """Meta-World's env for `task` set up as Meta-World's own MT1 benchmark sets it up, but with a fresh object
    placement per reset drawn from the env's seeded generator (`env.seed(s)`, then `reset()`) instead of a fixed
    list of 50: the placements a cell draws for the same layout seed. Meta-World only, no irevla code."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    env = ALL_V3_ENVIRONMENTS[task]()
    env._set_task_called = True
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    if env._partially_observable:
        del env.sawyer_observation_space  # the goal in the observation, as MT1 has it: some experts read it
        env._partially_observable = False
    env.max_path_length = 2**62  # the episode limit is the caller's (Meta-World's 500 would raise past it)
    return env


def expert_in_metaworld(task: str, seeds: Sequence[int], max_steps: int) -> tuple[list[int | None], float]:
    """Meta-World's own policy for `task` driving the env directly, one episode per layout seed: the reference."""
    from metaworld.policies import ENV_POLICY_MAP

    started = time.monotonic()
    env = metaworld_env(task)
    policy = ENV_POLICY_MAP[task]()
    steps: list[int | None] = []
    try:
        for seed in seeds:
            env.seed(int(seed))
            obs, _ = env.reset()
            solved = None
            for k in range(max_steps):
                obs, _reward, _terminated, _truncated, info = env.step(policy.get_action(obs))
                if info.get("success", 0.0) >= 1.0:
                    solved = k + 1
                    break
            steps.append(solved)
    finally:
        env.close()
    return steps, time.monotonic() - started


def render_comparison(task: str, settings: Any, seed: int, steps: int = 40) -> dict[str, Any]:
    """One noise-free expert episode of `task` with and without the cameras: wall time per step of each, and
    whether the two trajectories agree (they must: rendering reads the physics, never changes it)."""
    from irevla_ros.policies.scripted import ScriptedExpertPolicy
    from irevla_ros.train.rollout import make_cell, run_episode

    cell = make_cell(settings, [task], seed=seed)
    try:
        runs = {}
        for render in (True, False):
            t0 = time.monotonic()
            ep = run_episode(
                cell, ScriptedExpertPolicy(0.0), settings, task, seed,
                keep_images=False, max_steps=steps, render=render,
            )  # fmt: skip
            runs[render] = (ep, (time.monotonic() - t0) / ep.steps)
    finally:
        cell.close()
    (with_cam, t_cam), (without, t_none) = runs[True], runs[False]
    return {
        "task": task,
        "steps": with_cam.steps,
        "ms_per_step_rendering": round(1e3 * t_cam, 2),
        "ms_per_step_without_cameras": round(1e3 * t_none, 2),
        "speedup": round(t_cam / t_none, 1),
        "cameras": [c.sim_camera for c in settings.cameras],
        "image_size": [settings.cell_width, settings.cell_height],
        "same_trajectory": bool(
            with_cam.steps == without.steps
            and np.array_equal(with_cam.ee_after, without.ee_after)
            and np.array_equal(with_cam.actions, without.actions)
        ),
    }


def probe(
    tasks: Sequence[str],
    episodes: int,
    *,
    noise: float | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    reference: bool = True,
    progress: Callable[[str], None] = log,
) -> dict[str, Any]:
    """The probe's parameters and per-task results (the body of expert_probe.json). Defaults: the benchmark's
    (`BenchConfig` at the default scale: demo noise, seed, cameras; episode limit the graph's)."""
    from irevla_ros.bench.ire_vla_sim import _train_seed, load_config
    from irevla_ros.train.rollout import RolloutSettings

    known = set(all_tasks())
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise ProbeError(f"unknown or no tasks {unknown}; Meta-World v3 has {sorted(known)}")
    if len(set(tasks)) != len(tasks):
        raise ProbeError(f"tasks must not repeat, got {list(tasks)}")
    if episodes < 1:
        raise ProbeError(f"episodes must be >= 1, got {episodes}")
    cfg = load_config("default", None, {"seed": seed})
    demo_noise = cfg.demo_noise if noise is None else float(noise)
    if not demo_noise >= 0.0:
        raise ProbeError(f"noise must be >= 0, got {demo_noise}")
    settings = RolloutSettings.from_graph(cameras=tuple(cfg.cameras))
    limit = int(max_steps or cfg.max_steps or settings.max_steps)
    if limit < 1:
        raise ProbeError(f"max_steps must be >= 1, got {limit}")
    started = time.monotonic()
    per_task: dict[str, Any] = {}
    with warnings.catch_warnings():
        # Meta-World's experts warn on every action their gain pushes past [-1, 1]; the env clips by design.
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        for i, task in enumerate(tasks):
            seeds = [_train_seed(cfg.seed, task, k) for k in range(episodes)]
            row: dict[str, Any] = {"seeds": seeds}
            for key, sigma in (("demo_noise", demo_noise), ("noise_0", 0.0)):
                steps, seconds = expert_in_cell(task, seeds, sigma, settings, limit, cfg.seed, cfg.seed)
                row[key] = outcome_summary(steps, seconds)
            if reference:
                steps, seconds = expert_in_metaworld(task, seeds, limit)
                row["metaworld"] = outcome_summary(steps, seconds)
            per_task[task] = row
            ref = f", Meta-World {row['metaworld']['successes']}/{episodes}" if reference else ""
            progress(
                f"expert probe {i + 1}/{len(tasks)} {task}: {row['demo_noise']['successes']}/{episodes} at noise "
                f"{demo_noise}, {row['noise_0']['successes']}/{episodes} at 0{ref} "
                f"({time.monotonic() - started:.0f} s so far)"
            )
        timing = render_comparison(tasks[0], settings, per_task[tasks[0]]["seeds"][0])
    parameters = {
        "tasks": list(tasks),
        "episodes": episodes,
        "demo_noise": demo_noise,
        "max_steps": limit,
        "seed": cfg.seed,
        "control_period": settings.control_period,
        "max_step": settings.limits.max_step,
        "action_scale": settings.limits.action_scale,
        "reference": reference,
    }
    return {
        "parameters": parameters,
        "tasks": per_task,
        "render_comparison": timing,
        "seconds": round(time.monotonic() - started, 1),
    }


def _rate(col: dict[str, Any]) -> str:
    lo, hi = col["ci95"]
    return f"{col['success_rate']:.2f} ({col['successes']}/{col['episodes']}) [{lo:.2f}, {hi:.2f}]"


def _steps(col: dict[str, Any]) -> str:
    s = col["steps_to_success"]
    return "-" if s["median"] is None else f"{s['median']:g} / {s['max']}"


def order(per_task: dict[str, Any]) -> list[str]:
    """Tasks by success at the demonstration noise, then at noise 0, then fewer steps, then name."""

    def key(task: str) -> tuple[float, float, float, str]:
        row = per_task[task]
        median = row["demo_noise"]["steps_to_success"]["median"]
        return (
            -row["demo_noise"]["success_rate"],
            -row["noise_0"]["success_rate"],
            median if median is not None else float("inf"),
            task,
        )

    return sorted(per_task, key=key)


def markdown(doc: dict[str, Any]) -> str:
    p, per_task = doc["parameters"], doc["tasks"]
    ref = bool(p.get("reference"))
    sigma = p["demo_noise"]
    head = [
        "Task",
        f"Success, noise {sigma} [95% CI]",
        "Steps median / max",
        "Success, noise 0 [95% CI]",
        "Steps median / max",
    ]
    if ref:
        head += ["Meta-World's loop, noise 0", "Steps median / max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in order(per_task):
        row = per_task[task]
        cells = [task, _rate(row["demo_noise"]), _steps(row["demo_noise"])]
        cells += [_rate(row["noise_0"]), _steps(row["noise_0"])]
        if ref:
            cells += [_rate(row["metaworld"]), _steps(row["metaworld"])]
        lines.append("| " + " | ".join(cells) + " |")
    reliable = [t for t in order(per_task) if per_task[t]["demo_noise"]["success_rate"] >= RELIABLE_RATE]
    never = [t for t in order(per_task) if per_task[t]["demo_noise"]["successes"] == 0]
    rc = doc.get("render_comparison") or {}
    text = [
        "# Scripted expert probe: every Meta-World v3 task in the simulated cell",
        "",
        f"{p['episodes']} episodes per task and column, the benchmark's demonstration scenes (seed {p['seed']}), "
        f"at most {p['max_steps']} steps (control period {p['control_period']} s, max_step {p['max_step']} m), "
        "through the benchmark's own loop (train/rollout.run_episode: SafetyLayer, sim arm, control period). "
        "Steps are steps to success of the successful episodes. The last column is Meta-World's own policy "
        "driving its env directly, one env step per action, on the same scenes.",
        "",
        f"Demonstrable (success >= {RELIABLE_RATE:.0%} at noise {sigma}): {len(reliable)} of {len(per_task)}: "
        + (", ".join(reliable) or "none")
        + ".",
        "",
        f"Never solved at noise {sigma}: {len(never)}: " + (", ".join(never) or "none") + ".",
        "",
        *lines,
        "",
    ]
    if rc:
        text.append(
            f"Without cameras the probe ran {rc['speedup']}x faster: {rc['ms_per_step_without_cameras']} ms per "
            f"step against {rc['ms_per_step_rendering']} ms rendering {rc['cameras']} at "
            f"{rc['image_size'][0]}x{rc['image_size'][1]} ({rc['task']}, {rc['steps']} steps; same trajectory: "
            f"{rc['same_trajectory']})."
        )
        text.append("")
    text.append(f"Produced by: `{doc.get('command', '?')}` ({doc.get('seconds', '?')} s, git {_git(doc)}).")
    text.append(
        f"Table rebuilt by: `python -m irevla_ros.bench.expert_probe --report {doc.get('path', 'RESULT')}`."
    )
    return "\n".join(text) + "\n"


def _git(doc: dict[str, Any]) -> str:
    return str((doc.get("machine") or {}).get("git_revision", "?"))


def load_result(path: Path) -> dict[str, Any]:
    import json

    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("benchmark") != "expert_probe":
        raise ProbeError(f"{path} is not an expert_probe result")
    return doc


def write_report(result: Path) -> Path:
    """expert_probe.md beside a result file, derived from it alone."""
    doc = load_result(result)
    doc["path"] = str(result)
    md = Path(result).with_suffix(".md")
    durable.write_text(md, markdown(doc))
    return md


def main(argv: Sequence[str] | None = None, prog: str = "python -m irevla_ros.bench.expert_probe") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=None, help="comma-separated (default: every Meta-World v3 task)")
    parser.add_argument("--episodes", type=int, default=DEFAULT_EPISODES, help="per task and column")
    parser.add_argument(
        "--noise", type=float, default=None, help="demonstration noise (default: benchmark's)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="default: the benchmark's (the graph's)")
    parser.add_argument("--seed", type=int, default=None, help="default: the benchmark's")
    parser.add_argument("--no-reference", action="store_true", help="skip Meta-World's own loop")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: bench/results for a full run)"
    )
    parser.add_argument(
        "--report", type=Path, default=None, metavar="RESULT_JSON", help="only rebuild the .md"
    )
    args = parser.parse_args(argv)
    try:
        if args.report is not None:
            print(write_report(args.report))
            return 0
        tasks = all_tasks() if args.tasks is None else [t for t in args.tasks.split(",") if t]
        body = probe(
            tasks,
            args.episodes,
            noise=args.noise,
            max_steps=args.max_steps,
            seed=args.seed,
            reference=not args.no_reference,
        )
    except (ProbeError, OSError, KeyError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    full = tasks == all_tasks() and args.episodes >= DEFAULT_EPISODES
    # A partial run checks something: its numbers never overwrite the committed result unless asked to.
    out = args.out or (RESULTS_DIR if full else Path("runs") / time.strftime("expert-probe-%Y%m%d-%H%M%S"))
    body["command"] = f"{prog} {shlex.join(sys.argv[1:] if argv is None else argv)}".strip()
    params = body.pop("parameters")
    result = write_result(out / "expert_probe.json", "expert_probe", params, body)
    md = write_report(result)
    log(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
