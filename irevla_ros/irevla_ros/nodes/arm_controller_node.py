"""Arm controller node: policy actions in, safe Cartesian targets out to an arm backend (sim, franky, ...).

Every command passes the one SafetyLayer (workspace box, step and speed limits, gripper range, NaN/inf
rejection, watchdog, latched e-stop). The node never imports a concrete backend: `backend` picks one from the
registry; a backend that needs ROS pub/sub itself (`needs_transport`: the servo backend) gets the node's rclpy
transport (`ros_servo_transport.py`) and the node's frames. Serves ~/estop, ~/clear_estop, ~/reset_home.

The robot state it publishes is the standard one: /joint_states with the driver's own joint names (sim: the
Sawyer's MuJoCo joints right_j0..6 and fingers r_close, l_close; franky: fr3_joint1..7 and fr3_finger_joint1/2 in
metres; ur_rtde: the UR joint names), /tf with `base_frame` -> `ee_frame` (tf2_msgs/TFMessage), ~/ee_pose
(PoseStamped in `base_frame`), ~/gripper_state (JointState "gripper_opening", 0 closed .. 1 open: what the policy
reads) and /diagnostics ("<name>: arm": e-stop latched -> ERROR with its reason, a disconnected backend, the
age of the newest robot state, commands the safety layer refused, why the arm holds; levels in
`irevla_ros.diagnostics`). A backend whose driver already publishes /joint_states and /tf (the servo backend:
`publishes_robot_state` False) leaves those two to it.

The state (joints, pose) goes out at `state_rate` on the node's own ticker, or, where something else knows when
the world has moved (the simulated cell, after each control period and before its /clock), whenever that driver
calls `publish_state`: then the policy's tick at time t sees the arm at t, not a period late. Likewise the
simulated cell hands in its own clock (`time_source`) for the safety layer's timing: a command for the tick at t
then is timed at t even when this node's /clock subscription has not yet seen t (the speed limit would otherwise
measure zero time since the last command and refuse to move).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

import numpy as np
from geometry_msgs.msg import PoseStamped, TransformStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from rclpy.time import Time
from sensor_msgs.msg import JointState
from std_srvs.srv import Trigger

try:  # a system ROS 2 has tf2_msgs; pip-only installs build it (scripts/setup.sh, third_party/tf2_msgs)
    from tf2_msgs.msg import TFMessage
except ImportError:  # pragma: no cover - only without the setup step: no /tf, the rest works
    TFMessage = None

from irevla_interfaces.msg import ArmCommand, EpisodeEvent
from irevla_ros import topics
from irevla_ros.diagnostics import EVENT_WINDOW, ArmSnapshot, EventWindow, Status, arm_status
from irevla_ros.hardware.arm import ARMS, ArmBackend, ArmError, ArmMotionAborted
from irevla_ros.node_parameters import ARM_CONTROLLER
from irevla_ros.nodes.common import (
    RosTimePeriodic,
    declare_parameters,
    listen_to_episodes_once_connected,
    run_nodes,
    time_to_ns,
)
from irevla_ros.nodes.diagnostics_publisher import DiagnosticsPublisher
from irevla_ros.param_spec import ConfigError, ParamValue, from_parameters
from irevla_ros.safety import CommandStatus, SafetyConfigError, SafetyLayer, SafetyLimits

_HOME_TOLERANCE = 0.005  # m
_HOMING_TIMEOUT = 60.0  # s


def backend_parameters(kind: str, params: dict[str, ParamValue]) -> dict[str, ParamValue]:
    """The keyword parameters of backend `kind`: its "<kind>_<keyword>" node parameters, prefix cut, and the
    safety layer's max_speed (a backend's own speed cap must not let it overshoot a streamed target faster
    than the layer allowed)."""
    prefix = f"{kind}_"
    own = {name[len(prefix) :]: value for name, value in params.items() if name.startswith(prefix)}
    return {**own, "max_speed": params["max_speed"]}


class ArmControllerNode(Node):
    def __init__(
        self,
        backend_factory: Callable[[dict[str, ParamValue]], ArmBackend] | None = None,
        name: str = "arm_controller",
        state_publisher: Literal["ticker", "external"] = "ticker",
        time_source: Callable[[], float] | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        if state_publisher not in ("ticker", "external"):
            raise ValueError(f"state_publisher must be 'ticker' or 'external', got {state_publisher!r}")
        self._state_on_ticker = state_publisher == "ticker"
        self._time_source = time_source
        p = declare_parameters(self, ARM_CONTROLLER, apply=self._apply_parameters)
        self.params = p
        try:
            limits = from_parameters(SafetyLimits, p)
        except (
            SafetyConfigError
        ) as exc:  # in range one by one, inconsistent together (e.g. home outside the box)
            raise ConfigError(f"{self.get_fully_qualified_name()}: {exc}") from exc
        self.safety = SafetyLayer(limits)
        if backend_factory is None:
            kind = str(p["backend"])
            if kind == "sim":
                raise ValueError(
                    "arm backend 'sim' runs inside sim_cell_node (it steps the shared simulated cell)"
                )
            factory = ARMS.factory(kind)
            params: dict[str, object] = dict(backend_parameters(kind, p))
            if getattr(factory, "needs_transport", False):
                from irevla_ros.nodes.ros_servo_transport import RclpyServoTransport

                params.update(
                    transport=RclpyServoTransport(self.context, f"{name}_servo_io"),
                    base_frame=p["base_frame"],
                    ee_frame=p["ee_frame"],
                )
            self.backend = factory(**params)
        else:
            self.backend = backend_factory(p)
        self.backend.connect()
        self._lock = threading.Lock()
        self.commands_sent = 0
        self.commands_rejected = 0
        self.holds = 0
        self._last_status = ""
        self._homing: Future | None = None  # set while a reset-to-home is running
        self._homing_deadline = 0.0
        self._quiet_since: float | None = None
        self._reset_at: float | None = None  # ROS time of the newest safety-layer reset
        # Diagnostics: ROS time of the newest robot state published, refusals of the last EVENT_WINDOW (wall).
        self._started = time.monotonic()
        self._state_at: float | None = None
        self._recent_rejections = EventWindow(EVENT_WINDOW)
        self._last_rejection = ""
        self.motion_aborts = 0
        self._recent_aborts = EventWindow(EVENT_WINDOW)
        self._last_abort = ""
        control = MutuallyExclusiveCallbackGroup()
        actions = self.create_subscription(
            ArmCommand, topics.ACTION, self._on_action, 10, callback_group=control
        )
        # A session starts only once the policy's first commands can reach the arm.
        listen_to_episodes_once_connected(self, [actions], self._on_event, control)
        # The driver's own /joint_states and /tf where it publishes them (servo backend): never a second source.
        self._robot_state = bool(getattr(self.backend, "publishes_robot_state", True))
        self._joint_pub = (
            self.create_publisher(JointState, topics.JOINT_STATES, 10) if self._robot_state else None
        )
        self._tf_pub = (
            self.create_publisher(TFMessage, topics.TF, 100)
            if self._robot_state and TFMessage is not None
            else None
        )
        self._gripper_pub = self.create_publisher(JointState, topics.GRIPPER_STATE, 10)
        self._pose_pub = self.create_publisher(PoseStamped, topics.EE_POSE, 10)
        self._ticker = RosTimePeriodic(
            self, 1.0 / float(p["state_rate"]), self._on_timer, callback_group=control
        )  # type: ignore[arg-type]
        self.diagnostics = DiagnosticsPublisher(self, self._statuses, callback_group=control)
        services = ReentrantCallbackGroup()
        self.create_service(Trigger, topics.ESTOP, self._on_estop, callback_group=services)
        self.create_service(Trigger, topics.CLEAR_ESTOP, self._on_clear_estop, callback_group=services)
        self.create_service(Trigger, topics.RESET_HOME, self._on_reset_home, callback_group=services)
        self.get_logger().info(
            f"arm backend {p['backend']} connected; workspace {p['workspace_low']}..{p['workspace_high']}"
        )

    def _apply_parameters(self, values: Mapping[str, ParamValue], changed: Mapping[str, ParamValue]) -> None:
        """A `ros2 param set` of safety limits (the runtime parameters): the whole new set is validated (each value
        and how they relate: home inside the box, gripper_min < gripper_max) and installed between two commands;
        an invalid set raises, so the change is refused with the reason and the old limits stay in force."""
        limits = from_parameters(SafetyLimits, values)  # SafetyConfigError: refused
        with self._lock:  # never while a command, a tick or a homing step is being checked
            old = self.safety.set_limits(limits)
        diff = ", ".join(
            f"{name} {getattr(old, name)} -> {getattr(limits, name)}"
            for name in changed
            if getattr(old, name) != getattr(limits, name)
        )
        self.get_logger().warning(f"safety limits changed at run time: {diff or 'no change'}")

    def _never_commanded(self) -> bool:
        """No action accepted since start (or since the last reset) for longer than the watchdog deadline: hold
        actively, as after a lost action stream (in simulation the holds also keep the clock moving)."""
        now = self._now()
        if self.safety.last_target is not None:
            self._quiet_since = None
            return False
        if self._quiet_since is None:
            self._quiet_since = now
        return now - self._quiet_since >= self.safety.limits.watchdog_timeout

    def _now(self) -> float:
        if self._time_source is not None:
            return self._time_source()
        # The newest ROS time this node has seen (its clock and its control ticker read /clock separately).
        return max(self.get_clock().now().nanoseconds * 1e-9, self._ticker.now())

    def _hold(self, why: str) -> None:
        self.backend.hold()
        self.holds += 1
        if why != self._last_status:
            self.get_logger().warning(f"holding the arm: {why}")
            self._last_status = why

    @contextlib.contextmanager
    def _backend_faults(self) -> Iterator[None]:
        """An ArmError from the backend (a protective or emergency stop, a lost connection, a refused command)
        latches the e-stop with the backend's own message: every command is a hold (the arm's controller has
        stopped it already) until ~/clear_estop, which first asks the backend to recover. A motion the arm
        aborted without a fault (ArmMotionAborted: the arm stopped, nothing to recover) latches nothing: it is
        counted, shown in the diagnostics, and the next command moves the arm again."""
        try:
            yield
        except ArmMotionAborted as exc:
            self.motion_aborts += 1
            self._recent_aborts.add(time.monotonic())
            self._last_abort = str(exc)
            self.get_logger().warning(f"{exc}; the arm stopped, the next command moves it again")
        except ArmError as exc:
            if not self.safety.estopped:
                self.get_logger().error(f"E-STOP latched by the arm backend: {exc}")
            self.safety.estop(f"arm backend: {exc}")
            if self._homing is not None:  # a reset-to-home in progress fails now, not at its deadline
                self._homing.set_result((False, f"arm backend: {exc}"))
                self._homing = None

    def _on_action(self, msg: ArmCommand) -> None:
        with self._lock, self._backend_faults():
            if self._homing is not None:
                return
            if msg.hold:
                self._hold(f"policy requested a hold (episode {msg.episode_id or '-'})")
                return
            action = np.array([*msg.ee_delta, msg.gripper], dtype=np.float64)
            state = self.backend.read_state()
            cmd = self.safety.command(action, self._now(), state.ee_position)
            if not cmd.moves:
                self.commands_rejected += 1
                if cmd.status is not CommandStatus.ESTOP:  # the latched e-stop is reported as such
                    self._recent_rejections.add(time.monotonic())
                    self._last_rejection = cmd.reason
                self._hold(cmd.reason)
                return
            assert cmd.target is not None and cmd.gripper is not None
            self.backend.send_target(cmd.target, cmd.gripper)
            self.commands_sent += 1
            self._last_status = ""

    def _on_event(self, msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.START:
            # The scene (and in simulation the arm) may have been reset or moved by hand since the last command:
            # limits apply from where the arm is now. Not again if the reset already happened at the episode's
            # first moment (the simulated cell's, see `scene_reset`): the first command may have come first.
            start = time_to_ns(msg.header.stamp) * 1e-9
            with self._lock:
                if self._reset_at is None or self._reset_at < start - 1e-6:
                    self._reset_safety(max(start, self._now()))

    def scene_reset(self, stamp_s: float) -> None:
        """The world was reset and its first observation is stamped `stamp_s`: limits apply from where the arm
        is now, and the never-commanded hold waits a watchdog period from then (the simulated cell calls this
        before it answers the reset, so it precedes the episode's first command)."""
        with self._lock:
            self._reset_safety(stamp_s)

    def _reset_safety(self, now: float) -> None:
        self.safety.reset()
        self._reset_at = now
        self._quiet_since = now

    def _on_timer(self) -> None:
        with self._lock, self._backend_faults():
            if self._homing is not None:
                self._step_home()
            elif self.safety.check_watchdog(self._now()) or self._never_commanded():
                self._hold("no fresh action within the watchdog deadline")
            if self._state_on_ticker:
                self.publish_state()

    def publish_state(self, stamp_s: float | None = None) -> None:
        """Publish the robot state (/joint_states, /tf, ~/ee_pose, ~/gripper_state) as the backend reads it now,
        stamped `stamp_s` (ROS seconds; None: the node clock). Thread-safe: it touches no controller state, only
        the backend's read."""
        state = self.backend.read_state()
        if stamp_s is None:
            now = self.get_clock().now()
            stamp, self._state_at = now.to_msg(), now.nanoseconds * 1e-9
        else:
            stamp = Time(nanoseconds=round(stamp_s * 1e9), clock_type=self.get_clock().clock_type).to_msg()
            self._state_at = stamp_s
        base, ee = str(self.params["base_frame"]), str(self.params["ee_frame"])
        if self._joint_pub is not None:
            joints = JointState()
            joints.header.stamp = stamp
            joints.name = list(state.joint_names)
            joints.position = [float(x) for x in state.joint_positions]
            joints.velocity = [float(x) for x in state.joint_velocities]
            self._joint_pub.publish(joints)
        gripper = JointState(name=["gripper_opening"], position=[float(state.gripper)])
        gripper.header.stamp = stamp
        self._gripper_pub.publish(gripper)
        if self._tf_pub is not None:
            t = TransformStamped()
            t.header.stamp, t.header.frame_id, t.child_frame_id = stamp, base, ee
            tr, rot = t.transform.translation, t.transform.rotation
            tr.x, tr.y, tr.z = (float(v) for v in state.ee_position)
            rot.x, rot.y, rot.z, rot.w = (float(v) for v in state.ee_orientation)
            self._tf_pub.publish(TFMessage(transforms=[t]))
        pose = PoseStamped()
        pose.header.stamp = stamp
        pose.header.frame_id = base
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = (
            float(v) for v in state.ee_position
        )
        qx, qy, qz, qw = (float(v) for v in state.ee_orientation)
        pose.pose.orientation.x, pose.pose.orientation.y, pose.pose.orientation.z, pose.pose.orientation.w = (
            qx,
            qy,
            qz,
            qw,
        )
        self._pose_pub.publish(pose)

    def hardware_id(self) -> str:
        """The arm this controller drives: its host (franky, ur_rtde), the driver's command topic (servo)."""
        kind = str(self.params["backend"])
        where = {"franky": "franky_host", "ur_rtde": "ur_rtde_host", "servo": "servo_command_topic"}.get(kind)
        return f"{kind}:{self.params[where]}" if where else kind

    def _statuses(self) -> list[Status]:
        now = time.monotonic()
        snapshot = ArmSnapshot(
            backend=str(self.params["backend"]),
            connected=bool(self.backend.is_connected),
            estop_reason=self.safety.estop_reason,  # one read: None while not latched
            state_age=None if self._state_at is None else self._now() - self._state_at,
            state_rate=float(self.params["state_rate"]),  # type: ignore[arg-type]
            since_start=now - self._started,
            rejected=self._recent_rejections.count(now),
            last_rejection=self._last_rejection,
            aborted=self._recent_aborts.count(now),
            last_abort=self._last_abort,
            holding=self._last_status,
            homing=self._homing is not None,
            counters={
                "commands_sent": self.commands_sent,
                "commands_rejected": self.commands_rejected,
                "holds": self.holds,
                "motion_aborts": self.motion_aborts,
            },
        )
        return [arm_status(self.get_name(), self.hardware_id(), snapshot)]

    def _on_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            self.safety.estop("e-stop service")
            with self._backend_faults():
                self.backend.hold()
        self.get_logger().error("E-STOP latched: the arm holds until ~/clear_estop")
        self.diagnostics.publish()  # now, not at the next check
        response.success, response.message = True, "e-stop latched"
        return response

    def _on_clear_estop(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self._lock:
            try:
                self.backend.recover()  # e.g. a UR's protective stop: unlock, power, brakes, script
            except ArmError as exc:
                self.get_logger().error(f"e-stop stays latched: the arm backend cannot recover: {exc}")
                response.success, response.message = False, f"arm backend cannot recover: {exc}"
                return response
            self.safety.clear_estop()
            self._reset_safety(self._now())
        self.get_logger().info("e-stop cleared")
        self.diagnostics.publish()
        response.success, response.message = True, "e-stop cleared"
        return response

    async def _on_reset_home(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Move home through the same step and speed limits, one command per control tick; answers when home."""
        done: Future = Future()
        with self._lock:
            # A caller that gave up and asked again (reset_timeout): one homing runs, the newest request's.
            if self._homing is not None:
                self._homing.set_result((False, "superseded by a newer reset_home request"))
            self._reset_safety(self._now())
            self._homing = done
            self._homing_deadline = self._now() + _HOMING_TIMEOUT
        ok, message = await done
        response.success, response.message = ok, message
        return response

    def _step_home(self) -> None:
        """One control tick of homing (called with the lock held)."""
        assert self._homing is not None
        home = self.safety.home_target()  # a runtime parameter: the limits in force now
        state = self.backend.read_state()
        result: tuple[bool, str] | None = None
        if np.linalg.norm(state.ee_position - home) < _HOME_TOLERANCE:
            result = (True, "at home")
        elif self._now() > self._homing_deadline:
            result = (False, f"home not reached within {_HOMING_TIMEOUT:.0f} s")
        else:
            cmd = self.safety.command_home(self._now(), state.ee_position)
            if not cmd.moves or cmd.target is None or cmd.gripper is None:
                result = (False, f"homing refused: {cmd.reason}")
            else:
                self.backend.send_target(cmd.target, cmd.gripper)
        if result is not None:
            self._homing.set_result(result)
            self._homing = None
            self._reset_safety(self._now())

    def close(self) -> None:
        try:
            with contextlib.suppress(ArmError):  # stopped or gone already: nothing left to hold
                self.backend.hold()
        finally:
            self.backend.close()


def main(args: list[str] | None = None) -> int:
    return run_nodes(lambda context: [ArmControllerNode(context=context)], args)
