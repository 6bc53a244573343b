"""The report written after every iteration, next to the run: `report/report.md`, `report/report.json` and PNG plots
(success rate per iteration and per task, Stage 1 and Stage 2 losses), from the iteration history and the metrics
log (train/metrics.py)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from irevla_ros.train.metrics import read_metrics


def _task_rates(evaluation: dict[str, Any] | None) -> dict[str, float]:
    if not evaluation:
        return {}
    per_task = evaluation.get("tasks") or {}
    out = {}
    for task, value in per_task.items():
        out[task] = float(value["success_rate"] if isinstance(value, dict) else value)
    return out


def write_report(run_dir: str | Path, history: Sequence[dict[str, Any]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)

    # success rate per iteration: the session's own episodes, and (simulation) the evaluation per task
    fig, ax = plt.subplots(figsize=(7, 4))
    its = [h["iteration"] for h in history]
    ax.plot(
        its, [h.get("session_success_rate", 0.0) for h in history], "o-", label="session (running policy)"
    )
    per_task: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for h in history:
        ev = h.get("evaluation") or {}
        for task, rate in _task_rates(ev.get("candidate")).items():
            per_task[task].append((h["iteration"], rate))
    for task, points in sorted(per_task.items()):
        ax.plot([p[0] for p in points], [p[1] for p in points], "s--", label=f"eval {task} (candidate)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    if its:
        ax.set_xticks(its)
    ax.legend(fontsize=7)
    ax.set_title("iRe-VLA: success rate per iteration")
    fig.tight_layout()
    fig.savefig(out / "success_rate.png", dpi=110)
    plt.close(fig)

    # losses of both stages, from the metrics log
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in read_metrics(run_dir):
        name = str(row.get("name", ""))
        if row.get("value") is None or not name.endswith("loss"):
            continue
        key = f"{name} (it {row.get('iteration', '?')})"
        series[key].append((int(row["step"]), float(row["value"])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in sorted(series.items()):
        ax = axes[0] if key.startswith("stage1/") else axes[1]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=key)
    for ax, title in zip(
        axes, ("Stage 1 (online RL, heads)", "Stage 2 (supervised, LoRA + action head)"), strict=True
    ):
        ax.set_title(title)
        ax.set_xlabel("update / step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)

    lines = ["# iRe-VLA iterations", "", "| iteration | end | episodes | session success | candidate | promoted | why |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for h in history:
        lines.append(
            f"| {h['iteration']} | {h.get('end_reason', '')} | {h.get('session_episodes', 0)} | "
            f"{h.get('session_success_rate', 0.0):.2f} | {h.get('candidate', '')} | "
            f"{'yes' if h.get('promoted') else 'no'} | {h.get('why', '')} |"
        )
    lines += ["", "![success rate](success_rate.png)", "", "![losses](losses.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps(list(history), indent=2, default=str))
    return out
