"""Trainer node: the episode store, and the iRe-VLA iterations that turn its episodes into better policies.

Episode-store half: step records + episode events in, durable episodes out.

The closing protocol (early steps, END + STEPS_DONE + every record, grace period, labels, shutdown) is
`store.collector.EpisodeCollector`'s; this node feeds it messages and polls it. A finalised episode is written by
the store on a worker thread (atomic file + catalogue row), and only then acknowledged on /trainer/episode_stored.
LABELs for episodes already handed over go through the same queue, so they reach the store after their episode.
A restarted trainer recovers the store on open.

Iteration half (`iterate`): a worker thread runs `train.iteration.IterationRunner`: every stored policy episode
feeds Stage 1 (online RL on the heads), head updates and promoted Stage 2 versions are announced on
/trainer/policy_version (latched), and the RunIteration action (/trainer/run_iteration) ends a session on the
operator's word, with progress feedback and cancel. The runner persists its phase, so a restarted trainer resumes.

Status on /diagnostics: "<name>: iteration" (phase, iteration, active version; an iteration error is ERROR) and
"<name>: episode store" (episodes stored, incomplete and pending, free disk space at the store against
disk_warn_free_gb / disk_error_free_gb, the newest episode's write latency, a failed write; levels in
`irevla_ros.diagnostics`).
"""

from __future__ import annotations

import contextlib
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rclpy._rclpy_pybind11 import RCLError
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock as RosClock
from rclpy.clock import ClockType
from rclpy.node import Node
from rclpy.task import Future

from irevla_interfaces.action import RunIteration
from irevla_interfaces.msg import (
    EpisodeEvent,
    EpisodeStored,
    Metric,
    PolicyVersion,
    StepRecord,
    TrainerStatus,
)
from irevla_ros import topics
from irevla_ros.diagnostics import IterationSnapshot, Status, StoreSnapshot, iteration_status, store_status
from irevla_ros.node_parameters import TRAINER
from irevla_ros.nodes.common import (
    LATCHED_QOS,
    RELIABLE_QOS,
    ImageFormatError,
    declare_parameters,
    listen_to_episodes_once_connected,
    msg_to_image,
    run_nodes,
    time_to_ns,
)
from irevla_ros.nodes.diagnostics_publisher import DiagnosticsPublisher
from irevla_ros.nodes.event_codes import OUTCOME_CODES, OUTCOME_NAMES, SOURCE_NAMES
from irevla_ros.nodes.robot_state_recording import record_robot_state
from irevla_ros.param_spec import ConfigError, from_parameters
from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.collector import EpisodeCollector
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import AssembledEpisode, EpisodeMeta, InvalidRecordError, StepData
from irevla_ros.train.iteration import (
    IterationConfig,
    IterationError,
    IterationRequest,
    IterationRunner,
    simulation_evaluator,
)
from irevla_ros.train.metrics import MetricsLog
from irevla_ros.vla.model_store import InvalidVersionError, ModelStore, VersionInfo

PHASE_STATES = {
    "session": TrainerStatus.COLLECTING,
    "supervised": TrainerStatus.SUPERVISED,
    "validating": TrainerStatus.VALIDATING,
    "announcing": TrainerStatus.ANNOUNCING,
}


@dataclass
class _Relabel:
    """A LABEL for an episode the collector already handed over: applied by the writer, after the episode."""

    episode_id: str
    outcome: str
    label_source: str


