"""Benchmark `takeover.json`: takeover latency, a /joy button press to the first teleop command at the arm
controller (/policy/action, the command the arm controller executes), through the real teleop and policy node
processes and real DDS.

The policy node runs the random policy on wall-clock ticks at 10 Hz; teleop_node maps /joy (joy_topic mode, as
behind joy_node); the peer of bench.policy_node is the cell around them (frames, pose, gripper, START). Each trial
presses the deadman (which also takes over) at a random phase of the control period, keeps publishing /joy at
20 Hz (joy_node's autorepeat) with a distinctive stick deflection, and measures the wall time from the press to
the arrival of the first /policy/action carrying that deflection, and the ticks: that action's step index minus
the index of the newest action seen before the press. Then it releases and waits for the hand-back.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from irevla_ros import topics
from irevla_ros.bench.harness import RESULTS_DIR, BenchError, log, summary, write_result
from irevla_ros.bench.policy_node import _Peer, _wait
from irevla_ros.bringup.domains import leased_domain
from irevla_ros.teleop.mapping import TeleopMapping, command_to_joy

MEASURES = {
    "press_to_arm_ms": (
        "wall ms from just before the /joy with the deadman pressed was published to the arrival, at a "
        "subscriber of /policy/action (what the arm controller executes), of the first command carrying the "
        "teleop deflection"
    ),
    "press_to_arm_ticks": (
        "step index of that command minus the step index of the newest /policy/action seen before the press "
        "(1: the next tick acted with teleop)"
    ),
}
DEFLECTION = 0.625  # exactly representable: the teleop command is recognised by its x delta


def measure(work_dir: Path, trials: int = 40, seed: int = 0) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    rng = np.random.default_rng(seed)
    mapping = TeleopMapping()
    with leased_domain() as domain:
        env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
        procs: list[tuple[subprocess.Popen, Path]] = []
        peer = _Peer(domain, 128, 128)
        from sensor_msgs.msg import Joy

        from irevla_interfaces.msg import ArmCommand

        actions: list[tuple[int, int, float]] = []  # wall ns, step index, x delta
        lock = threading.Lock()

        def on_action(msg: ArmCommand) -> None:
            with lock:
                actions.append((time.time_ns(), int(msg.step_index), float(msg.ee_delta[0])))

        peer.node.create_subscription(ArmCommand, topics.ACTION, on_action, 100)
        joy_pub = peer.node.create_publisher(Joy, topics.JOY, 10)
        for exe, args in (
            ("policy_node", ["-p", "policy:=random"]),
            ("teleop_node", []),
        ):
            log_path = work_dir / f"{exe}.log"
            with open(log_path, "wb") as out:
                cmd = [shutil.which(exe) or exe, "--ros-args", *args]
                procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env), log_path))
        policy, policy_log = procs[0]
        latencies_ms: list[float] = []
        ticks: list[int] = []

        def press(held: bool) -> None:
            axes, buttons = command_to_joy(mapping, [DEFLECTION, 0.0, 0.0], -1.0, enabled=held)
            joy = Joy(axes=axes, buttons=buttons)
            joy.header.stamp = peer.node.get_clock().now().to_msg()
            joy_pub.publish(joy)

        try:
            _wait(
                lambda: peer.node.count_subscribers(topics.EPISODE_EVENTS) > 0,
                180,
                "the policy node",
                *procs[0],
            )
            _wait(lambda: peer.node.count_subscribers(topics.JOY) > 0, 180, "the teleop node", *procs[1])
            time.sleep(1.0)
            peer.start_episode()
            _wait(lambda: len(actions) >= 10, 60, "policy actions", policy, policy_log)
            for _ in range(trials):
                for _ in range(10):  # released, at joy_node's autorepeat rate
                    press(False)
                    time.sleep(0.05)
                time.sleep(float(rng.uniform(0.0, 0.1)))  # a random phase of the control period
                with lock:
                    before = actions[-1][1]
                    start_len = len(actions)
                pressed_ns = time.time_ns()
                press(True)
                hit: tuple[int, int, float] | None = None
                deadline = time.monotonic() + 5.0
                while hit is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                    if time.time_ns() - pressed_ns > 50_000_000:  # joy_node's autorepeat
                        press(True)
                    with lock:
                        hit = next((a for a in actions[start_len:] if a[2] == DEFLECTION), None)
                if hit is None:
                    raise BenchError(f"no teleop command reached /policy/action within 5 s; see {policy_log}")
                latencies_ms.append((hit[0] - pressed_ns) / 1e6)
                ticks.append(hit[1] - before)
        finally:
            for proc, _ in procs:
                proc.send_signal(2)
            for proc, _ in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
            peer.close()
    return {
        "press_to_arm_ms": summary(latencies_ms),
        "press_to_arm_ticks": summary([float(t) for t in ticks]),
        "ticks_histogram": {str(k): ticks.count(k) for k in sorted(set(ticks))},
    }


def run(
    out_dir: Path = RESULTS_DIR, work_dir: Path = Path("runs") / "bench" / "takeover", trials: int = 40
) -> Path:
    body = measure(work_dir, trials)
    parameters = {
        "nodes": "policy_node (random policy, control_period 0.1 s wall clock) and teleop_node (joy_topic), "
        "each its own process",
        "trials": trials,
        "press": "deadman (= takeover) at a uniform random phase of the control period, /joy repeated at 20 Hz",
    }
    log(
        f"takeover: press -> arm p50 {body['press_to_arm_ms']['p50']} ms, p99 {body['press_to_arm_ms']['p99']} ms; "
        f"ticks {body['ticks_histogram']}"
    )
    return write_result(out_dir / "takeover.json", "takeover", parameters, {"measures": MEASURES, **body})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work", type=Path, default=Path("runs") / "bench" / "takeover")
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args(argv)
    run(args.out, args.work, args.trials)


if __name__ == "__main__":
    main()
