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

from irevla_ros.bringup.domains import leased_domain
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


def run_session(
    label: str,
    episodes: int,
    store: Path,
    log_dir: Path,
    settings: Sequence[str],
    cameras: Sequence[str],
    timeout: float,
) -> dict[str, object]:
    """Bring the sim graph up, run `episodes` episodes of a supervised session, stop it, summarise from the store."""
    monitor = SessionMonitor()
    started = time.monotonic()

    from irevla_ros.nodes.event_codes import OUTCOME_NAMES

    def progress(msg: object) -> None:
        outcome = OUTCOME_NAMES.get(msg.outcome, "?")  # type: ignore[attr-defined]
        print(
            f"[demo:{label}] {len(monitor.stored)}/{episodes} episodes stored: {msg.episode_id} {outcome}, "  # type: ignore[attr-defined]
            f"{msg.num_steps} steps ({time.monotonic() - started:.0f} s)",  # type: ignore[attr-defined]
            file=sys.stderr,
            flush=True,
        )

    context, _node, thread = start_monitor(monitor, progress)
    runner = GraphRunner(
        collect_graph("sim", cameras),
        [
            f"/episode_manager.num_episodes={episodes}",
            f"/trainer.store_path={store}",
            # the session starts once this monitor listens too, so it counts every episode's steps
            "/episode_manager.required_nodes=[/policy,/trainer,/arm_controller,/irevla_demo_monitor]",
            *settings,
        ],
        log_dir=log_dir,
    )
    failed = None
    before = stored_ids(store)
    new: set[str] = set()
    try:
        runner.start()
        while time.monotonic() - started < timeout:
            failed = runner.poll()
            # the store, not the acknowledgements this monitor happened to receive, says what is done
            new = stored_ids(store) - before
            if failed is not None or len(new) >= episodes:
                break
            time.sleep(0.2)
    finally:
        codes = runner.stop()
        context.try_shutdown()  # type: ignore[attr-defined]
        thread.join(timeout=2.0)
    if failed is not None:
        raise RuntimeError(f"{failed.executable} exited with {failed.popen.returncode}; see {log_dir}")
    return summarise(store, monitor, codes, new)


def run_demo(
    episodes: int = 5,
    store: Path | None = None,
    noise: float = 0.1,
    timeout: float = 1200.0,
    overrides: Sequence[str] = (),
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    vla_episodes: int = 3,
    sft_steps: int = 150,
    models: Path | None = None,
) -> dict[str, object]:
    """The main job in simulation: an operator session of the scripted expert (demonstrations), Stage 0 of
    iRe-VLA on them (the first VLA version, in the model store), then a session run by that VLA."""
    if (
        "ROS_DOMAIN_ID" not in os.environ
    ):  # a simulation of its own: no cross-talk with another run on the host
        with leased_domain() as domain:
            os.environ["ROS_DOMAIN_ID"] = str(domain)
            try:
                return run_demo(
                    episodes, store, noise, timeout, overrides, cameras, vla_episodes, sft_steps, models
                )
            finally:
                del os.environ["ROS_DOMAIN_ID"]
    run_dir = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    store = (store or run_dir / "store").resolve()
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    print(
        f"[demo] 1/3: {episodes} episodes of the scripted expert (noise {noise}); store {store}; logs {run_dir}",
        file=sys.stderr,
        flush=True,
    )
    expert = run_session(
        "expert", episodes, store, run_dir / "logs-expert",
        [f"/policy.action_noise={noise}", "/policy.policy=scripted_expert", "/episode_manager.source=expert",
         *overrides],
        cameras, timeout,
    )  # fmt: skip
    summary: dict[str, object] = dict(expert)
    if vla_episodes <= 0:
        return summary

    from irevla_ros.train.pipeline import train_first_version

    models = (models or run_dir / "models").resolve()
    print(f"[demo] 2/3: Stage 0 (supervised) on the expert episodes -> {models}", file=sys.stderr, flush=True)
    version = train_first_version(store, models, cameras, steps=sft_steps)
    print(
        f"[demo] 3/3: {vla_episodes} episodes run by the VLA {version.version_id}",
        file=sys.stderr,
        flush=True,
    )
    vla = run_session(
        "vla", vla_episodes, store, run_dir / "logs-vla",
        ["/policy.policy=vla", f"/policy.model_store={models}", f"/policy.version={version.version_id}",
         "/episode_manager.source=policy", *overrides],
        cameras, timeout,
    )  # fmt: skip
    for key in ("episodes", "successes", "steps", "missed_ticks", "lost_steps", "incomplete"):
        summary[key] = int(expert[key]) + int(vla[key])  # type: ignore[call-overload]
    summary.update(
        version=version.version_id,
        stage0_loss=version.metrics.get("final_loss"),
        expert_success_rate=_rate(expert),
        vla_success_rate=_rate(vla),
        sessions={"expert": expert, "vla": vla},
    )
    return summary


def _rate(session: dict[str, object]) -> float:
    return round(int(session["successes"]) / max(1, int(session["episodes"])), 3)  # type: ignore[call-overload]


def stored_ids(store_path: Path) -> set[str]:
    from irevla_ros.store.episode_store import EpisodeStore

    if not (store_path / "catalog.sqlite").exists():
        return set()
    with EpisodeStore(store_path, read_only=True) as store:
        return {row.episode_id for row in store.list()}


def summarise(
    store_path: Path, monitor: SessionMonitor, codes: dict[str, int] | None, episode_ids: set[str]
) -> dict[str, object]:
    from irevla_ros.store.episode_store import EpisodeStore

    with EpisodeStore(store_path, read_only=True) as store:
        rows = {row.episode_id: row for row in store.list()}
    ours = [rows[e] for e in sorted(episode_ids) if e in rows]
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
