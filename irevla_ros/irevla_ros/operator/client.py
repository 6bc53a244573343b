"""The rclpy half of the operator verbs: one short-lived node on the configured domain, a Trigger call, the
RunIteration action with live feedback, and the status topics. Every wait is bounded by the caller's timeout;
`NoAnswer` carries the message that says what to check."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import rclpy
from action_msgs.msg import GoalStatus
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from std_srvs.srv import Trigger

from irevla_interfaces.action import RunIteration
from irevla_interfaces.msg import EpisodeEvent, PolicyVersion, SessionStatus, TrainerStatus
from irevla_ros import topics
from irevla_ros.dds_profile import use_default_profile
from irevla_ros.diagnostics import ARM_TASK, status_name
from irevla_ros.nodes.common import LATCHED_QOS
from irevla_ros.operator.view import (
    DiagnosticView,
    SessionView,
    StatusSnapshot,
    TrainerView,
    VersionView,
    no_answer_message,
)

ARM_DIAGNOSTIC = status_name("arm_controller", ARM_TASK)  # the arm controller's status on /diagnostics
# The status sources that have a topic of their own (the arm's line is one status among many on /diagnostics).
STATUS_TOPICS = {
    "session": topics.SESSION_STATUS,
    "trainer": topics.TRAINER_STATUS,
    "version": topics.POLICY_VERSION,
    "policy": topics.POLICY_STATUS,
}
SESSION_STATES = {
    SessionStatus.IDLE: "idle",
    SessionStatus.RESETTING: "resetting",
    SessionStatus.RUNNING: "running",
    SessionStatus.AWAITING_LABEL: "awaiting label",
    SessionStatus.PAUSED: "paused",
}
TRAINER_STATES = {
    TrainerStatus.IDLE: "idle",
    TrainerStatus.COLLECTING: "collecting",
    TrainerStatus.SUPERVISED: "supervised",
    TrainerStatus.VALIDATING: "validating",
    TrainerStatus.ANNOUNCING: "announcing",
    TrainerStatus.ERROR: "ERROR",
}
OUTCOMES = {
    EpisodeEvent.OUTCOME_NONE: "",
    EpisodeEvent.OUTCOME_SUCCESS: "success",
    EpisodeEvent.OUTCOME_FAILURE: "failure",
    EpisodeEvent.OUTCOME_TIMEOUT: "timeout",
    EpisodeEvent.OUTCOME_ABORTED: "aborted",
}
LEVELS = {
    DiagnosticStatus.OK: "ok",
    DiagnosticStatus.WARN: "warn",
    DiagnosticStatus.ERROR: "error",
    DiagnosticStatus.STALE: "stale",
}
GOAL_STATUS = {
    GoalStatus.STATUS_SUCCEEDED: "succeeded",
    GoalStatus.STATUS_ABORTED: "aborted",
    GoalStatus.STATUS_CANCELED: "cancelled",
}


class NoAnswer(RuntimeError):
    """Nothing on the graph answered within the timeout; str() says what and what to check."""


@dataclass
class IterationOutcome:
    status: str  # succeeded, aborted, cancelled, ...
    promoted: bool
    new_version: str
    message: str
    metrics: dict[str, float]


class OperatorClient:
    """A node of its own on `domain` (its own rclpy Context, so callers and tests may hold other contexts)."""

    def __init__(self, domain: int, timeout: float) -> None:
        self.domain = domain
        self.timeout = timeout
        self.context = Context()
        # No rclpy signal handler: Ctrl-C must reach the verb as KeyboardInterrupt (iterate cancels its goal)
        # instead of shutting the context down under it.
        use_default_profile()  # before this process's first DDS participant
        rclpy.init(context=self.context, domain_id=domain, signal_handler_options=SignalHandlerOptions.NO)
        try:
            self.node = Node(
                f"irevla_operator_{os.getpid()}",
                context=self.context,
                start_parameter_services=False,
                enable_rosout=False,
            )
            self.executor = SingleThreadedExecutor(context=self.context)
            self.executor.add_node(self.node)
        except BaseException:
            self.context.try_shutdown()
            raise

    def close(self) -> None:
        try:
            self.executor.shutdown()
            self.node.destroy_node()
        finally:
            self.context.try_shutdown()

    def spin_until(self, predicate: Callable[[], bool], deadline: float | None) -> bool:
        """Spin until `predicate()` or the monotonic `deadline` (None: no deadline)."""
        while not predicate():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            self.executor.spin_once(timeout_sec=0.05)
        return True

    def _deadline(self) -> float:
        return time.monotonic() + self.timeout

    # --- services -------------------------------------------------------------------------------------------------
    def trigger(self, service: str) -> tuple[bool, str]:
        """Call a std_srvs/Trigger service; (success, message) of its answer."""
        deadline = self._deadline()
        client = self.node.create_client(Trigger, service)
        if not self.spin_until(client.service_is_ready, deadline):
            raise NoAnswer(no_answer_message("service", service, self.domain, self.timeout))
        future = client.call_async(Trigger.Request())
        if not self.spin_until(future.done, deadline):
            raise NoAnswer(
                f"service {service} on ROS_DOMAIN_ID {self.domain} was found but did not answer within "
                f"{self.timeout:g} s (is the node busy or stuck? its log says)"
            )
        response = future.result()
        return bool(response.success), str(response.message)

    # --- the RunIteration action ----------------------------------------------------------------------------------
    def iterate(
        self,
        goal: RunIteration.Goal,
        on_feedback: Callable[[str, float, str], None],
        on_accepted: Callable[[], None] = lambda: None,
        on_cancel: Callable[[], None] = lambda: None,
    ) -> IterationOutcome:
        """Send the goal, report feedback until the result. Ctrl-C (KeyboardInterrupt) cancels the goal and
        waits (bounded) for the trainer to confirm; the outcome then says 'cancelled'."""
        deadline = self._deadline()
        client = ActionClient(self.node, RunIteration, topics.RUN_ITERATION)
        if not self.spin_until(client.server_is_ready, deadline):
            hint = "The trainer serves it only with iterate: true."
            raise NoAnswer(
                no_answer_message("action server", topics.RUN_ITERATION, self.domain, self.timeout, hint)
            )
        sent = client.send_goal_async(
            goal,
            feedback_callback=lambda fb: on_feedback(
                fb.feedback.stage, fb.feedback.progress, fb.feedback.message
            ),
        )
        if not self.spin_until(sent.done, deadline):
            raise NoAnswer(
                f"action server {topics.RUN_ITERATION} on ROS_DOMAIN_ID {self.domain} did not accept or refuse "
                f"the goal within {self.timeout:g} s"
            )
        handle = sent.result()
        if not handle.accepted:
            return IterationOutcome("rejected", False, "", "the trainer refused the goal", {})
        on_accepted()
        result: Future = handle.get_result_async()
        try:
            self.spin_until(result.done, None)  # an iteration takes as long as its Stage 2 and validation
        except KeyboardInterrupt:
            on_cancel()
            cancel = handle.cancel_goal_async()
            # The trainer stops Stage 2 at its next step; give it longer than a discovery timeout.
            wait = time.monotonic() + max(30.0, self.timeout)
            if not (self.spin_until(cancel.done, wait) and self.spin_until(result.done, wait)):
                return IterationOutcome(
                    "cancel requested", False, "", "the trainer did not confirm the cancel", {}
                )
        answer = result.result()
        r = answer.result
        return IterationOutcome(
            GOAL_STATUS.get(answer.status, f"status {answer.status}"),
            bool(r.promoted),
            str(r.new_version),
            str(r.message),
            {m.name: float(m.value) for m in r.metrics},
        )

    # --- status ---------------------------------------------------------------------------------------------------
    def watch_status(self) -> StatusSnapshot:
        """Subscribe to the status topics; the returned snapshot fills in as the executor spins."""
        snap = StatusSnapshot(domain=self.domain)

        def session(msg: SessionStatus) -> None:
            snap.received["session"] = time.monotonic()
            snap.session = SessionView(
                state=SESSION_STATES.get(msg.state, str(msg.state)),
                episode_id=msg.episode_id,
                episode_index=int(msg.episode_index),
                step=int(msg.step),
                episodes_done=int(msg.episodes_done),
                successes=int(msg.successes),
                success_rate=float(msg.success_rate),
                task=msg.task,
                instruction=msg.instruction,
                last_outcome=OUTCOMES.get(msg.last_outcome, str(msg.last_outcome)),
                message=msg.message,
            )

        def trainer(msg: TrainerStatus) -> None:
            snap.received["trainer"] = time.monotonic()
            snap.trainer = TrainerView(
                state=TRAINER_STATES.get(msg.state, str(msg.state)),
                iteration=int(msg.iteration),
                stage=msg.stage,
                progress=float(msg.progress),
                episodes_stored=int(msg.episodes_stored),
                episodes_incomplete=int(msg.episodes_incomplete),
                episodes_pending=int(msg.episodes_pending),
                active_version=msg.active_version,
                message=msg.message,
                metrics={m.name: float(m.value) for m in msg.metrics},
            )

        def version(msg: PolicyVersion) -> None:
            snap.received["version"] = time.monotonic()
            snap.version = VersionView(msg.version_id, msg.stage, msg.parent_version, bool(msg.heads_only))

        def diagnostics(which: str, name: str | None) -> Callable[[DiagnosticArray], None]:
            def on(msg: DiagnosticArray) -> None:
                for status in msg.status:
                    if name is None or status.name == name:
                        view = DiagnosticView(
                            LEVELS.get(status.level, str(status.level)),
                            status.message,
                            {kv.key: kv.value for kv in status.values},
                        )
                        setattr(snap, which, view)
                        snap.received[which] = time.monotonic()

            return on

        self.node.create_subscription(SessionStatus, topics.SESSION_STATUS, session, LATCHED_QOS)
        self.node.create_subscription(TrainerStatus, topics.TRAINER_STATUS, trainer, LATCHED_QOS)
        self.node.create_subscription(PolicyVersion, topics.POLICY_VERSION, version, LATCHED_QOS)
        self.node.create_subscription(DiagnosticArray, topics.POLICY_STATUS, diagnostics("policy", None), 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics("arm", ARM_DIAGNOSTIC), 10)
        return snap

    def silent_sources(self, snap: StatusSnapshot) -> list[str]:
        """The status sources whose own topic has a publisher this node has discovered but no message from yet
        (/diagnostics is shared by every node, so the arm's line is not among them)."""
        return [
            source
            for source, topic in STATUS_TOPICS.items()
            if source not in snap.received and self.node.count_publishers(topic) > 0
        ]


@contextmanager
def operator_client(domain: int, timeout: float) -> Iterator[OperatorClient]:
    client = OperatorClient(domain, timeout)
    try:
        yield client
    finally:
        client.close()
