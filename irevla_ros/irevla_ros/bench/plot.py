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


def _bench_columns(params: dict) -> list[tuple[str, str]]:
    columns = [("expert", f"expert ({len(params['expert_tasks'])} tasks)")]
    columns += [(f"rl:{t}", f"RL: {t}") for t in params["rl_tasks"]]
    if params.get("unseen_tasks"):
        columns.append(("unseen", f"unseen ({len(params['unseen_tasks'])} tasks)"))
    return columns


def plot_ire_vla_sim(result: Path, image: Path | None = None) -> Path:
    """Grouped bars of `irevla bench-sim`'s table: success rate per method on the expert tasks, each RL task and
    the unseen tasks (mean over seeds with the 95% t-interval; one seed: its pooled Wilson interval), and each
    seed's value as a dot, so that one seed's failure is never hidden in a mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    document = json.loads(result.read_text())
    methods: dict[str, dict] = document["methods"]
    params = document["parameters"]
    seeds = len(document["seeds"])
    columns = _bench_columns(params)
    image = image or result.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(2.2 + 2.1 * len(columns), 4.2))
    width = 0.8 / max(1, len(methods))
    for i, (name, m) in enumerate(methods.items()):
        groups = [m["rl"][key[3:]] if key.startswith("rl:") else m[key] for key, _ in columns]
        means = [g["mean"] for g in groups]
        bounds = [g["ci95"] if seeds > 1 else g["pooled_wilson95"] for g in groups]
        low = [max(0.0, g["mean"] - b[0]) for g, b in zip(groups, bounds, strict=True)]
        high = [max(0.0, b[1] - g["mean"]) for g, b in zip(groups, bounds, strict=True)]
        x = [c + (i - (len(methods) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(
            x,
            means,
            width,
            yerr=[low, high],
            capsize=3,
            label=f"{name} ({m['environment_episodes']['rl']} RL episodes)",
        )
        if seeds > 1:
            for xi, g in zip(x, groups, strict=True):
                ax.scatter([xi] * len(g["per_seed"]), g["per_seed"], s=9, color="black", zorder=3)
    ax.set_xticks(range(len(columns)), [label for _, label in columns], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (deterministic)")
    ax.legend(fontsize=8, loc="upper right")
    interval = (
        f"mean over {seeds} seeds, 95% t-interval, dots: seeds" if seeds > 1 else "one seed, Wilson 95%"
    )
    ax.set_title(
        f"iRe-VLA simulation benchmark ({document.get('scale', '?')}): {params['eval_episodes_per_task']} evaluation "
        f"episodes per task per seed\n{interval}",
        fontsize=9,
    )
    return _save(fig, image)


def plot_ire_vla_sim_curves(result: Path, image: Path | None = None) -> Path:
    """Success on each RL task against the RL episodes spent, per method (mean over seeds with its 95%
    t-interval band; each seed as a thin line), the SFT policy's level and the level SFT + level_delta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    document = json.loads(result.read_text())
    params = document["parameters"]
    tasks = params["rl_tasks"]
    image = image or result.with_name(result.stem + "_curves.png")
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6.5, 4.6 * len(tasks)), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sft = document["methods"]["SFT"]["rl"][task]["mean"]
        for name, m in document["methods"].items():
            if "curves" not in m:
                continue
            points = m["curves"][task]
            x = [p["rl_episodes"] for p in points]
            (line,) = ax.plot(x, [p["mean"] for p in points], marker="o", label=name)
            ax.fill_between(x, [p["ci95"][0] for p in points], [p["ci95"][1] for p in points],
                            color=line.get_color(), alpha=0.15)  # fmt: skip
            for s in range(len(points[0]["per_seed"])):
                ax.plot(x, [p["per_seed"][s] for p in points], color=line.get_color(), alpha=0.35, lw=0.7)
        ax.axhline(sft, color="grey", ls=":", label=f"SFT {sft:.2f}")
        level = min(1.0, sft + params["level_delta"])
        ax.axhline(level, color="grey", ls="--", lw=0.8, label=f"SFT + {params['level_delta']:g}")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("RL environment episodes on the task")
        ax.set_ylim(-0.02, 1.05)
        ax.set_ylabel("success rate (deterministic)")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"iRe-VLA benchmark ({document.get('scale', '?')}): success vs environment episodes\n"
        f"mean of {len(document['seeds'])} seed(s) with 95% t-band, thin lines: seeds; "
        f"{params['eval_episodes_per_task']} evaluation episodes per point",
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
        plot_ire_vla_sim_curves(args.results / "ire_vla_sim.json")


if __name__ == "__main__":
    main()
