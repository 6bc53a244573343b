"""Episode manager node: the operator-supervised session (irevla_ros.session) on ROS.

Inputs: the simulator's success signal, operator Trigger services (~/label_success, ~/label_failure, ~/reset,
~/pause, ~/resume) and a gamepad (sensor_msgs/Joy; the teleop reset button). Outputs: EpisodeEvents, the session
status, and the RViz overlay (a text MarkerArray and an annotated camera image showing the last outcome and the
running success rate). Resets call /sim/reset_episode in simulation (START passes on the layout seed it answers
with, so the store records the scene), or home the arm on a robot (START's scene_seed -1). Status on
/diagnostics ("<name>: session"): the session state and counters; waiting for the required nodes or for a reset
service is WARN, a failed reset or one running longer than `reset_timeout` ERROR (`irevla_ros.diagnostics`).
A failed reset, or one unanswered for `reset_timeout` (abandoned: its late answer is ignored), is tried again after
RESET_RETRY_FIRST s, doubling to RESET_RETRY_MAX; the operator's reset request tries at once.
"""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import Bool
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker, MarkerArray

from irevla_interfaces.msg import EpisodeEvent, SessionStatus
from irevla_interfaces.srv import ResetEpisode
from irevla_ros import topics
from irevla_ros.diagnostics import SessionSnapshot, Status, session_status
from irevla_ros.node_parameters import EPISODE_MANAGER
from irevla_ros.nodes.common import (
    DRIVER_QOS,
    LATCHED_QOS,
    RELIABLE_QOS,
    SENSOR_QOS,
    ImageFormatError,
    RosTimePeriodic,
    declare_parameters,
    image_to_msg,
    msg_to_image,
    run_nodes,
    subscriber_nodes,
    time_to_ns,
    to_time_msg,
)
from irevla_ros.nodes.diagnostics_publisher import DiagnosticsPublisher
from irevla_ros.nodes.event_codes import OUTCOME_CODES, SOURCE_CODES
from irevla_ros.session import Session, SessionConfig, SessionEvent, SessionState, TransitionError

EVENT_CODES = {
    "start": EpisodeEvent.START,
    "end": EpisodeEvent.END,
    "label": EpisodeEvent.LABEL,
    "reset_requested": EpisodeEvent.RESET_REQUESTED,
    "reset_done": EpisodeEvent.RESET_DONE,
}
# After a failed reset, the next try waits this long (s, wall), doubling with each consecutive failure up to
# RESET_RETRY_MAX: a reset that keeps failing (an e-stop latched, a scene the simulator refuses) is retried without
# flooding the arm or the log, and the operator's reset request tries at once.
RESET_RETRY_FIRST = 1.0
RESET_RETRY_MAX = 30.0
JOY_BUTTON_PARAMS = ("joy_success_button", "joy_failure_button", "joy_reset_button", "joy_pause_button")
OUTCOME_COLOURS = {
    "success": (0.1, 0.8, 0.1),
    "failure": (0.9, 0.1, 0.1),
    "timeout": (0.9, 0.6, 0.1),
    "aborted": (0.6, 0.6, 0.6),
    "": (1.0, 1.0, 1.0),
    "takeover": (0.2, 0.5, 1.0),  # the operator holds the arm (takeover button held in a policy episode)
}