def step_from_msg(msg: StepRecord) -> StepData:
    if len(msg.images) != len(msg.camera_names) or len(msg.image_stamps) != len(msg.camera_names):
        raise InvalidRecordError(
            f"{len(msg.images)} images, {len(msg.camera_names)} camera names, {len(msg.image_stamps)} stamps"
        )
    if len(msg.proprioception) != len(msg.proprioception_names) and len(msg.proprioception) != 0:
        raise InvalidRecordError("proprioception and its names differ in length")
    try:
        images = {name: msg_to_image(img) for name, img in zip(msg.camera_names, msg.images, strict=True)}
    except ImageFormatError as exc:
        raise InvalidRecordError(f"bad image: {exc}") from exc
    import numpy as np

    return StepData(
        episode_id=msg.episode_id,
        step_index=int(msg.step_index),
        stamp_ns=time_to_ns(msg.header.stamp),
        images=images,
        image_stamps_ns={n: time_to_ns(s) for n, s in zip(msg.camera_names, msg.image_stamps, strict=True)},
        proprioception=np.asarray(msg.proprioception, dtype=np.float32),
        proprioception_names=list(msg.proprioception_names) if len(msg.proprioception) else [],
        instruction=msg.instruction,
        action=np.asarray(msg.action, dtype=np.float32),
        log_prob=float(msg.log_prob) if msg.has_log_prob else None,
        value=float(msg.value) if msg.has_value else None,
        policy_version=msg.policy_version,
        intervention=bool(msg.intervention),
        hold=bool(msg.hold),
        image_frame_ids={n: img.header.frame_id for n, img in zip(msg.camera_names, msg.images, strict=True)},
    )


