"""`irevla demo`: the main job in simulation, through the real node graph (child processes over real DDS).

1. an operator-supervised session of the scripted expert stores demonstrations (D_e);
2. Stage 0 (supervised) trains the first VLA version on them;
3. one iRe-VLA iteration in one running graph: a session run by that VLA while the trainer runs Stage 1 (online
   RL on the heads) and pushes head updates to the policy node; at the session's episode budget the trainer runs
   Stage 2, validates the candidate in simulation against the running version and announces it; the policy node
   hot-swaps it between two ticks, and a second session runs with the new version.

A small monitor node follows the graph (progress on stderr); one JSON summary line goes to stdout: episodes,
successes, steps, missed_ticks, lost_steps, incomplete, store, and the iteration's results.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from irevla_ros.bringup.domains import leased_domain
from irevla_ros.bringup.graph import DEFAULT_CAMERAS, collect_graph
from irevla_ros.bringup.launcher import GraphRunner
from irevla_ros.dds_profile import use_default_profile


@dataclass
class SessionMonitor:
    """What the demo (and the end-to-end tests) learn from the graph's topics."""

    stored: dict[str, tuple[bool, int, int]] = field(default_factory=dict)  # id -> complete, steps, outcome
    steps_emitted: dict[str, int] = field(default_factory=dict)  # from STEPS_DONE
    missed_ticks: int = 0
    policy_version: str = ""  # the version the policy node runs now
    trainer_iteration: int = 0
    trainer_stage: str = ""
    trainer_message: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


def start_monitor(
    monitor: SessionMonitor, on_stored: object = None
) -> tuple[object, object, threading.Thread]:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    from irevla_interfaces.msg import EpisodeEvent, EpisodeStored, TrainerStatus
    from irevla_ros import topics
    from irevla_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS

    context = Context()
    use_default_profile()  # before this process's first DDS participant
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
                elif kv.key == "policy_version":
                    monitor.policy_version = kv.value

    def trainer(msg: TrainerStatus) -> None:
        monitor.trainer_iteration, monitor.trainer_stage = int(msg.iteration), msg.stage
        monitor.trainer_message = msg.message

    node.create_subscription(TrainerStatus, topics.TRAINER_STATUS, trainer, LATCHED_QOS)
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


