"""`control_loop.png`: histograms of control tick periods and camera-frame-to-record latency, one row per
real-time factor, drawn from the samples in `control_loop.json`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from irevla_ros.bench.harness import RESULTS_DIR, log


def _save(fig: object, image: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(image, dpi=100)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    log(f"wrote {image}")
    return image


def plot_control_loop(result: Path, image: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    document = json.loads(result.read_text())
    entries = document["entries"]
    image = image or result.with_suffix(".png")
    fig, axes = plt.subplots(len(entries), 2, figsize=(11, 3.2 * len(entries)), squeeze=False)
    for row, entry in zip(axes, entries, strict=True):
        rtf = entry["real_time_factor"]
        label = f"{entry.get('policy', 'scripted_expert')}, rtf {rtf:g}" + (
            " (as fast as possible)" if rtf == 0 else ""
        )
        for ax, key, title, nominal in (
            (row[0], "period_ms", "control tick period", entry.get("jitter_nominal_ms") if rtf > 0 else None),
            (row[1], "latency_frame_to_record_ms", "camera frame -> step record latency", None),
        ):
            samples = entry["samples"][key]
            stats = entry[key]
            if samples:
                ax.hist(samples, bins=60, color="tab:blue", alpha=0.8, log=True)
            if nominal:
                ax.axvline(nominal, color="tab:green", linestyle=":", label=f"nominal {nominal:g} ms")
            for q, style in (("p50", "--"), ("p99", "-")):
                if stats[q] is not None:
                    ax.axvline(stats[q], color="tab:red", linestyle=style, label=f"{q} {stats[q]:.1f} ms")
            ax.set_title(f"{title}, {label}", fontsize=10)
            ax.set_xlabel("ms (wall, observer reception)")
            ax.set_ylabel("count (log)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    machine = document.get("machine", {})
    fig.suptitle(
        f"control loop, {machine.get('cpu_count', '?')} CPUs, "
        f"load {machine.get('load_average_1_5_15', '?')}, "
        f"{document.get('created_utc', '')}",
        fontsize=10,
    )
    return _save(fig, image)


def plot_ire_vla_sim(result: Path, image: Path | None = None) -> Path:
    """Grouped bars of `irevla bench-sim`'s table: success rate per method on the expert tasks, each RL task and
    the unseen tasks, with Wilson 95% intervals, and the environment episodes each method trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    document = json.loads(result.read_text())
    methods: dict[str, dict] = document["methods"]
    params = document["parameters"]
    columns = [("expert", f"expert ({len(params['expert_tasks'])} tasks)")]
    columns += [(f"rl:{t}", f"RL: {t}") for t in params["rl_tasks"]]
    if params.get("unseen_tasks"):
        columns.append(("unseen", f"unseen ({len(params['unseen_tasks'])} tasks)"))
    image = image or result.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(2.2 + 2.1 * len(columns), 4.2))
    width = 0.8 / max(1, len(methods))
    for i, (name, m) in enumerate(methods.items()):
        groups = [m["rl"][key[3:]] if key.startswith("rl:") else m[key] for key, _ in columns]
        rates = [g["success_rate"] for g in groups]
        low = [g["success_rate"] - g["ci95"][0] for g in groups]
        high = [g["ci95"][1] - g["success_rate"] for g in groups]
        x = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        e = m["environment_episodes"]
        ax.bar(x, rates, width, yerr=[low, high], capsize=3, label=f"{name} ({e['train']} train episodes)")
    ax.set_xticks(range(len(columns)), [label for _, label in columns], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (deterministic)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(
        f"iRe-VLA simulation benchmark ({document.get('scale', '?')}): {params['eval_episodes_per_task']} evaluation "
        f"episodes per task, Wilson 95% intervals",
        fontsize=9,
    )
    return _save(fig, image)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    plot_control_loop(args.results / "control_loop.json")
    if (args.results / "ire_vla_sim.json").exists():
        plot_ire_vla_sim(args.results / "ire_vla_sim.json")


if __name__ == "__main__":
    main()