class TrainerNode(Node):
    def __init__(self, name: str = "trainer", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        p = declare_parameters(self, TRAINER)
        self.params = p
        if float(p["disk_error_free_gb"]) > float(p["disk_warn_free_gb"]):  # type: ignore[arg-type]
            raise ConfigError(
                f"{self.get_fully_qualified_name()}: disk_error_free_gb ({p['disk_error_free_gb']}) must not be "
                f"above disk_warn_free_gb ({p['disk_warn_free_gb']})"
            )
        self.store_path = Path(str(p["store_path"])).expanduser().resolve()
        self.store = EpisodeStore(self.store_path)
        report = self.store.last_recovery
        if report is not None and not report.clean:
            self.get_logger().warning(f"store recovery: {report}")
        self.collector = EpisodeCollector(
            EpisodeAssembler(control_period_ns=round(float(p["control_period"]) * 1e9)),  # type: ignore[arg-type]
            log=lambda message: self.get_logger().error(message),
        )
        self._writes: queue.Queue[AssembledEpisode | _Relabel | None] = queue.Queue()
        self.malformed_steps = 0
        self.stored = 0
        self.incomplete = 0
        self.write_latency: float | None = None  # s, the newest episode's store.write (file, fsync, commit)
        self.write_failure: str | None = None  # why the newest write failed (None once one succeeds)
        group = MutuallyExclusiveCallbackGroup()
        self.runner: IterationRunner | None = None
        self._goal_handles: dict[bytes, tuple[object, IterationRequest]] = {}
        self._stage_progress = ("collect", 0.0, "")
        self._stop = threading.Event()
        self._iteration_thread: threading.Thread | None = None
        if p["iterate"]:
            # Before the subscriptions: the episode manager starts a session once they exist, and this set-up
            # (TensorBoard, the action server) takes seconds on a loaded machine while nothing would be spun.
            self._start_iterations(group)
        steps = self.create_subscription(
            StepRecord, topics.STEP_RECORDS, self._on_step, RELIABLE_QOS, callback_group=group
        )
        # A session starts only once the step producer's records can reach this recorder.
        listen_to_episodes_once_connected(self, [steps], self._on_event, group)
        record_robot_state(self, self.collector, group)  # /joint_states, /tf: stored with each step
        self._stored_pub = self.create_publisher(EpisodeStored, topics.EPISODE_STORED, RELIABLE_QOS)
        self._status_pub = self.create_publisher(TrainerStatus, topics.TRAINER_STATUS, LATCHED_QOS)
        # Wall-clock timers: storing must go on while the simulated clock is paused.
        steady = RosClock(clock_type=ClockType.STEADY_TIME)
        self.create_timer(0.1, self._finalise_ready, callback_group=group, clock=steady)
        self.create_timer(float(p["status_period"]), self._publish_status, callback_group=group, clock=steady)  # type: ignore[arg-type]
        # Checked once a second: nothing here changes faster, and each check reads the catalogue.
        self.diagnostics = DiagnosticsPublisher(self, self._statuses, check_period=1.0, callback_group=group)
        self._writer = threading.Thread(target=self._write_loop, name="episode-writer", daemon=True)
        self._writer.start()
        self.get_logger().info(f"episode store at {self.store_path}: {self.store.stats().total} episodes")
        if self._iteration_thread is not None:
            self._iteration_thread.start()

    # --- iterations -----------------------------------------------------------------------------------------------
    def _start_iterations(self, group: MutuallyExclusiveCallbackGroup) -> None:
        p = self.params
        try:
            config = from_parameters(IterationConfig, p)
        except ValueError as exc:  # a setting the ranges allow but its config rejects (e.g. with another one)
            raise ConfigError(f"{self.get_fully_qualified_name()}: {exc}") from exc
        run_dir = Path(str(p["run_dir"])).expanduser().resolve()
        models = Path(str(p["model_store"])).expanduser().resolve()
        self._version_pub = self.create_publisher(PolicyVersion, topics.POLICY_VERSION, LATCHED_QOS)
        self.metrics_log = MetricsLog(run_dir)
        self.runner = IterationRunner(
            run_dir,
            self.store,
            ModelStore(models),
            config,
            announce=self._announce,
            progress=self._on_progress,
            log=lambda text: self.get_logger().info(text),
            metrics=self.metrics_log,
            evaluate=simulation_evaluator(models) if config.validation_episodes else None,
        )
        self._action = ActionServer(
            self,
            RunIteration,
            topics.RUN_ITERATION,
            execute_callback=self._execute_iteration,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=self._cancel_iteration,
            callback_group=group,
        )
        self._iteration_thread = threading.Thread(target=self._iteration_loop, name="iterations", daemon=True)

    def _iteration_loop(self) -> None:
        assert self.runner is not None
        initial = str(self.params["initial_version"])
        # No version yet (expert demonstrations come first): keep storing, look again; say once what to run.
        said = ""
        while not self._stop.is_set():
            try:
                self.runner.start(initial)
                break
            except (IterationError, InvalidVersionError) as exc:
                self._stage_progress = ("collect", 0.0, f"no iterations yet: {exc}")
                if str(exc) != said:
                    said = str(exc)
                    self.get_logger().warning(f"storing episodes, no iterations yet: {exc}")
                self._stop.wait(2.0)
        self.runner.work(self._stop)

    def _announce(self, info: VersionInfo) -> None:
        msg = PolicyVersion(
            version_id=info.version_id,
            parent_version=info.parent or "",
            location=str(info.path),
            sha256=info.manifest_sha256,
            stage=info.stage,
            heads_only=bool(info.meta.get("heads_only", False)),
            metrics=[
                Metric(name=str(k), value=float(v))
                for k, v in info.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            ],
        )
        msg.header.stamp = self.get_clock().now().to_msg()
        try:
            self._version_pub.publish(msg)
        except RCLError:
            if self.context.ok():
                raise

    def _on_progress(self, stage: str, progress: float, message: str) -> None:
        self._stage_progress = (stage, float(progress), message)
        for goal_handle, _ in list(self._goal_handles.values()):
            with contextlib.suppress(RCLError):
                goal_handle.publish_feedback(
                    RunIteration.Feedback(stage=stage, progress=float(progress), message=message)
                )

    async def _execute_iteration(self, goal_handle: object) -> RunIteration.Result:
        assert self.runner is not None
        goal = goal_handle.request  # type: ignore[attr-defined]
        request = IterationRequest(
            reason=goal.reason or "operator",
            max_supervised_steps=int(goal.max_supervised_steps),
            announce=bool(goal.announce),
        )
        key = bytes(goal_handle.goal_id.uuid)  # type: ignore[attr-defined]
        self._goal_handles[key] = (goal_handle, request)
        self.runner.request_iteration(request)
        done = Future()
        threading.Thread(target=lambda: (request.done.wait(), done.set_result(True)), daemon=True).start()
        await done
        del self._goal_handles[key]
        r = request.result
        result = RunIteration.Result(
            success=bool(r.get("promoted")),
            new_version=str(r.get("new_version", "")),
            promoted=bool(r.get("promoted")),
            message=str(r.get("why", "")),
            metrics=_metrics(r),
        )
        if r.get("cancelled"):
            goal_handle.canceled()  # type: ignore[attr-defined]
        elif r.get("new_version") or r.get("why"):
            goal_handle.succeed()  # type: ignore[attr-defined]
        else:
            goal_handle.abort()  # type: ignore[attr-defined]
        return result

    def _cancel_iteration(self, goal_handle: object) -> CancelResponse:
        entry = self._goal_handles.get(bytes(goal_handle.goal_id.uuid))  # type: ignore[attr-defined]
        if entry is not None:
            entry[1].cancel.set()
        return CancelResponse.ACCEPT

    # --- inputs ---------------------------------------------------------------------------------------------------
    def _on_step(self, msg: StepRecord) -> None:
        try:
            step = step_from_msg(msg)
        except ValueError as exc:
            self.malformed_steps += 1
            self._reject(msg, exc)
            return
        try:
            self.collector.add_step(step)
        except ValueError as exc:  # unknown/late episode (the collector counts it): log it, keep going
            self._reject(msg, exc)

    def _reject(self, msg: StepRecord, exc: ValueError) -> None:
        self.get_logger().error(
            f"step {msg.step_index} of episode {msg.episode_id!r} rejected: {exc}",
            throttle_duration_sec=2.0,
        )

    def _on_event(self, msg: EpisodeEvent) -> None:
        try:
            if msg.type == EpisodeEvent.START:
                self.collector.start(
                    EpisodeMeta(
                        episode_id=msg.episode_id,
                        task=msg.task,
                        instruction=msg.instruction,
                        policy_version=msg.policy_version,
                        source=msg.source or "policy",
                        started_ns=time.time_ns(),
                        scene_seed=msg.scene_seed if msg.scene_seed >= 0 else None,  # -1: no simulator
                    )
                )
            elif msg.type == EpisodeEvent.END:
                self.collector.end(
                    msg.episode_id,
                    OUTCOME_NAMES.get(msg.outcome, "unknown"),
                    SOURCE_NAMES.get(msg.label_source, "none"),
                )
            elif msg.type == EpisodeEvent.STEPS_DONE:
                self.collector.steps_done(msg.episode_id, int(msg.num_steps))
            elif msg.type == EpisodeEvent.LABEL:
                outcome = OUTCOME_NAMES.get(msg.outcome, "unknown")
                source = SOURCE_NAMES.get(msg.label_source, "none")
                if not self.collector.label(msg.episode_id, outcome, source):
                    self._writes.put(_Relabel(msg.episode_id, outcome, source))
        except ValueError as exc:
            self.get_logger().error(f"episode event {msg.type} for {msg.episode_id!r} rejected: {exc}")

    # --- finalising -----------------------------------------------------------------------------------------------
    def _finalise_ready(self) -> None:
        for assembled in self.collector.poll():
            self._writes.put(assembled)

    def _relabel(self, label: _Relabel) -> None:
        try:
            self.store.relabel(label.episode_id, label.outcome, label.label_source, time.time_ns())
        except ValueError as exc:  # an episode this store never had
            self.get_logger().error(
                f"episode event {EpisodeEvent.LABEL} for {label.episode_id!r} rejected: {exc}"
            )

    def _write_loop(self) -> None:
        while True:
            assembled = self._writes.get()
            if assembled is None:
                return
            if isinstance(assembled, _Relabel):
                self._relabel(assembled)
                continue
            started = time.monotonic()
            try:
                stored = self.store.write(assembled)
            except Exception as exc:  # never lose the data silently: log loudly, keep the node up
                self.write_failure = f"{assembled.meta.episode_id}: {exc}"
                self.get_logger().error(f"storing episode {assembled.meta.episode_id} failed: {exc}")
                continue
            self.write_latency, self.write_failure = time.monotonic() - started, None
            self.stored += 1
            self.incomplete += 0 if stored.complete else 1
            ack = EpisodeStored(
                episode_id=stored.episode_id,
                complete=stored.complete,
                num_steps=stored.num_steps,
                outcome=OUTCOME_CODES.get(stored.outcome, 0),
                path=str(self.store_path / stored.path),
                sha256=stored.sha256,
            )
            try:
                ack.header.stamp = self.get_clock().now().to_msg()
                self._stored_pub.publish(ack)
            except RCLError:
                if self.context.ok():
                    raise
                continue  # stored during shutdown: durable, but nobody is left to tell
            if self.runner is not None:
                self.runner.on_episode_stored(stored)
            note = "" if stored.complete else f" INCOMPLETE: {'; '.join(stored.reasons)}"
            self.get_logger().info(
                f"stored {stored.episode_id} ({stored.num_steps} steps, {stored.outcome}){note}"
            )

    def _publish_status(self) -> None:
        stats = self.store.stats()
        msg = TrainerStatus(
            state=TrainerStatus.COLLECTING,
            stage="collect",
            episodes_stored=stats.total,
            episodes_incomplete=stats.incomplete,
            episodes_pending=self.collector.pending() + self._writes.qsize(),
            store_path=str(self.store_path),
            metrics=[
                Metric(
                    name="rejected_steps", value=float(self.collector.rejected_steps + self.malformed_steps)
                )
            ]
            + [Metric(name=f"outcome_{k}", value=float(v)) for k, v in stats.by_outcome.items()],
        )
        if self.runner is not None:
            record = self.runner.record
            stage, progress, message = self._stage_progress
            msg.state = TrainerStatus.ERROR if self.runner.last_error else PHASE_STATES[record.phase]
            msg.iteration = record.iteration
            msg.stage = stage if record.phase != "session" else "session"
            msg.progress = progress
            msg.active_version = record.running_version
            msg.message = self.runner.last_error or message
            successes = record.session_successes
            msg.metrics.append(Metric(name="session_episodes", value=float(len(successes))))
            if successes:
                msg.metrics.append(Metric(name="session_success_rate", value=sum(successes) / len(successes)))
        msg.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(msg)

    def _statuses(self) -> list[Status]:
        p = self.params
        name = self.get_name()
        runner = self.runner
        if runner is None:
            iteration = IterationSnapshot(False, "", 0, "", None, "")
        else:
            record = runner.record
            iteration = IterationSnapshot(
                iterate=True,
                phase=record.phase,
                iteration=record.iteration,
                active_version=record.running_version or "",
                error=runner.last_error or None,
                message=self._stage_progress[2],
            )
        try:
            free: float | None = float(shutil.disk_usage(self.store_path).free)
            disk_error = None
        except OSError as exc:  # the store's folder gone or its disk unmounted
            free, disk_error = None, str(exc)
        stats = self.store.stats()
        store = StoreSnapshot(
            path=str(self.store_path),
            stored=stats.total,
            incomplete=stats.incomplete,
            pending=self.collector.pending() + self._writes.qsize(),
            free_bytes=free,
            disk_error=disk_error,
            warn_free_gb=float(p["disk_warn_free_gb"]),  # type: ignore[arg-type]
            error_free_gb=float(p["disk_error_free_gb"]),  # type: ignore[arg-type]
            write_latency=self.write_latency,
            write_failure=self.write_failure,
        )
        return [iteration_status(name, iteration), store_status(name, store)]

    def close(self) -> None:
        self._stop.set()
        # An accepted step is never dropped because the node was stopped: open episodes are stored incomplete.
        for assembled in self.collector.shutdown():
            self._writes.put(assembled)
        self._writes.put(None)
        self._writer.join(timeout=30.0)
        if self._iteration_thread is not None:
            self._iteration_thread.join(timeout=10.0)
            self.metrics_log.close()
        self.store.close()


def _metrics(result: dict[str, object]) -> list[Metric]:
    out = []
    for key in ("session_success_rate", "session_episodes", "iteration"):
        value = result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(Metric(name=key, value=float(value)))
    evaluation = result.get("evaluation")
    if isinstance(evaluation, dict):
        for which in ("running", "candidate"):
            rate = (evaluation.get(which) or {}).get("success_rate")
            if isinstance(rate, (int, float)):
                out.append(Metric(name=f"eval_{which}_success_rate", value=float(rate)))
    return out


def main(args: list[str] | None = None) -> int:
    return run_nodes(lambda context: [TrainerNode(context=context)], args)
