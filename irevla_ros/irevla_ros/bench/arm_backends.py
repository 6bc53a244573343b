"""Benchmark `arm_backends.json`: command-to-state latency and 10 Hz tracking error of each real-arm backend
against its protocol peer: FrankyArm against franky-sim (libfranka's protocol, MuJoCo FR3), UrRtdeArm
against the test suite's UR protocol peer (ur_rtde's RTDE/dashboard/script protocols, kinematic UR5e) and
ServoArm against the test suite's servo peer (a MoveIt Servo + driver stand-in over real rclpy/Fast DDS on
loopback: TwistStamped in, /joint_states + /tf at 100 Hz out, kinematic end effector).

The peers are the test suite's (irevla_ros/test/): run from a source checkout. What the numbers measure is the
backend + client library + loopback protocol + the peer's arm model, not a robot: the peer's dynamics decide
the tracking error (see the README's UR section for what the UR peer models).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from irevla_ros.bench.harness import RESULTS_DIR, log, summary, write_result
from irevla_ros.dds_profile import use_default_profile
from irevla_ros.hardware.arm import ArmBackend, make_arm
from irevla_ros.safety import SafetyLayer, SafetyLimits

TEST_DIR = Path(__file__).resolve().parents[2] / "test"
TICK = 0.1  # s: the arm controller's 10 Hz
MAX_SPEED = 0.1  # m/s: safety layer and backend alike
MOVED = 5e-4  # m: the state "reflects" a command once the arm moved this far toward it

MEASURES = {
    "latency_command_to_state_ms": (
        "from the arm at rest, one 1 cm step target through send_target; the time from the call to the first "
        "read_state (polled every 2 ms) whose end-effector position moved more than 0.5 mm toward the target"
    ),
    "tracking_error_mm": (
        "a 3 cm-radius circle at 0.06 m/s streamed at 10 Hz through the SafetyLayer (command_toward each "
        "tick); at each tick, before the next command, the distance between the measured position and the "
        "target sent at the previous tick"
    ),
    "tracking_error_settled_mm": "the same distance 1 s after the stream stopped (steady-state error)",
}


@contextmanager
def _franky_peer() -> Iterator[dict[str, object]]:
    sys.path.insert(0, str(TEST_DIR))
    from franky_sim_peer import FrankySim

    log_path = Path("runs") / "bench-arm-franky-sim.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sim = FrankySim(log_path)
    try:
        sim.wait_ready()
        yield {"host": sim.host, "dynamics_factor": 0.1, "max_speed": MAX_SPEED}
    finally:
        sim.stop()


@contextmanager
def _ur_peer() -> Iterator[dict[str, object]]:
    sys.path.insert(0, str(TEST_DIR))
    from ur_rtde_peer import PeerProcess

    with PeerProcess() as peer:
        yield {"host": peer.host, "frequency": 125.0, "max_speed": MAX_SPEED}


@contextmanager
def _servo_peer() -> Iterator[dict[str, object]]:
    import os

    import rclpy
    from rclpy.context import Context

    from irevla_ros.bringup.domains import leased_domain
    from irevla_ros.nodes.ros_servo_transport import RclpyServoTransport

    sys.path.insert(0, str(TEST_DIR))
    from servo_peer import UR_JOINTS, ServoPeer

    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    with leased_domain() as domain, ServoPeer(domain) as peer:
        context = Context()
        use_default_profile()  # before this process's first DDS participant
        rclpy.init(context=context, domain_id=domain)
        try:
            yield {
                "transport": RclpyServoTransport(context, "bench_servo_io"),
                "base_frame": peer.base_frame,
                "ee_frame": "tool0",
                "joint_names": list(UR_JOINTS),
                "max_speed": MAX_SPEED,
            }
        finally:
            context.try_shutdown()


PEERS: dict[str, tuple[str, Callable[[], object]]] = {
    "franky": ("franky-sim (libfranka protocol, MuJoCo FR3)", _franky_peer),
    "ur_rtde": ("ur_rtde_peer (RTDE v2 + dashboard + script + Robotiq, kinematic UR5e)", _ur_peer),
    "servo": (
        "servo_peer (MoveIt Servo + driver stand-in over rclpy/Fast DDS, 100 Hz, kinematic)",
        _servo_peer,
    ),
}


def _latencies(arm: ArmBackend, steps: int) -> list[float]:
    out = []
    for i in range(steps):
        start = arm.read_state().ee_position
        direction = np.array([0.0, 0.0, -1.0 if i % 2 == 0 else 1.0])
        target = start + 0.01 * direction
        t0 = time.monotonic()
        arm.send_target(target, 1.0)
        while time.monotonic() - t0 < 2.0:
            if float(np.dot(arm.read_state().ee_position - start, direction)) > MOVED:
                out.append((time.monotonic() - t0) * 1e3)
                break
            time.sleep(0.002)
        time.sleep(0.5)  # at rest again before the next step
    return out


def _tracking(arm: ArmBackend, seconds: float) -> tuple[list[float], float]:
    start = arm.read_state().ee_position
    limits = SafetyLimits(
        workspace_low=tuple(start - 0.1),
        workspace_high=tuple(start + 0.1),
        home=tuple(start),
        max_step=0.01,
        max_speed=MAX_SPEED,
        action_scale=0.01,
        watchdog_timeout=0.5,
    )
    layer = SafetyLayer(limits)
    radius, speed = 0.03, 0.06
    omega = speed / radius
    centre = start - np.array([radius, 0.0, 0.0])
    errors: list[float] = []
    previous = None
    t0 = time.monotonic()
    while (now := time.monotonic()) - t0 < seconds:
        ee = arm.read_state().ee_position
        if previous is not None:
            errors.append(float(np.linalg.norm(ee - previous)) * 1e3)
        phase = omega * (now - t0)
        wanted = centre + radius * np.array([np.cos(phase), np.sin(phase), 0.0])
        cmd = layer.command_toward(wanted, now, ee)
        if cmd.target is None:
            arm.hold()
        else:
            arm.send_target(cmd.target, 1.0)
            previous = cmd.target
        time.sleep(max(0.0, TICK - (time.monotonic() - now)))
    time.sleep(1.0)
    settled = (
        float(np.linalg.norm(arm.read_state().ee_position - previous)) * 1e3 if previous is not None else 0.0
    )
    return errors[5:], settled  # the first ticks accelerate from rest


def measure(kind: str, steps: int, seconds: float) -> dict[str, object]:
    description, peer = PEERS[kind]
    with peer() as params:  # type: ignore[attr-defined]
        arm = make_arm(kind, **params)
        arm.connect()
        try:
            latencies = _latencies(arm, steps)
            errors, settled = _tracking(arm, seconds)
        finally:
            arm.close()
    return {
        "backend": kind,
        "peer": description,
        "latency_command_to_state_ms": summary(latencies),
        "tracking_error_mm": summary(errors),
        "tracking_error_settled_mm": round(settled, 3),
    }


def run(out: Path, kinds: Sequence[str] = tuple(PEERS), steps: int = 40, seconds: float = 20.0) -> Path:
    entries = []
    for kind in kinds:
        log(f"arm_backends: {kind}")
        entries.append(measure(kind, steps, seconds))
    return write_result(
        out / "arm_backends.json",
        "arm_backends",
        {"kinds": list(kinds), "steps": steps, "seconds": seconds, "tick_s": TICK, "max_speed": MAX_SPEED},
        {"measures": MEASURES, "entries": entries},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--kinds", default=",".join(PEERS), help="comma-separated backends")
    parser.add_argument("--steps", type=int, default=40, help="latency samples per backend")
    parser.add_argument("--seconds", type=float, default=20.0, help="tracking run per backend (s)")
    args = parser.parse_args(argv)
    run(args.out, tuple(k for k in args.kinds.split(",") if k), args.steps, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
