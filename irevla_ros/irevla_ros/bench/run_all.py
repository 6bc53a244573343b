"""`make bench`: every collection-loop benchmark in turn, results in bench/results/, then the plot.

Scratch (graph logs, episode stores) goes to runs/bench-<time>/ (git-ignored). A failing benchmark does not
stop the others; the exit status says whether all succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from irevla_ros.bench import (
    arm_backends,
    control_loop,
    plot,
    policy_node,
    sim_camera,
    takeover,
    trainer,
    transport,
)
from irevla_ros.bench.harness import RESULTS_DIR, log


def benchmarks(out: Path, work: Path, quick: bool) -> list[tuple[str, Callable[[], object]]]:
    """(name, thunk) for each step; `quick` is a few seconds each, for checking the code paths."""
    if quick:
        return [
            (
                "control_loop",
                lambda: control_loop.run(out, work / "control_loop", 5.0, 5.0, vla_seconds=5.0),
            ),
            ("transport", lambda: transport.run(out, work / "transport", episodes=1, max_seconds=30.0)),
            ("sim_camera", lambda: sim_camera.run(out, work / "sim_camera", seconds=4.0, renders=10)),
            ("plot", lambda: plot.plot_control_loop(out / "control_loop.json")),
            ("policy", lambda: policy_latency(out, steps=20)),
            (
                "policy_node",
                # one compact version still takes ~30 s to save: the quick run skips the second one
                lambda: policy_node.run(
                    out, work / "policy_node", 1, settle_s=0.5, warmup_actions=5, full_swap=False
                ),
            ),
            ("trainer", lambda: trainer.run(out, work / "trainer", quick=True)),
            ("arm_backends", lambda: arm_backends.run(out, steps=3, seconds=2.0)),
            ("takeover", lambda: takeover.run(out, work / "takeover", trials=3)),
        ]
    return [
        ("control_loop", lambda: control_loop.run(out, work / "control_loop", vla_seconds=75.0)),
        ("transport", lambda: transport.run(out, work / "transport")),
        ("sim_camera", lambda: sim_camera.run(out, work / "sim_camera")),
        ("plot", lambda: plot.plot_control_loop(out / "control_loop.json")),
        ("policy", lambda: policy_latency(out, steps=300)),
        ("policy_node", lambda: policy_node.run(out, work / "policy_node")),
        ("trainer", lambda: trainer.run(out, work / "trainer", quick=False)),
        ("arm_backends", lambda: arm_backends.run(out)),
        ("takeover", lambda: takeover.run(out, work / "takeover")),
    ]


def policy_latency(out: Path, steps: int) -> object:
    """policy.json: observation-to-action latency of the compact VLA, torch vs onnxruntime, 1 and 2 cameras."""
    from irevla_ros.vla import latency

    out.mkdir(parents=True, exist_ok=True)
    return latency.main(["--steps", str(steps), "--json", str(out / "policy.json")])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=None, help="where the JSON results go (bench/results; --quick: scratch)"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="scratch: logs and stores (runs/bench-<time>)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds per benchmark: checks, not numbers")
    parser.add_argument(
        "--only", nargs="*", default=None, help="run only these (control_loop, transport, ...)"
    )
    args = parser.parse_args(argv)
    work = args.work or Path("runs") / time.strftime("bench-%Y%m%d-%H%M%S")
    # Quick numbers are not results: they never overwrite the committed ones unless asked to.
    out = args.out or (work / "results" if args.quick else RESULTS_DIR)
    failed: list[str] = []
    started = time.monotonic()
    for name, step in benchmarks(out, work, args.quick):
        if args.only is not None and name not in args.only:
            continue
        t0 = time.monotonic()
        log(f"=== {name} ===")
        try:
            step()
        except Exception:
            traceback.print_exc()
            failed.append(name)
        log(f"=== {name}: {'FAILED' if name in failed else 'done'} in {time.monotonic() - t0:.0f} s ===")
    log(f"all benchmarks: {time.monotonic() - started:.0f} s; results in {out}, scratch in {work}")
    if failed:
        log(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
