"""Benchmark `policy_node.json`: the policy node running the compact VLA, measured through the real node
process and real DDS: its resident memory, the time from a version's announcement to the first step record that
version produced (full versions and heads-only Stage 1 pushes), and the ticks missed around each swap.

The node runs alone (wall-clock ticks at 10 Hz, no simulator): a peer node in this process is the cell around it
(camera frames at 20 Hz at the policy's resolution, arm pose and gripper) and the trainer (episode START,
`/trainer/policy_version` announcements). The versions are untrained (pretrained MiniLM + EfficientNet-Lite0,
new layers and heads at their initialisation): memory and swap times do not depend on training.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from irevla_ros import topics
from irevla_ros.bench.harness import RESULTS_DIR, BenchError, log, summary, write_result
from irevla_ros.bringup.domains import leased_domain
from irevla_ros.dds_profile import use_default_profile

MEASURES = {
    "rss_mb": (
        "resident set size (VmRSS, /proc/<pid>/status) of the policy node process, sampled every 0.25 s: "
        "`idle_before_episode` after the first version is loaded, `running` during the episode before the "
        "first swap, `after_swaps` at the end; `peak_mb` is VmHWM (the process's high-water mark). The "
        "validator child process of a full version is not included (it exits after validating)"
    ),
    "announce_to_swap_s": (
        "wall time from just before the PolicyVersion was published on /trainer/policy_version to the "
        "reception (callback time in this process) of the first /policy/step_records message naming the "
        "new version: validation, loading, warm-up, and the wait for the next tick"
    ),
    "save_s": (
        "ModelStore.save (full version, ONNX export and check included) / ModelStore.save_heads (heads-only) "
        "wall time in the benchmark process; `bytes` the version folder's files"
    ),
    "missed_ticks": (
        "per swap: the policy node's own missed_ticks counter (/policy/status) 2 s after the swap minus its "
        "value at the announcement, and `gaps_over_150ms`: consecutive step records of the window (from the "
        "announcement to 2 s after the swap) whose header stamps are more than 1.5 periods apart"
    ),
}


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in kB of process `pid`."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def make_versions(
    models: Path, heads_pushes: int = 3, config: object | None = None, full_swap: bool = True
) -> dict:
    """An untrained VLA (`config`, default: compact, one camera) saved as v1 (full); a heads-only push on v1;
    v2 (full: another token learner; left out unless `full_swap`); `heads_pushes` heads-only pushes on the
    newest, each on the previous one. Returns the ids in announcement order and the save timings."""
    import torch

    from irevla_ros.train.stage0 import CPU_LORA_TARGETS
    from irevla_ros.vla.config import VLAConfig
    from irevla_ros.vla.model import HEAD_GROUPS, VLAModel
    from irevla_ros.vla.model_store import ModelStore

    torch.manual_seed(0)
    store = ModelStore(models)
    model = VLAModel(config or VLAConfig(cameras=("camera",), lora_targets=CPU_LORA_TARGETS))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(0)

    def nudge(m: VLAModel, prefixes: tuple[str, ...]) -> VLAModel:
        m = copy.deepcopy(m)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.startswith(prefixes):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        return m

    def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        t0 = time.monotonic()
        info = fn(*args, **kwargs)
        seconds = time.monotonic() - t0
        size = sum(info.meta["bytes"].values())
        log(f"saved {info.version_id} in {seconds:.1f} s ({size / 1e6:.2f} MB)")
        return info, {"version": info.version_id, "seconds": round(seconds, 3), "bytes": size}

    heads = HEAD_GROUPS
    saves = []
    v1, s = timed(store.save, model, parent=None, stage="stage0_sft")
    saves.append({"kind": "full", **s})
    current = nudge(model, heads)
    h1, s = timed(store.save_heads, current, v1.version_id)
    saves.append({"kind": "heads_only", **s})
    plan = [(h1.version_id, True)]
    parent = h1.version_id
    if full_swap:
        current = nudge(model, ("token_learner",))
        v2, s = timed(store.save, current, parent=h1.version_id, stage="stage2_sft")
        saves.append({"kind": "full", **s})
        plan.append((v2.version_id, False))
        parent = v2.version_id
    for _ in range(heads_pushes):
        current = nudge(current, heads)
        info, s = timed(store.save_heads, current, parent)
        saves.append({"kind": "heads_only", **s})
        plan.append((info.version_id, True))
        parent = info.version_id
    # announcement order: heads on the running v1, the full v2, heads pushes on the newest full version
    return {"initial": v1.version_id, "plan": plan, "saves": saves}


@dataclass
class _Seen:
    records: list[tuple[int, str, int, float, bool]] = field(default_factory=list)  # wall ns, version, idx...
    status: list[tuple[int, int]] = field(default_factory=list)  # wall ns, missed_ticks


class _Peer:
    """The cell and the trainer around the node, in this process (own rclpy Context on the leased domain)."""

    def __init__(self, domain: int, width: int, height: int) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from geometry_msgs.msg import PoseStamped
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from sensor_msgs.msg import Image, JointState

        from irevla_interfaces.msg import EpisodeEvent, PolicyVersion, StepRecord
        from irevla_ros import topics
        from irevla_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS, image_to_msg

        self.seen = _Seen()
        self.lock = threading.Lock()
        self.context = Context()
        use_default_profile()  # before this process's first DDS participant
        rclpy.init(context=self.context, domain_id=domain)
        self.node = node = Node("irevla_bench_policy_peer", context=self.context)
        self._PolicyVersion, self._EpisodeEvent = PolicyVersion, EpisodeEvent
        node.create_subscription(StepRecord, topics.STEP_RECORDS, self._on_record, RELIABLE_QOS)
        node.create_subscription(DiagnosticArray, topics.POLICY_STATUS, self._on_status, 10)
        image_pub = node.create_publisher(Image, topics.CAMERA_IMAGE, SENSOR_QOS)
        pose_pub = node.create_publisher(PoseStamped, topics.EE_POSE, 10)
        joint_pub = node.create_publisher(JointState, topics.GRIPPER_STATE, 10)
        self.event_pub = node.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
        self.version_pub = node.create_publisher(PolicyVersion, topics.POLICY_VERSION, LATCHED_QOS)
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (height, width, 3), dtype=np.uint8) for _ in range(8)]
        counter = iter(range(1 << 62))

        def publish_sensors() -> None:
            stamp = node.get_clock().now().to_msg()
            image_pub.publish(image_to_msg(frames[next(counter) % len(frames)], stamp, "camera"))
            pose = PoseStamped()
            pose.header.stamp = stamp
            pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = 0.0, 0.6, 0.2
            pose_pub.publish(pose)
            joint_pub.publish(JointState(name=["gripper_opening"], position=[1.0]))

        node.create_timer(0.05, publish_sensors)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(node)
        self._thread = threading.Thread(target=self._spin, name="bench-policy-peer", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self._executor.spin_once(timeout_sec=0.1)
            except Exception:  # the context was shut down under us at the end of the run
                return

    def _on_record(self, msg: object) -> None:
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9  # type: ignore[attr-defined]
        entry = (time.time_ns(), str(msg.policy_version), int(msg.step_index), stamp, bool(msg.hold))  # type: ignore[attr-defined]
        with self.lock:
            self.seen.records.append(entry)

    def _on_status(self, msg: object) -> None:
        values = {kv.key: kv.value for st in msg.status for kv in st.values}  # type: ignore[attr-defined]
        if "missed_ticks" in values:
            with self.lock:
                self.seen.status.append((time.time_ns(), int(values["missed_ticks"])))

    def records(self) -> list[tuple[int, str, int, float, bool]]:
        with self.lock:
            return list(self.seen.records)

    def missed_ticks(self) -> int | None:
        with self.lock:
            return self.seen.status[-1][1] if self.seen.status else None

    def start_episode(self) -> None:
        self.event_pub.publish(
            self._EpisodeEvent(
                type=self._EpisodeEvent.START, episode_id="bench-policy", instruction="press the button"
            )
        )

    def announce(self, version: str, heads_only: bool) -> int:
        now = time.time_ns()
        stage = "stage1_rl" if heads_only else "stage2_sft"
        self.version_pub.publish(self._PolicyVersion(version_id=version, stage=stage, heads_only=heads_only))
        return now

    def close(self) -> None:
        self.context.try_shutdown()
        self._thread.join(timeout=3.0)


def _wait(
    predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log_path: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"policy node exited with {proc.returncode}; see {log_path}")
        if predicate():
            return
        time.sleep(0.02)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}; see {log_path}")


def measure(
    work_dir: Path,
    heads_pushes: int = 3,
    settle_s: float = 2.0,
    config: object | None = None,
    warmup_actions: int = 30,
    full_swap: bool = True,
) -> dict:
    """`settle_s`: wall seconds watched before the episode, after each swap and at the end;
    `warmup_actions`: actions of the first version before the first announcement."""
    work_dir.mkdir(parents=True, exist_ok=True)
    models = work_dir / "models"
    shutil.rmtree(models, ignore_errors=True)
    versions = make_versions(models, heads_pushes=heads_pushes, config=config, full_swap=full_swap)
    log_path = work_dir / "policy_node.log"
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    with leased_domain() as domain:
        env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
        cmd = [
            shutil.which("policy_node") or "policy_node",
            "--ros-args",
            "-p",
            "policy:=vla",
            "-p",
            f"model_store:={models.resolve()}",
            "-p",
            f"version:={versions['initial']}",
        ]
        peer = _Peer(domain, 128, 128)
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        rss: dict[str, list[int]] = {"idle_before_episode": [], "running": [], "after_swaps": []}
        phase = {"name": "idle_before_episode"}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                try:
                    kb, _ = _rss_kb(proc.pid)
                except OSError:
                    return
                rss[phase["name"]].append(kb)

        try:
            t0 = time.monotonic()
            _wait(
                lambda: peer.node.count_subscribers(topics.EPISODE_EVENTS) > 0,
                180,
                "the policy node",
                proc,
                log_path,
            )
            log(f"policy node up in {time.monotonic() - t0:.1f} s (pid {proc.pid})")
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            time.sleep(settle_s)
            phase["name"] = "running"
            peer.start_episode()
            _wait(
                lambda: sum(not r[4] for r in peer.records()) >= warmup_actions,
                60,
                f"{warmup_actions} actions",
                proc,
                log_path,
            )
            swaps = []
            for version, heads_only in versions["plan"]:
                before = peer.missed_ticks() or 0
                announced = peer.announce(version, heads_only)
                _wait(
                    lambda v=version: any(r[1] == v for r in peer.records()),
                    240,
                    f"a step record of {version}",
                    proc,
                    log_path,
                )
                first = next(r for r in peer.records() if r[1] == version)
                time.sleep(settle_s)  # the ticks after the swap count too
                window = [r for r in peer.records() if r[0] >= announced]
                gaps = [b[3] - a[3] for a, b in pairwise(window)]
                entry = {
                    "version": version,
                    "heads_only": heads_only,
                    "announce_to_swap_s": round((first[0] - announced) * 1e-9, 4),
                    "swap_step_index": first[2],
                    "missed_ticks": (peer.missed_ticks() or 0) - before,
                    "gaps_over_150ms": sum(1 for gap in gaps if gap > 0.15),
                    "largest_gap_ms": round(max(gaps) * 1e3, 1) if gaps else None,
                    "holds_in_window": sum(1 for r in window if r[4]),
                }
                log(f"{version} ({'heads-only' if heads_only else 'full'}): {entry}")
                swaps.append(entry)
            phase["name"] = "after_swaps"
            time.sleep(settle_s)
            _, peak_kb = _rss_kb(proc.pid)
            records = peer.records()
        finally:
            stop.set()
            if proc.poll() is None:
                proc.send_signal(2)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            peer.close()
    stamps = [r[3] for r in records]
    all_gaps = [b - a for a, b in pairwise(stamps)]
    full = [s["announce_to_swap_s"] for s in swaps if not s["heads_only"]]
    heads = [s["announce_to_swap_s"] for s in swaps if s["heads_only"]]
    return {
        "rss_mb": {k: summary([x / 1024 for x in v], 1) for k, v in rss.items()},
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "announce_to_swap_s": {"full": summary(full), "heads_only": summary(heads)},
        "missed_ticks_during_swaps": sum(s["missed_ticks"] for s in swaps),
        "goal_missed_ticks_0_met": all(s["missed_ticks"] == 0 for s in swaps),
        "step_records": len(records),
        "step_indices_consecutive": [r[2] for r in records] == list(range(len(records))),
        "tick_period_ms": summary([g * 1e3 for g in all_gaps]),
        "swaps": swaps,
        "saves": versions["saves"],
        "log": str(log_path),
    }


def run(
    out_dir: Path = RESULTS_DIR,
    work_dir: Path = Path("runs") / "bench" / "policy_node",
    heads_pushes: int = 3,
    settle_s: float = 2.0,
    config: object | None = None,
    warmup_actions: int = 30,
    full_swap: bool = True,
) -> Path:
    """`config`: the VLA to build (default compact; tests pass a tiny one)."""
    body = measure(work_dir, heads_pushes, settle_s, config, warmup_actions, full_swap)
    parameters = {
        "node": "policy_node (its own process), policy vla, one camera 128x128, control_period 0.1 s (wall "
        "clock), onnxruntime 2 threads",
        "backbone": "compact (MiniLM + EfficientNet-Lite0)" if config is None else str(config.backbone),  # type: ignore[attr-defined]
        "versions": "v1 full; heads-only on v1; v2 full; heads-only pushes on v2, each on the previous",
        "heads_pushes": heads_pushes,
        "peer": "this process: camera frames, pose and gripper at 20 Hz; START; announcements",
    }
    log(
        f"policy node: RSS running p50 {body['rss_mb']['running']['p50']} MB (peak {body['peak_rss_mb']} MB); "
        f"announce->swap full {body['announce_to_swap_s']['full']['p50']} s, heads-only "
        f"{body['announce_to_swap_s']['heads_only']['p50']} s; missed ticks {body['missed_ticks_during_swaps']}"
    )
    return write_result(
        out_dir / "policy_node.json", "policy_node", parameters, {"measures": MEASURES, **body}
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--work", type=Path, default=Path("runs") / "bench" / "policy_node")
    parser.add_argument("--heads-pushes", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.out, args.work, args.heads_pushes)


if __name__ == "__main__":
    main()
