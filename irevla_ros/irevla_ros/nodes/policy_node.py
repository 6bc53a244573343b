"""Policy node: at the control rate, assemble the observation, run the active policy, publish the action and the
per-step record.

The tick of time t observes, of every configured camera, the arm's end-effector pose, its gripper and the
simulator's expert action, the newest message stamped no later than t (`observation.assemble` then checks each
frame is no older than `max_image_age`, all within `max_camera_skew` of each other, the pose no older than
`max_state_age`), and its action and step record are stamped t. Under simulated time a tick whose inputs of t
have not all arrived yet (DDS does not order them before /clock t) waits for them, at most SIM_INPUT_WAIT wall
seconds. A START event carries the episode's first moment; a tick of that moment that ran before START arrived
is run again at once. Anything missing, stale, malformed or non-finite turns the tick into a hold
(`observation.decide`): the arm keeps still, the reason is logged, the step record says `hold`, and the node
keeps running. Step indices are consecutive within an episode; when the episode manager ends an episode the node
publishes STEPS_DONE with the number of records it emitted.

Teleoperation: the scripted_expert policy follows the ArmCommands of `expert_command_topic` (the simulator's expert,
or /teleop/command for teleoperated demonstrations, where a command with hold set, the deadman released, or one
older than `teleop_max_age`, holds the tick). Otherwise /teleop/command is the operator's takeover: a tick whose
newest teleop command (stamped no later than it, no older than `teleop_max_age`) is engaged acts with the
operator's command instead of the policy's (a hold while the deadman is released) and records
`intervention=true`; the first tick without one hands back. Under simulated time the teleop command is one more
input a tick waits for, once one has arrived (never on a graph without teleop).

Cameras are subscribed best-effort (REP-2003: the drivers publish reliable). Status: "<name>: control" on
/diagnostics and, for the tools that read it there, /policy/status (the same DiagnosticArray): the age of each
input against the policy's own limits, missed ticks, ticks that overran the control period, holds and their
reason (levels in `irevla_ros.diagnostics`), and the cumulative counters.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
from geometry_msgs.msg import PoseStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock as RosClock
from rclpy.clock import ClockType
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_srvs.srv import Trigger

from irevla_interfaces.msg import ArmCommand, EpisodeEvent, PolicyVersion, StepRecord
from irevla_interfaces.srv import SelectPolicyVersion
from irevla_ros import topics
from irevla_ros.diagnostics import EVENT_WINDOW, EventWindow, InputAge, PolicySnapshot, Status, policy_status
from irevla_ros.node_parameters import POLICY
from irevla_ros.nodes.common import (
    LATCHED_QOS,
    RELIABLE_QOS,
    SENSOR_QOS,
    RosTimePeriodic,
    declare_parameters,
    image_to_msg,
    msg_to_image,
    run_nodes,
    time_to_ns,
)
from irevla_ros.nodes.diagnostics_publisher import DiagnosticsPublisher
from irevla_ros.observation import (
    PROPRIOCEPTION_NAMES,
    ArmState,
    Decision,
    Frame,
    HoldTick,
    ObservationRules,
    assemble,
    check_action,
    decide,
    holding,
)
from irevla_ros.policies import make_policy_slot_parts
from irevla_ros.policies.base import EXPERT_ACTION_KEY, Observation, Policy, PolicyOutput
from irevla_ros.policies.slot import PolicySlot
from irevla_ros.teleop.mapping import ENGAGED

# Messages kept per input: the tick of time t uses the newest one stamped no later than t, so an input of a later
# period that arrived first (the world moved on while the tick waited) is never observed from the past.
INPUT_HISTORY = 4
# Under simulated time the sim cell publishes everything observed at t (frames, arm state, the expert's action)
# before /clock t, but DDS does not order messages across topics: /clock t can arrive before the pose of t, and
# the tick then acted on the previous period's pose. Such a tick waits for the inputs stamped for it, at most this
# long (wall seconds, well under the cell's max_wall_wait), then runs with what it has and holds if that is stale.
SIM_INPUT_WAIT = 1.0

T = TypeVar("T")


def newest_until(history: Sequence[T], now_ns: int, stamp_ns: Callable[[T], int]) -> T | None:
    """The newest message of `history` (oldest first) stamped no later than `now_ns`."""
    for item in reversed(history):
        if stamp_ns(item) <= now_ns:
            return item
    return None


def _header_ns(msg: Image | PoseStamped) -> int:
    return time_to_ns(msg.header.stamp)


@dataclass
class ActiveEpisode:
    episode_id: str
    instruction: str
    steps: int = 0


def camera_name(topic: str) -> str:
    """'/camera/camera/color/image_raw' -> 'camera'; '/wrist/wrist/color/image_raw' -> 'wrist'."""
    parts = [p for p in topic.split("/") if p]
    return parts[0] if parts else "camera"


class PolicyNode(Node):
    def __init__(self, name: str = "policy", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        p = declare_parameters(self, POLICY)
        self.params = p
        self.slot = PolicySlot(*make_policy_slot_parts(p))
        self.period = float(p["control_period"])  # type: ignore[arg-type]
        self.topics = list(p["cameras"])  # type: ignore[arg-type]
        self.names = [camera_name(t) for t in self.topics]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"camera topics {self.topics} do not have distinct camera names")
        self._rules = ObservationRules(
            cameras=tuple(self.names),
            image_width=int(p["image_width"]),  # type: ignore[arg-type]
            image_height=int(p["image_height"]),  # type: ignore[arg-type]
            max_image_age=float(p["max_image_age"]),  # type: ignore[arg-type]
            max_camera_skew=float(p["max_camera_skew"]),  # type: ignore[arg-type]
            max_state_age=float(p["max_state_age"]),  # type: ignore[arg-type]
        )
        self._lock = threading.Lock()
        self._frames: dict[str, deque[Image]] = {c: deque(maxlen=INPUT_HISTORY) for c in self.names}
        self._poses: deque[PoseStamped] = deque(maxlen=INPUT_HISTORY)
        self._grippers: deque[tuple[int, float]] = deque(maxlen=INPUT_HISTORY)  # (stamp ns, opening)
        self._experts: deque[tuple[int, np.ndarray, bool]] = deque(
            maxlen=INPUT_HISTORY
        )  # (stamp ns, action, hold)
        # (stamp ns, action, hold, engaged) of the operator's /teleop/command (takeovers)
        self._teleops: deque[tuple[int, np.ndarray, bool, bool]] = deque(maxlen=INPUT_HISTORY)
        self.expert_topic = str(p["expert_command_topic"])
        self.teleop_max_age_ns = round(float(p["teleop_max_age"]) * 1e9)  # type: ignore[arg-type]
        # A demonstration by teleop: the scripted expert follows the operator, so there is nothing to take over.
        # Any other policy (the robot profiles' vla) takes teleop as takeovers whatever expert_command_topic says.
        self._teleop_expert = self.expert_topic == topics.TELEOP_COMMAND and p["policy"] == "scripted_expert"
        self.intervention_steps = 0
        self.takeovers = 0
        self._taken_over = False  # the previous tick of this episode acted with the operator's command
        self.episode: ActiveEpisode | None = None
        self.missed_ticks = 0
        self.holds = 0
        self.steps_published = 0
        self._last_tick: float | None = None
        self._idle_tick_ns: int | None = None  # ROS time of the newest tick that found no episode running
        self._sim_time = bool(self.get_parameter("use_sim_time").value)
        self._pending_ns: int | None = None  # a simulated-time tick waiting for its inputs
        self._pending_since = 0.0
        self._late: set[str] = set()  # inputs that missed a wait: not waited for until they are current again
        # Ticks run from the ticker, from START and from the input that completes a waiting tick.
        self._tick_lock = threading.RLock()
        self._last_hold_reason = ""
        # Diagnostics, over the last EVENT_WINDOW wall seconds: ticks run in an episode (value: their
        # computation time), ticks missed, ticks that held.
        self._started = time.monotonic()
        self._recent_ticks = EventWindow(EVENT_WINDOW)
        self._recent_missed = EventWindow(EVENT_WINDOW)
        self._recent_holds = EventWindow(EVENT_WINDOW)
        inputs = MutuallyExclusiveCallbackGroup()
        for topic, cam in zip(self.topics, self.names, strict=True):
            self.create_subscription(
                Image, topic, lambda m, c=cam: self._store_frame(c, m), SENSOR_QOS, callback_group=inputs
            )
        self.create_subscription(PoseStamped, topics.EE_POSE, self._on_pose, 10, callback_group=inputs)
        self.create_subscription(JointState, topics.GRIPPER_STATE, self._on_joints, 10, callback_group=inputs)
        self.create_subscription(ArmCommand, self.expert_topic, self._on_expert, 10, callback_group=inputs)
        if not self._teleop_expert:  # teleop as the expert already drives every tick: nothing to take over
            self.create_subscription(
                ArmCommand, topics.TELEOP_COMMAND, self._on_teleop, 10, callback_group=inputs
            )
        control = MutuallyExclusiveCallbackGroup()
        self.create_subscription(
            EpisodeEvent, topics.EPISODE_EVENTS, self._on_event, RELIABLE_QOS, callback_group=control
        )
        self._action_pub = self.create_publisher(ArmCommand, topics.ACTION, 10)
        self._record_pub = self.create_publisher(StepRecord, topics.STEP_RECORDS, RELIABLE_QOS)
        self._event_pub = self.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
        self._ticker = RosTimePeriodic(self, self.period, self._on_tick, callback_group=control)
        steady = RosClock(clock_type=ClockType.STEADY_TIME)
        # One-shot (reset when a tick starts waiting): the bound on that wait, in wall time.
        self._wait_timer = self.create_timer(
            SIM_INPUT_WAIT, self._on_wait_timeout, callback_group=control, clock=steady
        )
        self._wait_timer.cancel()
        # In the control group: a status never sees a tick half done.
        self.diagnostics = DiagnosticsPublisher(
            self, self._statuses, also=(topics.POLICY_STATUS,), callback_group=control
        )
        versions = ReentrantCallbackGroup()
        self.create_subscription(
            PolicyVersion, topics.POLICY_VERSION, self._on_version, LATCHED_QOS, callback_group=versions
        )
        self.create_service(Trigger, topics.ROLLBACK, self._on_rollback, callback_group=versions)
        self.create_service(
            SelectPolicyVersion, topics.SELECT_VERSION, self._on_select, callback_group=versions
        )
        self._reported_events = 0
        # Wall clock: loading reports must come out while simulated time is paused too.
        self.create_timer(
            0.2,
            self._report_slot_events,
            callback_group=versions,
            clock=RosClock(clock_type=ClockType.STEADY_TIME),
        )
        self.get_logger().info(
            f"policy {self.policy.name} ({self.policy.version}) at {1 / self.period:.1f} Hz on {self.topics}"
        )

    @property
    def policy(self) -> Policy:
        return self.slot.active

    def close(self) -> None:
        """At shutdown (run_nodes, after the executor stopped): loads stopped and joined, sessions released."""
        stuck = self.slot.close()
        if stuck:
            self.get_logger().warning(f"loading of {', '.join(stuck)} did not stop in time")

    # --- versions (hot swap) ----------------------------------------------------------------------------------------
    def _on_version(self, msg: PolicyVersion) -> None:
        if not self._takes_versions():
            return
        kind = "heads-only" if msg.heads_only else "full"
        self.get_logger().info(
            f"version {msg.version_id} announced ({msg.stage}, {kind}): loading in the background"
        )
        # The announcement's heads_only must agree with the store; the loader refuses the version otherwise.
        # Validated at idle priority while an episode runs (the ticks come first), at normal priority between them.
        self.slot.request(msg.version_id, heads_only=bool(msg.heads_only), idle=self.episode is not None)

    def _takes_versions(self) -> bool:
        return self.params["policy"] == "vla"

    def _on_rollback(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            version = self.slot.rollback()
            response.success, response.message = True, f"rolling back to {version} at the next tick"
        except ValueError as exc:
            response.success, response.message = False, str(exc)
        return response

    def _on_select(
        self, request: SelectPolicyVersion.Request, response: SelectPolicyVersion.Response
    ) -> SelectPolicyVersion.Response:
        if not request.version_id:
            result = self._on_rollback(Trigger.Request(), Trigger.Response())
            response.success, response.message = result.success, result.message
        elif not self._takes_versions():
            response.success, response.message = False, f"policy {self.params['policy']!r} takes no versions"
        else:
            # Loading and validation take seconds: the node never waits for them. The outcome (swapped at a tick,
            # or refused with the reason) is logged and shows in /policy/status.
            self.slot.request(request.version_id)
            response.success = True
            response.message = (
                f"loading {request.version_id}: it replaces {self.policy.version} at a tick if valid"
            )
        response.active_version = self.policy.version
        return response

    def _report_slot_events(self) -> None:
        for event in self.slot.events[self._reported_events :]:
            if event.kind == "rejected":
                self.get_logger().error(
                    f"version {event.version} refused, {self.policy.version} stays: {event.detail}"
                )
            elif event.kind == "loaded":
                note = f" ({event.detail})" if event.detail else ""
                self.get_logger().info(
                    f"version {event.version} loaded and validated in {event.seconds:.2f} s{note}"
                )
            elif event.kind == "swapped":
                self.get_logger().info(
                    f"version {event.version}: swapped in, {event.seconds:.2f} s after it was requested"
                )
            else:
                self.get_logger().info(f"version {event.version}: {event.kind}")
            self._reported_events += 1

    # --- inputs ---------------------------------------------------------------------------------------------------
    def _store_frame(self, camera: str, msg: Image) -> None:
        with self._lock:
            self._frames[camera].append(msg)
        self._input_arrived()

    def _on_pose(self, msg: PoseStamped) -> None:
        with self._lock:
            self._poses.append(msg)
        self._input_arrived()

    def _on_joints(self, msg: JointState) -> None:
        if "gripper_opening" in msg.name and len(msg.position) == len(msg.name):
            gripper = float(msg.position[msg.name.index("gripper_opening")])
            with self._lock:
                self._grippers.append((time_to_ns(msg.header.stamp), gripper))
            self._input_arrived()
        else:
            self.get_logger().error(
                f"malformed {topics.GRIPPER_STATE}: names and positions differ or no gripper_opening",
                throttle_duration_sec=5.0,
            )

    def _on_expert(self, msg: ArmCommand) -> None:
        action = np.array([*msg.ee_delta, msg.gripper], dtype=np.float32)
        with self._lock:
            self._experts.append((time_to_ns(msg.header.stamp), action, bool(msg.hold)))
        self._input_arrived()

    def _on_teleop(self, msg: ArmCommand) -> None:
        action = np.array([*msg.ee_delta, msg.gripper], dtype=np.float32)
        engaged = msg.policy_version == ENGAGED
        with self._lock:
            self._teleops.append((time_to_ns(msg.header.stamp), action, bool(msg.hold), engaged))
        self._input_arrived()

    # --- waiting for the inputs of a simulated-time tick ------------------------------------------------------------
    def _lagging(self, now_ns: int) -> list[str]:
        """The inputs a tick at `now_ns` waits for: each one that has ever arrived but has no message stamped
        `now_ns` or later yet (per topic, DDS keeps the publisher's order), unless it already missed a wait."""
        with self._lock:
            newest: dict[str, int | None] = {
                **{cam: max(map(_header_ns, h), default=None) for cam, h in self._frames.items()},
                "ee_pose": max(map(_header_ns, self._poses), default=None),
                "gripper_state": max((g[0] for g in self._grippers), default=None),
                "expert_action": max((e[0] for e in self._experts), default=None),
                "teleop": max((e[0] for e in self._teleops), default=None),
            }
        lagging = []
        for name, stamp in newest.items():
            if stamp is None:
                continue
            if stamp >= now_ns:
                self._late.discard(name)
            elif name not in self._late:
                lagging.append(name)
        return lagging

    def _input_arrived(self) -> None:
        if self._pending_ns is None:
            return
        with self._tick_lock:
            if self._pending_ns is not None and not self._lagging(self._pending_ns):
                self._run_pending()

    def _on_wait_timeout(self) -> None:
        with self._tick_lock:
            if self._pending_ns is None:
                self._wait_timer.cancel()
                return
            if time.monotonic() - self._pending_since < 0.99 * SIM_INPUT_WAIT:
                return  # a late fire meant for an earlier wait: this one's comes a period later
            lagging = self._lagging(self._pending_ns)
            self._late.update(lagging)
            self.get_logger().warning(
                f"inputs {lagging} of t={self._pending_ns * 1e-9:.3f} s did not arrive within {SIM_INPUT_WAIT} s "
                "(wall): the tick runs with what it has",
                throttle_duration_sec=5.0,
            )
            self._run_pending()

    def _run_pending(self) -> None:
        assert self._pending_ns is not None
        now_ns, self._pending_ns = self._pending_ns, None
        self._wait_timer.cancel()
        self._tick(now_ns)

    def _drop_pending(self) -> None:
        self._pending_ns = None
        self._wait_timer.cancel()

    def _on_event(self, msg: EpisodeEvent) -> None:
        with self._tick_lock:
            self._handle_event(msg)

    def _handle_event(self, msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.START:
            self._drop_pending()  # a tick of the previous episode still waiting: that episode is over
            if self.episode is not None:
                self._finish_episode()
            self.episode = ActiveEpisode(msg.episode_id, msg.instruction)
            self._taken_over = False
            self.policy.reset(msg.instruction)
            self._last_tick = None
            start_ns = time_to_ns(msg.header.stamp)
            tolerance_ns = 0.01 * self.period * 1e9
            ran_idle = self._idle_tick_ns is not None and abs(self._idle_tick_ns - start_ns) < tolerance_ns
            if ran_idle and abs(self._ticker.now_ns() - start_ns) < tolerance_ns:
                # The tick of the episode's first moment already ran, idle, before START arrived (in simulation
                # the new scene's /clock precedes the reset's answer, and the clock waits for this command):
                # act on that moment now rather than a period later.
                self._begin_tick(start_ns)
        elif (
            msg.type == EpisodeEvent.END
            and self.episode is not None
            and msg.episode_id == self.episode.episode_id
        ):
            self._drop_pending()  # the episode ended at that moment: no step after it
            self._finish_episode()

    def _finish_episode(self) -> None:
        assert self.episode is not None
        done = EpisodeEvent(
            type=EpisodeEvent.STEPS_DONE,
            episode_id=self.episode.episode_id,
            num_steps=self.episode.steps,
            policy_version=self.policy.version,
        )
        done.header.stamp = self.get_clock().now().to_msg()
        self._event_pub.publish(done)
        self.episode = None

    # --- the control tick -----------------------------------------------------------------------------------------
    def _observation(self, now_ns: int) -> tuple[Observation, dict[str, Image]]:
        """The observation of the tick at `now_ns` from the newest inputs stamped no later than it, and the
        frame messages it used."""
        with self._lock:
            histories = {cam: list(self._frames[cam]) for cam in self.names}
            pose = newest_until(self._poses, now_ns, _header_ns)
            gripper = newest_until(self._grippers, now_ns, lambda g: g[0])
            expert = newest_until(self._experts, now_ns, lambda e: e[0])
        used: dict[str, Image] = {}
        frames: dict[str, Frame | None] = {}
        for cam in self.names:
            msg = newest_until(histories[cam], now_ns, _header_ns)
            if msg is None and histories[cam]:
                ahead = (_header_ns(histories[cam][0]) - now_ns) * 1e-9
                raise HoldTick(
                    f"camera {cam!r}: every frame is newer than the tick (by {ahead:.3f} s or more)"
                )
            if msg is None:
                continue
            frames[cam] = Frame(lambda m=msg: msg_to_image(m), _header_ns(msg) * 1e-9)
            used[cam] = msg
        arm = None
        if pose is not None and gripper is not None:
            p = pose.pose.position
            arm = ArmState((p.x, p.y, p.z), gripper[1], _header_ns(pose) * 1e-9)
        if expert is not None and self._teleop_expert:
            if expert[2]:
                raise HoldTick("teleop: deadman released")
            if now_ns - expert[0] > self.teleop_max_age_ns:
                raise HoldTick(f"teleop: newest command {(now_ns - expert[0]) * 1e-9:.3f} s old")
        extras = {EXPERT_ACTION_KEY: expert[1]} if expert is not None else {}
        assert self.episode is not None
        now = now_ns * 1e-9
        return assemble(self._rules, frames, arm, self.episode.instruction, now, extras), used

    def _on_tick(self) -> None:
        with self._tick_lock:
            if self._pending_ns is not None:
                self._run_pending()  # a newer period began before its inputs came: act on what arrived
            self._begin_tick(self._ticker.now_ns())

    def _begin_tick(self, now_ns: int) -> None:
        """Run the tick of `now_ns` now, or, under simulated time, once the inputs stamped for it are in."""
        if self.episode is not None and self._sim_time and self._lagging(now_ns):
            self._pending_ns, self._pending_since = now_ns, time.monotonic()
            self._wait_timer.reset()
            return
        self._tick(now_ns)

    def _tick(self, now_ns: int) -> None:
        started = time.monotonic()
        now = now_ns * 1e-9
        swapped = self.slot.take_swap()  # between two ticks: this tick acts with the new version
        if swapped is not None and self.episode is not None:
            swapped.reset(self.episode.instruction)
        if self.episode is None:
            self._last_tick = None
            self._idle_tick_ns = now_ns
            return
        self._idle_tick_ns = None
        if self._last_tick is not None and now - self._last_tick > 1.5 * self.period:
            missed = round((now - self._last_tick) / self.period) - 1
            self.missed_ticks += missed
            self._recent_missed.add(started, missed)
            self.get_logger().warning(
                f"missed {missed} control tick(s): {now - self._last_tick:.3f} s since the previous tick "
                f"(step {self.episode.steps})",
                throttle_duration_sec=1.0,
            )
        self._last_tick = now
        obs: Observation | None = None
        frames: dict[str, Image] = {}
        teleop = self._takeover(now_ns)
        if teleop is not None and not self._taken_over:
            self.takeovers += 1
            self.get_logger().info(f"operator takes over at step {self.episode.steps}")
        elif teleop is None and self._taken_over:
            self.get_logger().info(f"operator hands back at step {self.episode.steps}")
        self._taken_over = teleop is not None
        try:
            obs, frames = self._observation(now_ns)
        except HoldTick as exc:
            decision = holding(str(exc))
        else:
            if teleop is None:
                decision = decide(self.policy, obs)  # the direct rollout decides with the same function
            elif teleop[2]:
                decision = holding("teleop: deadman released during a takeover")
            else:
                try:
                    decision = Decision(check_action(PolicyOutput(teleop[1])), PolicyOutput(teleop[1]))
                except HoldTick as exc:
                    decision = holding(f"teleop: {exc}")
        if teleop is not None:
            self.intervention_steps += 1
        self._publish(now_ns, obs, frames, decision, intervention=teleop is not None)
        finished = time.monotonic()
        self._recent_ticks.add(finished, finished - started)
        if decision.hold:
            self._recent_holds.add(finished)

    def _takeover(self, now_ns: int) -> tuple[int, np.ndarray, bool, bool] | None:
        """The operator's engaged teleop command for the tick at `now_ns`, if the operator holds the arm."""
        with self._lock:
            teleop = newest_until(self._teleops, now_ns, lambda e: e[0])
        if teleop is None or not teleop[3] or now_ns - teleop[0] > self.teleop_max_age_ns:
            return None
        return teleop

    def _publish(
        self,
        now_ns: int,
        obs: Observation | None,
        frames: dict[str, Image],
        decision: Decision,
        intervention: bool = False,
    ) -> None:
        assert self.episode is not None
        # The tick's own time, the moment the observation is of: the node clock may lag the /clock message that
        # triggered the tick (two steps then shared a stamp, and the frames of the second were "from the future").
        sec, nanosec = divmod(now_ns, 1_000_000_000)
        stamp = TimeMsg(sec=sec, nanosec=nanosec)
        hold, action, output, hold_reason = (
            decision.hold,
            decision.action,
            decision.output,
            decision.hold_reason,
        )
        if hold:
            self.holds += 1
            if hold_reason != self._last_hold_reason:
                self.get_logger().warning(f"hold: {hold_reason}")
        self._last_hold_reason = hold_reason
        command = ArmCommand(
            ee_delta=[float(x) for x in action[:3]],
            gripper=float(action[3]),
            hold=hold,
            episode_id=self.episode.episode_id,
            step_index=self.episode.steps,
            policy_version=self.policy.version,
        )
        command.header.stamp = stamp
        command.header.frame_id = "base"
        self._action_pub.publish(command)
        record = StepRecord(
            episode_id=self.episode.episode_id,
            step_index=self.episode.steps,
            instruction=self.episode.instruction,
            action=[float(x) for x in action],
            policy_version=self.policy.version,
            hold=hold,
            intervention=intervention,
            proprioception_names=list(PROPRIOCEPTION_NAMES),
        )
        record.header.stamp = stamp
        if obs is not None:
            record.camera_names = list(obs.images)
            # The frame's own frame id, so the stored episode replays the camera topic as it was published.
            record.images = [
                image_to_msg(img, stamp, frames[cam].header.frame_id) for cam, img in obs.images.items()
            ]
            record.image_stamps = [frames[cam].header.stamp for cam in obs.images]
            record.proprioception = [float(x) for x in obs.proprioception]
        if output is not None and output.log_prob is not None:
            record.has_log_prob, record.log_prob = True, float(output.log_prob)
        if output is not None and output.value is not None:
            record.has_value, record.value = True, float(output.value)
        self._record_pub.publish(record)
        self.episode.steps += 1
        self.steps_published += 1

    def _input_ages(self) -> tuple[InputAge, ...]:
        """Age (ROS s) of the newest message of each input the observation needs, with the policy's own limit."""
        now_ns = self.get_clock().now().nanoseconds

        def age(stamps: list[int]) -> float | None:
            return (now_ns - max(stamps)) * 1e-9 if stamps else None

        with self._lock:
            cameras = {cam: [_header_ns(m) for m in self._frames[cam]] for cam in self.names}
            poses = [_header_ns(m) for m in self._poses]
            grippers = [g[0] for g in self._grippers]
        rules = self._rules
        return (
            *(InputAge(f"camera {cam}", age(stamps), rules.max_image_age) for cam, stamps in cameras.items()),
            InputAge("ee_pose", age(poses), rules.max_state_age),
            InputAge("gripper_state", age(grippers), rules.max_state_age),
        )

    def _statuses(self) -> list[Status]:
        now = time.monotonic()
        durations = self._recent_ticks.values(now)
        snapshot = PolicySnapshot(
            policy=self.policy.name,
            version=self.policy.version,
            in_episode=self.episode is not None,
            inputs=self._input_ages(),
            since_start=now - self._started,
            period=self.period,
            ticks=len(durations),
            missed=int(sum(self._recent_missed.values(now))),
            overruns=sum(d > self.period for d in durations),
            slowest_tick=max(durations, default=None),
            holds=self._recent_holds.count(now),
            hold_reason=self._last_hold_reason or None,
            counters={
                "missed_ticks": self.missed_ticks,
                "holds": self.holds,
                "steps_published": self.steps_published,
                "intervention_steps": self.intervention_steps,
                "takeovers": self.takeovers,
                "policy_version": self.policy.version,
                "encoder_version": str(getattr(self.policy, "encoder_version", self.policy.version)),
            },
        )
        return [policy_status(self.get_name(), snapshot)]


def main(args: list[str] | None = None) -> int:
    return run_nodes(lambda context: [PolicyNode(context=context)], args)
