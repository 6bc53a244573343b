"""Evaluation of a policy version in the simulated cell: success rate per task and overall, with Wilson 95%
confidence intervals, by direct rollouts (`irevla_ros.train.rollout`, the node graph's loop without ROS).

Every (task, episode index) gets its own layout seed derived from the evaluation seed, and a version is run with
its deterministic action (the mean), so two evaluations of one version agree exactly and two versions are
compared on the same scenes. Used by `irevla eval`, the promotion check (`not_worse`) and the benchmark.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irevla_ros import durable
from irevla_ros.policies.base import Policy

if (
    TYPE_CHECKING
):  # the rollout (MuJoCo, Meta-World) loads when an evaluation runs, not when `irevla` parses its verbs
    from irevla_ros.train.rollout import EpisodeResult, RolloutSettings

# Two-sided 95% normal quantile.
Z95 = 1.959963984540054


class EvaluationError(ValueError):
    """An evaluation request is malformed (no tasks, bad episode count, a model's camera the graph lacks...)."""


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (better than the normal one at small n or p near 0/1)."""
    if n < 0 or not 0 <= successes <= n:
        raise EvaluationError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); the formula gives it only up to rounding.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


@dataclass
class TaskEval:
    task: str
    episodes: int
    successes: int
    lengths: list[int]
    seeds: list[int]

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)

    @property
    def mean_length(self) -> float:
        return float(sum(self.lengths) / len(self.lengths)) if self.lengths else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "success_rate": round(self.success_rate, 4),
            "ci95": [round(x, 4) for x in self.ci95],
            "mean_length": round(self.mean_length, 2),
        }


@dataclass
class EvalReport:
    policy_version: str
    tasks: dict[str, TaskEval]
    seed: int
    deterministic: bool
    max_steps: int
    seconds: float = 0.0
    environment_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def episodes(self) -> int:
        """Environment episodes this evaluation used."""
        return sum(t.episodes for t in self.tasks.values())

    @property
    def successes(self) -> int:
        return sum(t.successes for t in self.tasks.values())

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.successes, self.episodes)

    def group(self, tasks: Sequence[str]) -> dict[str, Any]:
        """Pooled success rate over a subset of tasks (e.g. the expert tasks, or the unseen ones)."""
        missing = [t for t in tasks if t not in self.tasks]
        if missing:
            raise EvaluationError(f"tasks {missing} were not evaluated (evaluated: {sorted(self.tasks)})")
        n = sum(self.tasks[t].episodes for t in tasks)
        k = sum(self.tasks[t].successes for t in tasks)
        lo, hi = wilson_interval(k, n)
        return {
            "episodes": n,
            "successes": k,
            "success_rate": round(k / n, 4) if n else 0.0,
            "ci95": [round(lo, 4), round(hi, 4)],
        }

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci95
        return {
            "policy_version": self.policy_version,
            "seed": self.seed,
            "deterministic": self.deterministic,
            "max_steps": self.max_steps,
            "episodes": self.episodes,
            "successes": self.successes,
            "success_rate": round(self.success_rate, 4),
            "ci95": [round(lo, 4), round(hi, 4)],
            "environment_steps": self.environment_steps,
            "seconds": round(self.seconds, 2),
            "tasks": {name: t.to_dict() for name, t in self.tasks.items()},
            **({"extra": self.extra} if self.extra else {}),
        }

    def table(self) -> str:
        head = f"{'task':<28} {'success':>9} {'rate':>6} {'95% CI':>15} {'mean len':>9}"
        lines = [f"evaluation of {self.policy_version} (seed {self.seed})", head, "-" * len(head)]
        rows = [*self.tasks.values()]
        for t in rows:
            lo, hi = t.ci95
            lines.append(
                f"{t.task:<28} {t.successes:>4}/{t.episodes:<4} {t.success_rate:>6.2f} "
                f"{f'[{lo:.2f}, {hi:.2f}]':>15} {t.mean_length:>9.1f}"
            )
        lo, hi = self.ci95
        mean_len = sum(sum(t.lengths) for t in rows) / max(1, self.episodes)
        lines.append("-" * len(head))
        lines.append(
            f"{'overall':<28} {self.successes:>4}/{self.episodes:<4} {self.success_rate:>6.2f} "
            f"{f'[{lo:.2f}, {hi:.2f}]':>15} {mean_len:>9.1f}"
        )
        return "\n".join(lines)


def newest_best(rates: Mapping[str, float]) -> str:
    """The version (key) with the highest success rate; ties go to the later key, the newer version. The best
    version so far, which promotion gates hold candidates to."""
    return max(reversed(list(rates)), key=lambda version: rates[version])


def not_worse(candidate: EvalReport, running: EvalReport, margin: float) -> tuple[bool, str]:
    """The promotion rule: the candidate's overall success rate is at most `margin` below the running one's.
    Both must have been evaluated on the same tasks, episodes and seed (the same scenes)."""
    if not 0.0 <= margin <= 1.0:
        raise EvaluationError(f"margin must lie in [0, 1], got {margin}")
    same = {t: (e.seeds) for t, e in candidate.tasks.items()} == {
        t: e.seeds for t, e in running.tasks.items()
    }
    if not same:
        raise EvaluationError("the two reports were not evaluated on the same tasks and scenes (seeds)")
    ok = candidate.success_rate >= running.success_rate - margin - 1e-12
    verdict = "not worse" if ok else "worse"
    return ok, (
        f"{candidate.policy_version} {candidate.success_rate:.3f} vs {running.policy_version} "
        f"{running.success_rate:.3f} (margin {margin:.3f}): {verdict}"
    )


def load_policy(
    models: str | Path, version: str, *, deterministic: bool = True, seed: int = 0, prefer: str = "onnx"
) -> Policy:
    """A model-store version as the policy node runs it: `make_runtime` (ONNX Runtime when exported) in a
    VLAPolicy. Checksums are verified; an unknown or corrupt version raises InvalidVersionError."""
    from irevla_ros.policies.vla import VLAPolicy
    from irevla_ros.vla.model_store import ModelStore
    from irevla_ros.vla.runtime import make_runtime

    root = Path(models)
    if not root.is_dir():
        raise EvaluationError(f"model store {root} does not exist")
    store = ModelStore(root)
    if not version:
        latest = store.latest()
        if latest is None:
            raise EvaluationError(f"model store {root} has no version yet")
        version = latest.version_id
    info = store.verify(version)  # UnknownVersionError / CorruptVersionError (ValueError subclasses)
    runtime = make_runtime(info.path, prefer=prefer)
    return VLAPolicy(runtime, version, deterministic=deterministic, seed=seed)


def policy_cameras(policy: Policy) -> tuple[str, ...]:
    """The camera nodes a policy needs: a VLA's configured cameras, else the graph's default camera."""
    runtime = getattr(policy, "runtime", None)
    config = getattr(runtime, "config", None)
    return tuple(config.cameras) if config is not None else ("camera",)


def evaluate(
    policy: Policy | str,
    tasks: Sequence[str],
    episodes_per_task: int,
    seed: int,
    deterministic: bool = True,
    *,
    models: str | Path | None = None,
    settings: RolloutSettings | None = None,
    max_steps: int | None = None,
    progress: Callable[[str], None] | None = None,
    on_episode: Callable[[EpisodeResult], None] | None = None,
) -> EvalReport:
    """Run `episodes_per_task` episodes of every task and report success rates.

    `policy` is a Policy object (used as it is) or a version id of the model store `models` (loaded as the
    policy node loads it, deterministic unless told otherwise). Scenes are seeded per (seed, task, episode)."""
    from irevla_ros.train.rollout import RolloutSettings, episode_seed, make_cell, run_episode

    tasks = list(tasks)
    if not tasks:
        raise EvaluationError("tasks must name at least one task")
    if isinstance(episodes_per_task, bool) or not isinstance(episodes_per_task, int) or episodes_per_task < 1:
        raise EvaluationError(f"episodes_per_task must be a positive integer, got {episodes_per_task!r}")
    if isinstance(policy, str):
        if models is None:
            raise EvaluationError(f"version {policy!r} given without a model store (models=...)")
        policy = load_policy(models, policy, deterministic=deterministic, seed=seed)
    if settings is None:
        settings = RolloutSettings.from_graph(cameras=policy_cameras(policy))
    limit = settings.max_steps if max_steps is None else int(max_steps)
    started = time.monotonic()
    report = EvalReport(
        str(getattr(policy, "version", "")),
        {t: TaskEval(t, 0, 0, [], []) for t in tasks},
        int(seed),
        deterministic,
        limit,
    )
    cell = make_cell(settings, tasks)  # raises UnknownTaskError for a task Meta-World does not have
    try:
        for task in tasks:
            entry = report.tasks[task]
            for i in range(episodes_per_task):
                s = episode_seed(seed, task, i)
                result = run_episode(cell, policy, settings, task, s, keep_images=False, max_steps=limit)
                entry.episodes += 1
                entry.successes += int(result.success)
                entry.lengths.append(result.steps)
                entry.seeds.append(s)
                report.environment_steps += result.steps
                if on_episode is not None:
                    on_episode(result)
                if progress is not None:
                    progress(
                        f"{task} episode {i + 1}/{episodes_per_task}: {result.outcome} in {result.steps} steps "
                        f"({entry.successes}/{entry.episodes} so far)"
                    )
    finally:
        cell.close()
    report.seconds = time.monotonic() - started
    return report


# ---- `irevla eval` --------------------------------------------------------------------------------------------


def add_arguments(parser: Any) -> None:
    parser.add_argument("--models", default="", help="model store folder (required for --policy vla)")
    parser.add_argument("--version", default="", help="version id, e.g. v0002-stage2_sft ('' = newest)")
    parser.add_argument(
        "--policy",
        default="vla",
        choices=("vla", "scripted_expert"),
        help="vla: the model-store version; scripted_expert: Meta-World's expert (a reference)",
    )
    parser.add_argument("--tasks", required=True, help="comma-separated Meta-World v3 tasks")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation seed: fixes every scene (default: 0)")
    parser.add_argument(
        "--stochastic", action="store_true", help="sample the exploration noise instead of the mean action"
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="episode length limit (default: the graph's)"
    )
    parser.add_argument("--json", default="", help="also write the report to this file")


def cmd_eval(args: Any) -> int:
    tasks = [t for t in args.tasks.split(",") if t]
    if args.policy == "scripted_expert":
        from irevla_ros.policies.scripted import ScriptedExpertPolicy

        policy: Policy | str = ScriptedExpertPolicy(noise_std=0.0, seed=args.seed)
    else:
        if not args.models:
            raise EvaluationError("--models is required with --policy vla")
        policy = load_policy(args.models, args.version, deterministic=not args.stochastic, seed=args.seed)
    report = evaluate(
        policy,
        tasks,
        args.episodes,
        args.seed,
        deterministic=not args.stochastic,
        max_steps=args.max_steps,
        progress=lambda m: print(f"[eval] {m}", file=sys.stderr, flush=True),
    )
    print(report.table(), flush=True)
    document = report.to_dict()
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_json(path, document, indent=1)
    print(json.dumps(document), flush=True)
    return 0
