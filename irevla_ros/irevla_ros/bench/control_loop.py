"""Benchmark `control_loop.json`: control tick timing and camera-frame-to-action latency of the sim graph.

One entry per real-time factor of the sim cell with the scripted expert: 1.0 (simulated time no faster than
wall time, so wall-clock periods mean what they mean on a robot) and 0.0 (as fast as the graph keeps up: how
many simulated control seconds one wall second buys). Then the same graph with the compact VLA as the policy
(ONNX Runtime in the policy node) at rtf 1.0: camera frame to arm command with the model in the loop, goal
p99 <= 40 ms at 10 Hz. The VLA version is untrained (pretrained MiniLM + EfficientNet-Lite0, new layers at
their initialisation), built and saved at the start: latency does not depend on training.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

from irevla_ros.bench.harness import RESULTS_DIR, log, sim_graph, summary, write_result
from irevla_ros.bench.observer import Observations

MS = 1e-6  # ns -> ms

MEASURES = {
    "clock_for_arrivals": (
        "every arrival time is the DDS reception timestamp of the benchmark's observer node (rmw "
        "MessageInfo.received_timestamp, CLOCK_REALTIME) in the benchmark process, on the graph's ROS "
        "domain; `*_callback` variants use the observer's callback wall time instead"
    ),
    "window": (
        "statistics cover a wall window that opens at the first /policy/action received (rtf 0), or once the "
        "simulated clock has caught up with wall time plus 2 s (rtf > 0: the cell pays back the start-up "
        "periods it waited for the graph by running unpaced), and lasts the configured seconds"
    ),
    "period_ms": (
        "wall time between the arrivals of consecutive /policy/action messages (irevla_interfaces/"
        "ArmCommand) of the same episode with consecutive step_index; gaps between episodes excluded"
    ),
    "jitter_ms": (
        "|period - nominal| where nominal = control_period / real_time_factor (0.1 s at rtf 1); at rtf 0 "
        "(no wall-clock pacing) nominal is the median period of the run"
    ),
    "stalls": (
        "stalls_over_1s / periods_over_250ms: periods longer than that; stalled_time_fraction: their total "
        "duration over the window length"
    ),
    "missed_ticks": (
        "policy node's cumulative `missed_ticks` from /policy/status (DiagnosticArray): ticks the policy's "
        "timer skipped on the simulated clock; `missed_ticks_in_window` subtracts the value reported before "
        "the window opened"
    ),
    "latency_frame_to_record_ms": (
        "for each step record (/policy/step_records, non-hold) and each of its image_stamps: arrival of the "
        "step record minus arrival of the camera image (/camera/camera/color/image_raw, sensor-data QoS) "
        "with the same header stamp; frames the observer did not receive are counted in `unmatched`"
    ),
    "latency_frame_to_action_ms": (
        "the same, to the arrival of the /policy/action with the record's episode_id and step_index (the "
        "policy publishes the action just before the record)"
    ),
    "latency_publish_to_publish_ms": (
        "step record's DDS source (write) timestamp minus the image's source timestamp: the graph's internal "
        "latency, without the observer's reception"
    ),
    "frame_age_sim_ms": (
        "simulated time between the frame the policy acted on and the tick (record header stamp minus image "
        "stamp): 0 = the frame rendered for this very period, 100 = the previous period's frame"
    ),
    "speed": (
        "control_steps_per_wall_s: actions received per wall second; simulated_control_s_per_wall_s: that "
        "times control_period (simulated seconds of control per wall second); clock_s_per_wall_s: /clock "
        "advance per wall second, including resets and the gaps between episodes"
    ),
}


def analyse(seen: Observations, start_ns: int, end_ns: int, control_period: float, rtf: float) -> dict:
    """Statistics of one run over the wall window [start_ns, end_ns]."""
    window_s = (end_ns - start_ns) * 1e-9
    actions = sorted(
        (a for a in seen.actions if start_ns <= a.arrival.wall_ns <= end_ns), key=lambda a: a.arrival.wall_ns
    )
    consecutive = [
        (a, b)
        for a, b in pairwise(actions)
        if a.episode_id == b.episode_id and b.step_index == a.step_index + 1
    ]
    periods = [(b.arrival.wall_ns - a.arrival.wall_ns) * MS for a, b in consecutive]
    periods_cb = [(b.arrival.callback_ns - a.arrival.callback_ns) * MS for a, b in consecutive]
    nominal_ms = (control_period / rtf * 1e3) if rtf > 0 else (summary(periods)["p50"] or 0.0)
    jitter = [abs(p - nominal_ms) for p in periods]
    jitter_cb = [abs(p - nominal_ms) for p in periods_cb]

    images: dict[tuple[str, int], object] = {}  # (camera name, stamp) -> first arrival
    for topic, arrivals in seen.images.items():
        camera = topic.strip("/").split("/")[0]  # the policy's camera name of an image topic
        for arrival, stamp in arrivals:
            images.setdefault((camera, stamp), arrival)
    action_at = {(a.episode_id, a.step_index): a.arrival for a in seen.actions}
    to_record, to_record_cb, to_action, pub_to_pub, age = [], [], [], [], []
    unmatched = 0
    records = [r for r in seen.records if start_ns <= r.arrival.wall_ns <= end_ns]
    for record in records:
        if record.hold:
            continue
        for camera, stamp in zip(record.camera_names, record.image_stamps_ns, strict=False):
            image = images.get((camera, stamp))
            age.append((record.stamp_ns - stamp) * MS)
            if image is None:
                unmatched += 1
                continue
            to_record.append((record.arrival.wall_ns - image.wall_ns) * MS)  # type: ignore[attr-defined]
            to_record_cb.append((record.arrival.callback_ns - image.callback_ns) * MS)  # type: ignore[attr-defined]
            if record.arrival.source_ns and image.source_ns:  # type: ignore[attr-defined]
                pub_to_pub.append((record.arrival.source_ns - image.source_ns) * MS)  # type: ignore[attr-defined]
            action = action_at.get((record.episode_id, record.step_index))
            if action is not None:
                to_action.append((action.wall_ns - image.wall_ns) * MS)  # type: ignore[attr-defined]

    clock = [(a.wall_ns, c) for a, c in seen.clock if start_ns <= a.wall_ns <= end_ns]
    clock_rate = (
        (clock[-1][1] - clock[0][1]) / (clock[-1][0] - clock[0][0])
        if len(clock) > 1 and clock[-1][0] > clock[0][0]
        else None
    )
    before = [s.missed_ticks for s in seen.status if s.wall_ns < start_ns]
    final = seen.status[-1] if seen.status else None
    steps_per_s = len(actions) / window_s if window_s > 0 else 0.0
    episodes = {a.episode_id for a in actions}
    return {
        "real_time_factor": rtf,
        "window_s": round(window_s, 2),
        "actions_received": len(actions),
        "holds_received": sum(1 for a in actions if a.hold),
        "episodes_seen": len(episodes),
        "period_ms": summary(periods),
        "jitter_ms": summary(jitter),
        "jitter_nominal_ms": round(nominal_ms, 3),
        "stalls_over_1s": sum(1 for p in periods if p > 1000.0),
        "periods_over_250ms": sum(1 for p in periods if p > 250.0),
        "stalled_time_fraction": round(sum(p for p in periods if p > 250.0) / 1000.0 / window_s, 4)
        if window_s > 0
        else None,
        "period_ms_callback": summary(periods_cb),
        "jitter_ms_callback": summary(jitter_cb),
        "missed_ticks": final.missed_ticks if final else None,
        "missed_ticks_in_window": (final.missed_ticks - (before[-1] if before else 0)) if final else None,
        "policy_holds": final.holds if final else None,
        "latency_frame_to_record_ms": summary(to_record),
        "latency_frame_to_record_ms_callback": summary(to_record_cb),
        "latency_frame_to_action_ms": summary(to_action),
        "latency_publish_to_publish_ms": summary(pub_to_pub),
        "latency_unmatched_frames": unmatched,
        "frame_age_sim_ms": summary(age),
        "frame_age_zero_fraction": round(sum(1 for x in age if abs(x) < 1e-3) / len(age), 4) if age else None,
        "control_steps_per_wall_s": round(steps_per_s, 3),
        "simulated_control_s_per_wall_s": round(steps_per_s * control_period, 4),
        "clock_s_per_wall_s": round(clock_rate, 4) if clock_rate is not None else None,
        "samples": {
            "period_ms": [round(p, 3) for p in periods],
            "latency_frame_to_record_ms": [round(x, 3) for x in to_record],
        },
    }


def headline(entry: dict) -> str:
    """One line of the numbers that matter in an entry."""

    def p(key: str) -> str:
        return f"{entry[key]['p50']}/{entry[key]['p99']}"

    return (
        f"{entry['actions_received']} actions; period p50/p99 {p('period_ms')} ms; "
        f"jitter {p('jitter_ms')} ms; "
        f"frame->record latency {p('latency_frame_to_record_ms')} ms; "
        f"{entry['simulated_control_s_per_wall_s']} sim s/wall s; "
        f"missed ticks {entry['missed_ticks_in_window']}; stalls > 1 s {entry['stalls_over_1s']}"
    )


def clock_debt_s(seen: Observations, rtf: float) -> float | None:
    """Wall seconds the simulated clock lags real time (scaled by `rtf`) since the observer's first /clock.

    The cell paces against its start: periods it spent waiting for a late graph (start-up) are owed, and it
    runs unpaced until they are paid. A wall-clock measurement at rtf > 0 only means something after that.
    """
    if len(seen.clock) < 2:
        return None
    (first, clock0), clock1 = seen.clock[0], seen.clock[-1][1]
    return (time.time_ns() - first.wall_ns) * 1e-9 - (clock1 - clock0) * 1e-9 / rtf


VLA_GOAL_P99_MS = 40.0


def vla_overrides(models: Path) -> list[str]:
    """Graph settings that make the policy node run a fresh untrained compact VLA version saved in `models`."""
    from irevla_ros.train.stage0 import CPU_LORA_TARGETS
    from irevla_ros.vla.config import VLAConfig
    from irevla_ros.vla.model import VLAModel
    from irevla_ros.vla.model_store import ModelStore

    t0 = time.monotonic()
    shutil.rmtree(models, ignore_errors=True)  # a fresh store each run: the version is always v0001
    model = VLAModel(VLAConfig(cameras=("camera",), lora_targets=CPU_LORA_TARGETS))
    info = ModelStore(models).save(model, parent=None, stage="stage0_sft", data={"untrained": True})
    log(f"VLA version {info.version_id} saved in {time.monotonic() - t0:.0f} s")
    return [
        # the trainer only stores episodes here: no Stage 1 pushes into the policy during a latency run
        "/trainer.iterate=false",
        "/policy.policy=vla",
        f"/policy.model_store={models.resolve()}",
        f"/policy.version={info.version_id}",
    ]


def measure(
    work_dir: Path,
    rtf: float,
    seconds: float,
    startup_timeout: float = 120.0,
    settle_margin: float = 2.0,
    policy_overrides: Sequence[str] = (),
) -> dict:
    """Run the sim graph at real-time factor `rtf` for `seconds` wall seconds, from its first action (rtf 0)
    or from when the simulated clock has caught up with wall time (rtf > 0)."""
    overrides = [f"/sim_cell.real_time_factor={rtf}", "/episode_manager.num_episodes=0", *policy_overrides]
    with sim_graph(work_dir, overrides) as graph:
        params = graph.runner.effective_parameters  # type: ignore[attr-defined]
        control_period = float(params.get("/sim_cell", {}).get("control_period", 0.1))
        first = graph.wait_for(
            lambda: graph.observer.count("actions") > 0, startup_timeout, "the first action"
        )
        log(f"rtf {rtf}: first action {(first - graph.started_wall_ns) * 1e-9:.1f} s after start")
        start = first
        if rtf > 0:

            def caught_up() -> bool:
                debt = clock_debt_s(graph.observer.snapshot(), rtf)
                return debt is not None and debt < 0.2

            graph.wait_for(caught_up, startup_timeout, "the simulated clock to catch up with wall time")
            start = graph.run_for(settle_margin)
            log(f"rtf {rtf}: clock caught up {(start - first) * 1e-9:.1f} s after the first action")
        log(f"rtf {rtf}: measuring {seconds:.0f} s")
        end = graph.run_for(
            seconds, progress=lambda: f"rtf {rtf}: {graph.observer.count('actions')} actions received"
        )
        seen = graph.observer.snapshot()
    result = analyse(seen, start, end, control_period, rtf)
    result["control_period_s"] = control_period
    result["warmup_after_first_action_s"] = round((start - first) * 1e-9, 2)
    log(f"rtf {rtf}: {headline(result)}")
    return result


def run(
    out_dir: Path = RESULTS_DIR,
    work_dir: Path = Path("runs") / "bench" / "control_loop",
    real_time_seconds: float = 75.0,
    fast_seconds: float = 40.0,
    real_time_factors: Sequence[float] = (1.0, 0.0),
    vla_seconds: float = 0.0,
) -> Path:
    """`vla_seconds`: wall seconds of the VLA entry at rtf 1 (0: no VLA entry; make bench runs 75)."""
    entries = []
    for rtf in real_time_factors:
        seconds = real_time_seconds if rtf > 0 else fast_seconds
        entries.append({"policy": "scripted_expert", **measure(work_dir / f"rtf{rtf:g}", rtf, seconds)})
    vla: dict[str, object] | None = None
    if vla_seconds > 0:
        overrides = vla_overrides(work_dir / "vla" / "models")
        # the first VLA inferences and the validator child make start-up slower than the expert's
        entry = measure(work_dir / "vla", 1.0, vla_seconds, startup_timeout=300.0, policy_overrides=overrides)
        entries.append({"policy": "vla", **entry})
        p99 = entry["latency_frame_to_action_ms"]["p99"]  # type: ignore[index]
        vla = {
            "latency_frame_to_action_ms_p99": p99,
            "goal_p99_ms": VLA_GOAL_P99_MS,
            "goal_met": p99 is not None and p99 <= VLA_GOAL_P99_MS,
        }
        log(f"VLA: frame -> arm command p99 {p99} ms (goal <= {VLA_GOAL_P99_MS} ms)")
    parameters = {
        "graph": "collect (sim profile), one camera (corner, 128x128); entries with policy scripted_expert "
        "(action_noise 0.1) and vla (compact, untrained, onnxruntime 2 threads)",
        "real_time_factors": list(real_time_factors),
        "seconds_at_real_time": real_time_seconds,
        "seconds_as_fast_as_possible": fast_seconds,
        "vla_seconds_at_real_time": vla_seconds,
        "overrides": [
            "/sim_cell.real_time_factor=<rtf>",
            "/episode_manager.num_episodes=0",
            "vla entry: /policy.policy=vla /policy.model_store=<run> /policy.version=<untrained v0001>",
        ],
    }
    body: dict[str, object] = {"measures": MEASURES, "entries": entries}
    if vla is not None:
        body["vla_frame_to_action"] = vla
    return write_result(out_dir / "control_loop.json", "control_loop", parameters, body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--seconds", type=float, default=75.0, help="wall seconds measured at rtf 1")
    parser.add_argument("--fast-seconds", type=float, default=40.0, help="wall seconds measured at rtf 0")
    parser.add_argument(
        "--vla-seconds", type=float, default=75.0, help="wall seconds with the VLA at rtf 1 (0: skip)"
    )
    parser.add_argument(
        "--rtf", type=float, nargs="*", default=[1.0, 0.0], help="real-time factors of the expert entries"
    )
    args = parser.parse_args(argv)
    run(
        args.out,
        real_time_seconds=args.seconds,
        fast_seconds=args.fast_seconds,
        real_time_factors=args.rtf,
        vla_seconds=args.vla_seconds,
    )


if __name__ == "__main__":
    main()