class DemoGraph:
    """The sim graph as child processes plus the monitor node, up until `stop()`: a session, or several."""

    def __init__(
        self, label: str, store: Path, log_dir: Path, settings: Sequence[str], cameras: Sequence[str]
    ) -> None:
        from irevla_ros.nodes.event_codes import OUTCOME_NAMES

        self.label, self.store = label, store
        self.monitor = SessionMonitor()
        self.started = time.monotonic()
        self.target = 0

        def progress(msg: object) -> None:
            outcome = OUTCOME_NAMES.get(msg.outcome, "?")  # type: ignore[attr-defined]
            print(
                f"[demo:{self.label}] {len(self.monitor.stored)}/{self.target} episodes stored: "
                f"{msg.episode_id} {outcome}, {msg.num_steps} steps ({time.monotonic() - self.started:.0f} s)",  # type: ignore[attr-defined]
                file=sys.stderr,
                flush=True,
            )

        self.context, self.node, self.thread = start_monitor(self.monitor, progress)
        self.runner = GraphRunner(
            collect_graph("sim", cameras),
            [
                f"/trainer.store_path={store}",
                # the session starts once this monitor listens too, so it counts every episode's steps
                "/episode_manager.required_nodes=[/policy,/trainer,/arm_controller,/irevla_demo_monitor]",
                *settings,
            ],
            log_dir=log_dir,
        )
        self.log_dir = log_dir
        self.before = stored_ids(store)
        self.runner.start()

    def wait_stored(self, count: int, timeout: float) -> set[str]:
        """Until `count` episodes more than at start are in the store (the store, not the acks this monitor
        happened to receive, says what is done)."""
        self.target = len(self.monitor.stored) + count - len(stored_ids(self.store) - self.before)
        deadline = time.monotonic() + timeout
        new: set[str] = set()
        while time.monotonic() < deadline:
            self.check()
            new = stored_ids(self.store) - self.before
            if len(new) >= count:
                break
            time.sleep(0.2)
        return new

    def wait_for(self, predicate: Callable[[SessionMonitor], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if predicate(self.monitor):
                return True
            time.sleep(0.2)
        return False

    def check(self) -> None:
        failed = self.runner.poll()
        if failed is not None:
            raise RuntimeError(f"{failed.label} exited with {failed.popen.returncode}; see {self.log_dir}")

    def next_batch(self) -> None:
        """The operator's reset button: the episode manager starts another batch of num_episodes."""
        from std_srvs.srv import Trigger

        from irevla_ros import topics

        client = self.node.create_client(Trigger, topics.RESET_EPISODE)  # type: ignore[attr-defined]
        if not client.wait_for_service(timeout_sec=10.0):
            raise RuntimeError("the episode manager's reset service is not available")
        future = client.call_async(Trigger.Request())
        deadline = time.monotonic() + 10.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not future.done() or not future.result().success:
            raise RuntimeError(f"reset refused: {future.result() if future.done() else 'no answer'}")

    def stop(self) -> dict[str, int]:
        codes = self.runner.stop()
        self.context.try_shutdown()  # type: ignore[attr-defined]
        self.thread.join(timeout=2.0)  # type: ignore[attr-defined]
        return codes


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
    graph = DemoGraph(
        label, store, log_dir, [f"/episode_manager.num_episodes={episodes}", *settings], cameras
    )
    try:
        new = graph.wait_stored(episodes, timeout)
    finally:
        codes = graph.stop()
    return summarise(store, graph.monitor, codes, new)


def run_iteration_sessions(
    episodes: int,
    store: Path,
    models: Path,
    trainer_dir: Path,
    log_dir: Path,
    settings: Sequence[str],
    cameras: Sequence[str],
    timeout: float,
) -> tuple[dict[str, object], dict[str, object], dict[str, object]]:
    """One iRe-VLA iteration in one running graph: session 1 (Stage 1 live), Stage 2 + validation + announcement
    by the trainer, the policy node's hot swap, session 2. Returns (session 1, session 2, iteration verdict)."""
    graph = DemoGraph(
        "vla",
        store,
        log_dir,
        [f"/episode_manager.num_episodes={episodes}", f"/trainer.episode_budget={episodes}", *settings],
        cameras,
    )
    try:
        first = graph.wait_stored(episodes, timeout)
        session1 = summarise(store, graph.monitor, None, first)
        print(
            "[demo:vla] session 1 done; the trainer runs Stage 2 and validation", file=sys.stderr, flush=True
        )
        shown = {"stage": "", "at": 0.0}

        def iterated(m: SessionMonitor) -> bool:
            # the trainer's progress: each new stage, then at most every 10 s
            fresh = m.trainer_stage != shown["stage"] or time.monotonic() - shown["at"] > 10.0
            if m.trainer_message and fresh:
                shown.update(stage=m.trainer_stage, at=time.monotonic())
                print(f"[demo:trainer] {m.trainer_stage}: {m.trainer_message}", file=sys.stderr, flush=True)
            return m.trainer_iteration >= 2

        if not graph.wait_for(iterated, timeout):
            raise RuntimeError(f"the trainer did not finish the iteration in {timeout:.0f} s; see {log_dir}")
        verdict = read_verdict(trainer_dir)
        if verdict.get("promoted"):
            new_version = str(verdict["candidate"])
            if not graph.wait_for(lambda m: m.policy_version == new_version, 120.0):
                raise RuntimeError(f"the policy node did not swap to {new_version}; see {log_dir}")
            print(f"[demo:vla] policy runs {new_version}; session 2", file=sys.stderr, flush=True)
        else:
            print(f"[demo:vla] not promoted ({verdict.get('why')}); session 2", file=sys.stderr, flush=True)
        graph.before |= first
        graph.next_batch()
        second = graph.wait_stored(episodes, timeout)
    finally:
        codes = graph.stop()
    session1["exit_codes"] = codes
    return session1, summarise(store, graph.monitor, codes, second), verdict


def read_verdict(trainer_dir: Path) -> dict[str, object]:
    import json

    from irevla_ros.train.iteration import STATE_FILE

    history = json.loads((trainer_dir / STATE_FILE).read_text()).get("history", [])
    return dict(history[-1]) if history else {}


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
    validation_episodes: int = 1,
) -> dict[str, object]:
    """The main job in simulation: demonstrations, Stage 0, then one iRe-VLA iteration between two VLA sessions."""
    if (
        "ROS_DOMAIN_ID" not in os.environ
    ):  # a simulation of its own: no cross-talk with another run on the host
        with leased_domain() as domain:
            os.environ["ROS_DOMAIN_ID"] = str(domain)
            try:
                return run_demo(
                    episodes, store, noise, timeout, overrides, cameras, vla_episodes, sft_steps, models,
                    validation_episodes,
                )  # fmt: skip
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
         "/trainer.iterate=false", *overrides],
        cameras, timeout,
    )  # fmt: skip
    summary: dict[str, object] = dict(expert)
    if vla_episodes <= 0:
        summary.update(exit_summary({"expert": expert}))
        return summary

    from irevla_ros.train.stage0 import train_first_version

    models = (models or run_dir / "models").resolve()
    print(f"[demo] 2/3: Stage 0 (supervised) on the expert episodes -> {models}", file=sys.stderr, flush=True)
    version = train_first_version(store, models, cameras, steps=sft_steps)
    print(
        f"[demo] 3/3: one iRe-VLA iteration: {vla_episodes} episodes by {version.version_id} with Stage 1 live, "
        f"Stage 2, validation, hot swap, {vla_episodes} episodes by the new version",
        file=sys.stderr,
        flush=True,
    )
    trainer_dir = (run_dir / "trainer").resolve()
    tasks = _graph_tasks(overrides)
    vla, after, verdict = run_iteration_sessions(
        vla_episodes, store, models, trainer_dir, run_dir / "logs-vla",
        ["/policy.policy=vla", f"/policy.model_store={models}", f"/policy.version={version.version_id}",
         "/episode_manager.source=policy", f"/trainer.model_store={models}", f"/trainer.run_dir={trainer_dir}",
         f"/trainer.initial_version={version.version_id}", "/trainer.max_iterations=1",
         f"/trainer.stage2.steps={sft_steps}", f"/trainer.validation_episodes={validation_episodes}",
         f"/trainer.validation_tasks=[{','.join(tasks)}]", *overrides],
        cameras, timeout,
    )  # fmt: skip
    sessions = {"expert": expert, "vla": vla, "vla_after": after}
    for key in ("episodes", "successes", "steps", "missed_ticks", "lost_steps", "incomplete"):
        summary[key] = sum(int(s[key]) for s in sessions.values())  # type: ignore[call-overload]
    evaluation = verdict.get("evaluation") or {}
    summary.update(
        version=version.version_id,
        stage0_loss=version.metrics.get("final_loss"),
        expert_success_rate=_rate(expert),
        vla_success_rate=_rate(vla),
        iteration_version=verdict.get("candidate", ""),
        promoted=bool(verdict.get("promoted")),
        promotion=verdict.get("why", ""),
        vla_success_rate_after=_rate(after),
        eval_success_rate_before=(evaluation.get("running") or {}).get("success_rate"),  # type: ignore[union-attr]
        eval_success_rate_after=(evaluation.get("candidate") or {}).get("success_rate"),  # type: ignore[union-attr]
        stage2_loss=(verdict.get("stage2") or {}).get("final_loss"),  # type: ignore[union-attr]
        report=str(trainer_dir / "report" / "report.md"),
        sessions=sessions,
    )
    summary.update(exit_summary(sessions))
    return summary


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"{code} (signal {-code})"
    return str(code)


