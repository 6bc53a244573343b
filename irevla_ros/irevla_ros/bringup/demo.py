"""`irevla demo`: an operator-supervised session in the simulated cell, through the real node graph.

Starts the `collect` graph (sim profile) as child processes, follows it from a small monitor node (progress on
stderr), stops it after N stored episodes, and prints one JSON summary line on stdout:
episodes, successes, steps, missed_ticks, lost_steps, store.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from irevla_ros.bringup.graph import DEFAULT_CAMERAS, collect_graph
from irevla_ros.bringup.launcher import GraphRunner


@dataclass
class SessionMonitor:
    """What the demo (and the end-to-end tests) learn from the graph's topics."""

    stored: dict[str, tuple[bool, int, int]] = field(default_factory=dict)  # id -> complete, steps, outcome
    steps_emitted: dict[str, int] = field(default_factory=dict)  # from STEPS_DONE
    missed_ticks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_monitor(
    monitor: SessionMonitor, on_stored: object = None
) -> tuple[object, object, threading.Thread]:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from irevla_interfaces.msg import EpisodeEvent, EpisodeStored
    from irevla_ros import topics
    from irevla_ros.nodes.common import RELIABLE_QOS

    context = Context()
    rclpy.init(context=context)
    node = Node("irevla_demo_monitor", context=context)

    def stored(msg: EpisodeStored) -> None:
        with monitor.lock:
            monitor.stored[msg.episode_id] = (bool(msg.complete), int(msg.num_steps), int(msg.outcome))
        if callable(on_stored):
            on_stored(msg)

    def event(msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.STEPS_DONE:
            with monitor.lock:
                monitor.steps_emitted[msg.episode_id] = int(msg.num_steps)

    def status(msg: DiagnosticArray) -> None:
        for st in msg.status:
            for kv in st.values:
                if kv.key == "missed_ticks":
                    monitor.missed_ticks = int(kv.value)

    node.create_subscription(EpisodeStored, topics.EPISODE_STORED, stored, RELIABLE_QOS)
    node.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, event, RELIABLE_QOS)
    node.create_subscription(DiagnosticArray, topics.POLICY_STATUS, status, 10)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)

    def spin() -> None:
        while context.ok():
            try:
                executor.spin_once(timeout_sec=0.1)
            except Exception:  # context shut down under us at the end of the run
                return

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    return context, node, thread


def run_demo(
    episodes: int = 5,
    store: Path | None = None,
    noise: float = 0.1,
    timeout: float = 1200.0,
    overrides: Sequence[str] = (),
    cameras: Sequence[str] = DEFAULT_CAMERAS,
) -> dict[str, object]:
    run_dir = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    store = (store or run_dir / "store").resolve()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    settings = [
        f"/episode_manager.num_episodes={episodes}",
        f"/trainer.store_path={store}",
        f"/policy.action_noise={noise}",
        *overrides,
    ]
    monitor = SessionMonitor()
    started = time.monotonic()

    def progress(msg: object) -> None:
        outcome = {0: "unknown", 1: "success", 2: "failure", 3: "timeout", 4: "aborted"}.get(msg.outcome, "?")  # type: ignore[attr-defined]
        print(
            f"[demo] {len(monitor.stored)}/{episodes} episodes stored: {msg.episode_id} {outcome}, "  # type: ignore[attr-defined]
            f"{msg.num_steps} steps ({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )  # type: ignore[attr-defined]

    context, _node, thread = start_monitor(monitor, progress)
    print(
        f"[demo] {episodes} episodes of the scripted expert (noise {noise}) in the simulated cell; "
        f"store {store}; logs {run_dir / 'logs'}",
        file=sys.stderr,
        flush=True,
    )
    runner = GraphRunner(collect_graph("sim", cameras), settings, log_dir=run_dir / "logs")
    failed = None
    try:
        runner.start()
        while time.monotonic() - started < timeout:
            failed = runner.poll()
            if failed is not None or len(monitor.stored) >= episodes:
                break
            time.sleep(0.2)
    finally:
        codes = runner.stop()
        context.try_shutdown()  # type: ignore[attr-defined]
        thread.join(timeout=2.0)
    if failed is not None:
        raise RuntimeError(
            f"{failed.executable} exited with {failed.popen.returncode}; see {run_dir / 'logs'}"
        )
    return summarise(store, monitor, codes)


def summarise(
    store_path: Path, monitor: SessionMonitor, codes: dict[str, int] | None = None
) -> dict[str, object]:
    from irevla_ros.store.episode_store import EpisodeStore

    with EpisodeStore(store_path, read_only=True) as store:
        rows = {row.episode_id: row for row in store.list()}
    ours = [rows[e] for e in monitor.stored if e in rows]
    emitted = sum(monitor.steps_emitted.get(r.episode_id, r.num_steps) for r in ours)
    return {
        "episodes": len(ours),
        "successes": sum(1 for r in ours if r.outcome == "success"),
        "steps": sum(r.num_steps for r in ours),
        "missed_ticks": monitor.missed_ticks,
        "lost_steps": emitted - sum(r.num_steps for r in ours),
        "incomplete": sum(1 for r in ours if not r.complete),
        "store": str(store_path),
        "exit_codes": codes or {},
    }
