"""The report written after every iteration, next to the run: `report/report.md`, `report/report.json` and PNG plots
(success rate and the operator's takeovers per episode per iteration, success rate per task, Stage 1 and Stage 2
losses), from the iteration history and the metrics log (train/metrics.py)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irevla_ros import durable
from irevla_ros.train.metrics import read_metrics

# PPO's and SACfD's own losses, and Stage 2's MSE
PLOTTED_LOSSES = (
    "stage1/policy_loss",
    "stage1/value_loss",
    "stage1/actor_loss",
    "stage1/critic_loss",
    "stage2/loss",
)


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

    # (a) overall success rate per iteration; (b) per task and iteration (simulation evaluation of the candidate)
    fig, (ax, hm) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.2]})
    its = [h["iteration"] for h in history]
    curves = {
        "session episodes (running policy)": [h.get("session_success_rate") for h in history],
        "evaluation: running version": [
            ((h.get("evaluation") or {}).get("running") or {}).get("success_rate") for h in history
        ],
        "evaluation: candidate": [
            ((h.get("evaluation") or {}).get("candidate") or {}).get("success_rate") for h in history
        ],
    }
    for (label, values), marker in zip(curves.items(), ("o", "s", "D"), strict=True):
        points = [(i, v) for i, v in zip(its, values, strict=True) if v is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("success rate")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    if its:
        ax.set_xticks(its)
    # Takeovers per session episode on their own axis: fewer is the other half of "the policy got better".
    takeovers = [(i, h["interventions_per_episode"]) for i, h in zip(its, history, strict=True)
                 if h.get("interventions_per_episode") is not None]  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    if takeovers:
        tx = ax.twinx()
        (line,) = tx.plot([p[0] for p in takeovers], [p[1] for p in takeovers], marker="^", linestyle="--",
                          color="tab:red", label="operator takeovers per session episode")  # fmt: skip
        tx.set_ylabel("takeovers per episode")
        tx.set_ylim(bottom=0.0, top=max(1.0, 1.1 * max(p[1] for p in takeovers)))
        handles.append(line)
        labels.append(line.get_label())
    ax.legend(handles, labels, fontsize=7)
    ax.set_title("success rate and takeovers per iteration")
    tasks = sorted({t for h in history for t in _task_rates((h.get("evaluation") or {}).get("candidate"))})
    if tasks:
        grid = np.full((len(tasks), len(its)), np.nan)
        for j, h in enumerate(history):
            for task, rate in _task_rates((h.get("evaluation") or {}).get("candidate")).items():
                grid[tasks.index(task), j] = rate
        hm.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (r, c), value in np.ndenumerate(grid):
            if not np.isnan(value):
                hm.text(c, r, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
        hm.set_xticks(range(len(its)), [str(i) for i in its])
        hm.set_yticks(range(len(tasks)), tasks, fontsize=8)
        hm.set_xlabel("iteration")
        hm.set_title("candidate's success rate per task (simulation)")
    else:
        hm.axis("off")
        hm.text(0.5, 0.5, "no per-task evaluation (robot: checks only)", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out / "success_rate.png", dpi=110)
    plt.close(fig)

    # losses of both stages, from the metrics log
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in read_metrics(run_dir):
        name = str(row.get("name", ""))
        if row.get("value") is None or name not in PLOTTED_LOSSES:
            continue
        series[f"{name} (it {row.get('iteration', '?')})"].append((int(row["step"]), float(row["value"])))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in sorted(series.items()):
        ax = axes[0] if key.startswith("stage1/") else axes[1]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=key)
    titles = ("Stage 1 (online RL, heads)", "Stage 2 (supervised, LoRA + action head)")
    for ax, title, xlabel in zip(axes, titles, ("RL update", "optimiser step"), strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "losses.png", dpi=110)
    plt.close(fig)

    lines = ["# iRe-VLA iterations", "",
             "| iteration | end | episodes | session success | takeovers (per episode) | candidate | promoted | why |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for h in history:
        lines.append(
            f"| {h['iteration']} | {h.get('end_reason', '')} | {h.get('session_episodes', 0)} | "
            f"{h.get('session_success_rate', 0.0):.2f} | {h.get('session_interventions', 0)} "
            f"({h.get('interventions_per_episode', 0.0):.2f}) | {h.get('candidate', '')} | "
            f"{'yes' if h.get('promoted') else 'no'} | {h.get('why', '')} |"
        )
    lines += ["", "![success rate](success_rate.png)", "", "![losses](losses.png)", ""]
    durable.write_text(out / "report.md", "\n".join(lines))
    durable.write_text(out / "report.json", json.dumps(list(history), indent=2, default=str))
    return out