def exit_summary(sessions: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """The processes' exit codes over all sessions, without letting one session's clean stop hide another's crash:
    `exit_codes` has, per executable, its worst code in any session (a signal is worse than an error exit, which
    is worse than 0), `failed` names every session and process that did not exit 0, e.g.
    "vla/policy_node exited -11 (SIGSEGV)"."""
    worst: dict[str, int] = {}
    failed: list[str] = []
    for session, data in sessions.items():
        codes = data.get("exit_codes") or {}
        for process, code in codes.items():  # type: ignore[attr-defined]
            code = int(code)
            if code != 0:
                failed.append(f"{session}/{process} exited {_describe(code)}")
            if process not in worst or (code != 0, code < 0) > (worst[process] != 0, worst[process] < 0):
                worst[process] = code
    return {"exit_codes": worst, "failed": failed}


def demo_exit_code(summary: Mapping[str, object], expected_episodes: int) -> int:
    """0 only if every process of every session exited 0, every episode was stored and no step was lost."""
    ok = (
        not summary.get("failed")
        and summary.get("lost_steps") == 0
        and summary.get("episodes") == expected_episodes
    )
    return 0 if ok else 1


def _graph_tasks(overrides: Sequence[str]) -> list[str]:
    """The tasks the sessions cycle through (validation evaluates on the same), honouring --set overrides."""
    from irevla_ros.node_parameters import DEFAULT_TASKS

    for item in overrides:
        if item.startswith("/episode_manager.tasks="):
            return [t.strip() for t in item.split("=", 1)[1].strip("[]").split(",") if t.strip()]
    return list(DEFAULT_TASKS)


def _rate(session: dict[str, object]) -> float:
    return round(int(session["successes"]) / max(1, int(session["episodes"])), 3)  # type: ignore[call-overload]


def stored_ids(store_path: Path) -> set[str]:
    from irevla_ros.store.episode_store import EpisodeStore

    if not (store_path / "catalog.sqlite").exists():
        return set()
    try:
        store = EpisodeStore(store_path, read_only=True)
    except RuntimeError as exc:  # the trainer has created the file but not yet its schema
        if "needs migration" in str(exc):
            return set()
        raise
    with store:
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