class EpisodeManagerNode(Node):
    def __init__(self, name: str = "episode_manager", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        p = declare_parameters(self, EPISODE_MANAGER)
        self.params = p
        self.session = Session(
            SessionConfig(
                tasks=list(p["tasks"]),  # type: ignore[arg-type]
                episode_timeout=float(p["episode_timeout"]),  # type: ignore[arg-type]
                label_wait=float(p["label_wait"]),  # type: ignore[arg-type]
                num_episodes=int(p["num_episodes"]),  # type: ignore[arg-type]
                auto_start=bool(p["auto_start"]),
                success_source=str(p["success_source"]),
            )
        )
        self._lock = threading.RLock()
        self._sim_success = False
        self._reset_call: Future | None = None  # the reset call in progress (cancelled when abandoned)
        self._reset_started: float | None = None  # its monotonic start
        self._reset_error: str | None = None  # why the newest reset failed
        self._reset_failures = 0  # consecutive failed resets, for the back-off
        self._reset_retry_at: float | None = None  # monotonic time of the next try after a failure
        self._joy_previous: list[int] = []
        self._policy_version = ""
        # The operator's takeovers of the running policy episode, for the overlay: /teleop/engaged (the takeover
        # button held), counted on each press while a policy episode runs.
        self._takeover_held = False
        self._takeovers = 0
        self._event_pub = self.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
        self._status_pub = self.create_publisher(SessionStatus, topics.SESSION_STATUS, LATCHED_QOS)
        self._marker_pub = self.create_publisher(MarkerArray, topics.OVERLAY_MARKERS, 10)
        self._overlay_pub = self.create_publisher(Image, topics.OVERLAY_IMAGE, DRIVER_QOS)  # an image source
        group = MutuallyExclusiveCallbackGroup()
        self.create_subscription(Bool, topics.SIM_SUCCESS, self._on_success, 10, callback_group=group)
        self.create_subscription(Joy, topics.JOY, self._on_joy, 10, callback_group=group)
        self.create_subscription(
            Bool, topics.TELEOP_ENGAGED, self._on_engaged, LATCHED_QOS, callback_group=group
        )
        self.create_subscription(Image, topics.CAMERA_IMAGE, self._on_image, SENSOR_QOS, callback_group=group)
        RosTimePeriodic(self, 0.05, self._on_timer, callback_group=group)
        clients = ReentrantCallbackGroup()
        self._sim_reset = self.create_client(ResetEpisode, topics.SIM_RESET, callback_group=clients)
        self._home = self.create_client(Trigger, topics.RESET_HOME, callback_group=clients)
        for name, handler in (
            (topics.LABEL_SUCCESS, lambda: self._label("success")),
            (topics.LABEL_FAILURE, lambda: self._label("failure")),
            (topics.RESET_EPISODE, self._reset_request),
            (topics.PAUSE, self._pause),
            (topics.RESUME, self._resume),
        ):
            self.create_service(
                Trigger, name, lambda req, res, h=handler: self._serve(h, res), callback_group=group
            )
        # The session starts once the nodes that act on and record episodes listen to its events: a START sent
        # before the policy or the trainer subscribed would be lost to them.
        self._waiting_for = set(p["required_nodes"]) if p["auto_start"] else set()  # type: ignore[arg-type]
        self._session_started = not p["auto_start"]
        self.diagnostics = DiagnosticsPublisher(self, self._statuses, callback_group=group)

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # --- operator input -------------------------------------------------------------------------------------------
    def _serve(self, handler: object, response: Trigger.Response) -> Trigger.Response:
        try:
            with self._lock:
                message = handler()  # type: ignore[operator]
            response.success, response.message = True, message
        except (TransitionError, ValueError) as exc:
            response.success, response.message = False, str(exc)
        return response

    def _label(self, outcome: str) -> str:
        self._apply(self.session.operator_label(self._now(), outcome))
        return f"labelled {outcome}"

    def _reset_request(self) -> str:
        self._apply(self.session.request_reset(self._now(), "operator reset"))
        # The operator asked (the teleop reset button, ~/reset): after a failed reset that means "try now", not
        # at the end of the back-off (they may just have cleared what made it fail, an e-stop say).
        self._reset_retry_at = None
        return "reset requested"

    def _pause(self) -> str:
        self._apply(self.session.pause(self._now()))
        return "paused"

    def _resume(self) -> str:
        self._apply(self.session.resume(self._now()))
        return "resumed"

    def _on_joy(self, msg: Joy) -> None:
        buttons = list(msg.buttons)
        needed = 1 + max(int(self.params[k]) for k in JOY_BUTTON_PARAMS)  # type: ignore[arg-type]
        if len(buttons) < needed:
            # Ignored whole, keeping the previous button state, so a held button is not pressed twice.
            self.get_logger().error(
                f"malformed /joy: {len(buttons)} buttons, the configured buttons need {needed}; ignored",
                throttle_duration_sec=5.0,
            )
            return
        pressed = [
            i
            for i, b in enumerate(buttons)
            if b and (i >= len(self._joy_previous) or not self._joy_previous[i])
        ]
        self._joy_previous = buttons
        actions = {
            int(self.params["joy_success_button"]): lambda: self._label("success"),  # type: ignore[arg-type]
            int(self.params["joy_failure_button"]): lambda: self._label("failure"),  # type: ignore[arg-type]
            int(self.params["joy_reset_button"]): self._reset_request,  # type: ignore[arg-type]
            int(self.params["joy_pause_button"]): self._toggle_pause,
        }  # type: ignore[arg-type]
        for index in pressed:
            if index in actions:
                try:
                    with self._lock:
                        self.get_logger().info(f"gamepad button {index}: {actions[index]()}")
                except (TransitionError, ValueError) as exc:
                    self.get_logger().warning(f"gamepad button {index} ignored: {exc}")

    def _toggle_pause(self) -> str:
        return self._resume() if self.session.state is SessionState.PAUSED else self._pause()

    def _on_success(self, msg: Bool) -> None:
        self._sim_success = bool(msg.data)

    # --- the session clock ----------------------------------------------------------------------------------------
    def _ready_to_start(self) -> bool:
        self._waiting_for -= subscriber_nodes(self, topics.EPISODE_EVENTS)
        if self._waiting_for:
            self.get_logger().info(
                f"session waits for {sorted(self._waiting_for)} to listen to {topics.EPISODE_EVENTS}",
                throttle_duration_sec=10.0,
            )
            return False
        return True

    def _on_timer(self) -> None:
        with self._lock:
            if not self._session_started:
                if not self._ready_to_start():
                    return
                self._session_started = True
                self._apply(self.session.request_reset(self._now(), "session start"))
            success, self._sim_success = self._sim_success, False
            self._apply(self.session.tick(self._now(), success))
            timeout = float(self.params["reset_timeout"])  # type: ignore[arg-type]
            started = self._reset_started
            if started is not None and time.monotonic() - started > timeout:
                # A call nobody answers (a lost request, a reset service that died) would hold the session forever.
                abandoned = self._reset_call
                self._reset_failed(f"no answer within reset_timeout ({timeout:g} s)")
                if abandoned is not None:
                    abandoned.cancel()
            retry_at = self._reset_retry_at
            if (
                self.session.wants_reset
                and self._reset_call is None
                and (retry_at is None or time.monotonic() >= retry_at)
            ):
                self._start_reset()
            self._publish_status()

    def _start_reset(self) -> None:
        task = self.session.next_task()
        if self._sim_reset.service_is_ready():
            future = self._sim_reset.call_async(ResetEpisode.Request(task=task, seed=-1))
        elif self._home.service_is_ready():
            future = self._home.call_async(Trigger.Request())
        else:
            return  # try again on the next tick, once a reset service is up
        self._reset_call = future
        self._reset_started = time.monotonic()
        future.add_done_callback(lambda f: self._reset_finished(f, task))

    def _reset_failed(self, why: str) -> None:
        """The reset in progress failed or was abandoned: the next try waits RESET_RETRY_FIRST s, doubling with
        each consecutive failure up to RESET_RETRY_MAX (an operator reset request tries at once)."""
        self._reset_call = None
        self._reset_started = None
        self._reset_error = why
        self._reset_failures += 1
        delay = min(RESET_RETRY_MAX, RESET_RETRY_FIRST * 2.0 ** (self._reset_failures - 1))
        self._reset_retry_at = time.monotonic() + delay
        self.get_logger().error(f"reset failed: {why}; trying again in {delay:g} s")

    def _reset_finished(self, future: Future, task: str) -> None:
        with self._lock:
            if future is not self._reset_call:
                # Abandoned at reset_timeout and cancelled (rclpy then drops its answer): this is the cancellation.
                return
            result = future.result()
            if result is None or not getattr(result, "success", False):
                self._reset_failed(str(getattr(result, "message", "no response")))
                return
            self._reset_call = None
            self._reset_started = None
            self._reset_error = None
            self._reset_failures = 0
            self._reset_retry_at = None
            instruction = getattr(result, "instruction", "") or task.replace("-v3", "").replace("-", " ")
            task = getattr(result, "task", "") or task
            self._sim_success = False
            # The simulator answers with its new scene's stamp (its first /clock tick, which this node may not
            # have seen yet): the episode, and its timeout, start there. A robot's homing answers now.
            scene = getattr(result, "stamp", None)
            start = max(self._now(), time_to_ns(scene) * 1e-9 if scene is not None else 0.0)
            # The simulator names the layout seed it reset with, which START passes on so the store records
            # it; a robot's homing (Trigger) has none.
            seed = int(getattr(result, "seed", -1))
            self._apply(self.session.reset_done(start, task, instruction, seed if seed >= 0 else -1))

    # --- outputs --------------------------------------------------------------------------------------------------
    def _policy_running(self) -> bool:
        return self.session.state == SessionState.RUNNING and self.params["source"] == "policy"

    def _on_engaged(self, msg: Bool) -> None:
        with self._lock:
            held = bool(msg.data)
            if held and not self._takeover_held and self._policy_running():
                self._takeovers += 1
            changed = held != self._takeover_held
            self._takeover_held = held
        if changed:
            self._publish_overlay_markers()

    def _apply(self, events: list[SessionEvent]) -> None:
        for event in events:
            if event.type == "start":
                self._takeovers = int(self._takeover_held and self.params["source"] == "policy")
            msg = EpisodeEvent(
                type=EVENT_CODES[event.type],
                episode_id=event.episode_id,
                outcome=OUTCOME_CODES[event.outcome],
                label_source=SOURCE_CODES[event.label_source],
                task=event.task,
                instruction=event.instruction,
                note=event.note,
                source=str(self.params["source"]),
                policy_version=self._policy_version,
                scene_seed=event.scene_seed,
            )
            if event.type == "start" and self.session.episode is not None:
                # START carries the episode's start time: the policy acts on the observation of that moment.
                msg.header.stamp = to_time_msg(self.session.episode.started)
            else:
                msg.header.stamp = self.get_clock().now().to_msg()
            self._event_pub.publish(msg)
            if event.type in ("end", "label"):
                self.get_logger().info(
                    f"episode {event.episode_id} {event.type}: {event.outcome} ({event.label_source}); "
                    f"{self.session.counters.successes}/{self.session.counters.done} successes"
                )
        if events:
            self._publish_overlay_markers()

    def _summary(self) -> tuple[str, str]:
        last = self.session.last
        outcome = last.outcome if last else ""
        counters = self.session.counters
        text = (
            f"{self.session.state.name.lower()} | last: {outcome or '-'}"
            f" | success {counters.successes}/{counters.done} ({100 * counters.success_rate:.0f}%)"
        )
        if self._policy_running() and self._takeovers:
            text += f" | takeovers {self._takeovers}"
            if self._takeover_held:
                return f"OPERATOR TAKEOVER | {text}", "takeover"
        return text, outcome

    def _publish_status(self) -> None:
        counters = self.session.counters
        episode = self.session.episode
        last = self.session.last
        msg = SessionStatus(
            state=self.session.state.value,
            episode_id=episode.episode_id if episode else "",
            episode_index=counters.started,
            episodes_done=counters.done,
            successes=counters.successes,
            success_rate=counters.success_rate,
            task=episode.task if episode else "",
            instruction=episode.instruction if episode else "",
            last_outcome=OUTCOME_CODES[last.outcome] if last else 0,
            message="finished" if self.session.finished else "",
        )
        msg.header.stamp = self.get_clock().now().to_msg()
        self._status_pub.publish(msg)

    def _statuses(self) -> list[Status]:
        with self._lock:
            counters = self.session.counters
            episode = self.session.episode
            started = self._reset_started
            snapshot = SessionSnapshot(
                state=self.session.state.name.lower(),
                finished=self.session.finished,
                waiting_for=sorted(self._waiting_for),
                reset_running=None if started is None else time.monotonic() - started,
                reset_timeout=float(self.params["reset_timeout"]),  # type: ignore[arg-type]
                reset_error=self._reset_error,
                reset_retry_in=None
                if self._reset_retry_at is None
                else self._reset_retry_at - time.monotonic(),
                reset_service=self._sim_reset.service_is_ready() or self._home.service_is_ready(),
                wants_reset=self.session.wants_reset,
                counters={
                    "episode_id": episode.episode_id if episode else "",
                    "episode_index": counters.started,
                    "episodes_done": counters.done,
                    "successes": counters.successes,
                    "success_rate": counters.success_rate,
                },
            )
        return [session_status(self.get_name(), snapshot)]

    def _publish_overlay_markers(self) -> None:
        text, outcome = self._summary()
        marker = Marker(ns="irevla_session", id=0, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD, text=text)
        marker.header.frame_id = "base"
        marker.header.stamp = self.get_clock().now().to_msg()
        marker.pose.position.z = 1.0
        marker.pose.orientation.w = 1.0
        marker.scale.z = 0.06
        marker.color.r, marker.color.g, marker.color.b = OUTCOME_COLOURS.get(outcome, (1.0, 1.0, 1.0))
        marker.color.a = 1.0
        self._marker_pub.publish(MarkerArray(markers=[marker]))

    def _on_image(self, msg: Image) -> None:
        if self._overlay_pub.get_subscription_count() == 0:
            return
        try:
            image = np.ascontiguousarray(msg_to_image(msg))
        except ImageFormatError as exc:
            self.get_logger().error(f"overlay: bad camera image: {exc}", throttle_duration_sec=5.0)
            return
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            self.get_logger().error(
                f"overlay: bad camera image: expected 8-bit colour, got {msg.encoding} {image.shape}",
                throttle_duration_sec=5.0,
            )
            return
        text, outcome = self._summary()
        r, g, b = (int(255 * c) for c in OUTCOME_COLOURS.get(outcome, (1.0, 1.0, 1.0)))
        scale = max(0.25, image.shape[1] / 900)
        cv2.rectangle(image, (0, 0), (image.shape[1], int(28 * scale) + 4), (0, 0, 0), -1)
        cv2.putText(
            image, text, (3, int(22 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (r, g, b), 1, cv2.LINE_AA
        )
        self._overlay_pub.publish(image_to_msg(image, msg.header.stamp, msg.header.frame_id))


def main(args: list[str] | None = None) -> int:
    return run_nodes(lambda context: [EpisodeManagerNode(context=context)], args)
