"""An arm that already runs a ROS 2 driver (franka_ros2, the Universal Robots ROS 2 driver) with MoveIt Servo, or a
ros2_control forward command controller taking a Cartesian velocity.

The ROS boundary: this backend needs publishers and subscriptions but, like every backend, never imports rclpy.
It talks through a `ServoTransport` (`ros_transport.py`: publish one twist, deliver joint states, transforms and poses to a
`StateSink`) that the arm controller node provides (`irevla_ros.nodes.ros_servo_transport`, on the node itself);
`needs_transport` tells the node to hand one in, so the node still picks the backend by name from the registry.

Commands: a thread streams at `rate` (MoveIt Servo halts when commands stop for its incoming_command_timeout,
0.1 s by default) the twist (target - current) / `period`, its linear part capped at `max_speed` (pass the
SafetyLayer's) and its angular part, which holds the orientation the end effector had at connect (or
`orientation`), at `max_angular_speed`. The twist is in the base frame; `twist_frame` names it for Servo
(MoveIt Servo transforms a twist from its header's frame: give it a frame with the base's axes).
`command_mode`: "twist" publishes geometry_msgs/TwistStamped (to /servo_node/delta_twist_cmds), "velocity_array"
the same six numbers (vx, vy, vz, wx, wy, wz) as std_msgs/Float64MultiArray to a forward command controller
over Cartesian velocity interfaces (e.g. franka_ros2's cartesian velocity interface). A joint-space forward
controller would need the arm's kinematics here and is not supported.

State: joints from /joint_states (the driver's own names; `joint_names` picks and orders them, empty: all), the
end-effector pose from /tf + /tf_static (`base_frame` -> `ee_frame` composed along the tree by hand: tf2_ros
has no wheel) or from a geometry_msgs/PoseStamped topic (`state_source` "pose"). Driver state older than
`state_timeout` (time of arrival, this host's clock) is stale: the stream sends zero twists (hold) and every
command raises ArmConnectionError saying what went quiet, which the controller latches as an e-stop; state
that comes back is fresh again, and `recover()` succeeds once it is.

Gripper: a ROS driver's gripper is an action server (franka_gripper, Robotiq drivers) that this backend does not
drive; the opening is read from finger joints in /joint_states when `gripper_joints` names them (sum of their
positions / `gripper_max_width`), otherwise the last commanded opening is reported.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from irevla_ros.hardware.arm.base import ArmBackend, ArmConnectionError, ArmError, ArmState
from irevla_ros.hardware.arm.ros_transport import (
    COMMAND_MODES,
    STATE_SOURCES,
    ServoTransport,
    StateSink,
    Transform,
    TransportConfig,
)

# ---- transform tree -----------------------------------------------------------------------------------------


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of x, y, z, w quaternions (a then b applied in a's frame: a * b)."""
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ]
    )


def quat_rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    u, w = q[:3], q[3]
    return v + 2.0 * np.cross(u, np.cross(u, v) + w * v)


def quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    """Axis * angle of the shortest rotation `q` (x, y, z, w)."""
    q = q / np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    s = float(np.linalg.norm(q[:3]))
    if s < 1e-12:
        return np.zeros(3)
    return q[:3] / s * (2.0 * math.atan2(s, q[3]))


def rotvec_to_quat(v: np.ndarray) -> np.ndarray:
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    return np.array([*(v / angle * math.sin(angle / 2)), math.cos(angle / 2)])


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


class TransformTree:
    """The newest transform of every child frame (/tf and /tf_static), and chain lookups (what tf2 does without
    interpolation: the latest of each edge)."""

    def __init__(self) -> None:
        self._edges: dict[str, tuple[Transform, float]] = {}  # child -> (transform, arrival time)

    def add(self, transform: Transform, arrival: float) -> None:
        self._edges[transform.child] = (transform, arrival)

    def lookup(self, base: str, frame: str) -> tuple[np.ndarray, np.ndarray, float] | None:
        """`frame` in `base`: translation, rotation and the oldest arrival time of a non-static edge on the chain
        (inf when all are static); None when the tree does not connect them (frame must descend from base)."""
        position, rotation, oldest = np.zeros(3), np.array([0.0, 0.0, 0.0, 1.0]), math.inf
        current, seen = frame, set()
        while current != base:
            if current in seen or current not in self._edges:
                return None
            seen.add(current)
            edge, arrival = self._edges[current]
            # p_parent = R_edge * p_child + t_edge: prepend this edge to the chain composed so far.
            t, r = np.asarray(edge.translation, dtype=np.float64), np.asarray(edge.rotation, dtype=np.float64)
            position = quat_rotate(r, position) + t
            rotation = quat_multiply(r, rotation)
            if not edge.static:
                oldest = min(oldest, arrival)
            current = edge.parent
        return position, rotation / np.linalg.norm(rotation), oldest


# ---- the arm ------------------------------------------------------------------------------------------------


class ServoArm(ArmBackend, StateSink):
    """ArmBackend for an arm run by a ROS 2 driver and MoveIt Servo, through a `ServoTransport`."""

    needs_transport = True  # the arm controller node hands in its rclpy transport as `transport`
    publishes_robot_state = False  # the driver publishes /joint_states and /tf; the controller must not

    def __init__(
        self,
        transport: ServoTransport | None = None,
        command_mode: str = "twist",
        command_topic: str = "/servo_node/delta_twist_cmds",
        twist_frame: str = "",
        rate: float = 50.0,
        period: float = 0.1,
        max_speed: float = 0.1,
        max_angular_speed: float = 0.5,
        state_source: str = "tf",
        joint_states_topic: str = "/joint_states",
        pose_topic: str = "",
        base_frame: str = "base_link",
        ee_frame: str = "tool0",
        joint_names: Sequence[str] = (),
        gripper_joints: Sequence[str] = (),
        gripper_max_width: float = 0.08,
        state_timeout: float = 0.5,
        connect_timeout: float = 10.0,
        orientation: Sequence[float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if command_mode not in COMMAND_MODES:
            raise ValueError(f"command_mode must be one of {COMMAND_MODES}, got {command_mode!r}")
        if state_source not in STATE_SOURCES:
            raise ValueError(f"state_source must be one of {STATE_SOURCES}, got {state_source!r}")
        if state_source == "pose" and not pose_topic:
            raise ValueError("state_source 'pose' needs pose_topic (a geometry_msgs/PoseStamped topic)")
        if not command_topic or not base_frame or (state_source == "tf" and not ee_frame):
            raise ValueError("command_topic, base_frame and (for state_source 'tf') ee_frame must be set")
        for name, value, low, high in (
            ("rate", rate, 5.0, 1000.0),
            ("period", period, 0.01, 2.0),
            ("max_speed", max_speed, 1e-3, 1.0),
            ("max_angular_speed", max_angular_speed, 1e-3, 3.2),
            ("gripper_max_width", gripper_max_width, 1e-3, 1.0),
            ("state_timeout", state_timeout, 0.01, 10.0),
            ("connect_timeout", connect_timeout, 0.1, 120.0),
        ):
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
        self._transport = transport
        self._config = TransportConfig(
            command_mode=command_mode,
            command_topic=command_topic,
            twist_frame=twist_frame or base_frame,
            state_source=state_source,
            joint_states_topic=joint_states_topic,
            pose_topic=pose_topic,
        )
        self._dt = 1.0 / float(rate)
        self._period = float(period)
        self._max_speed = float(max_speed)
        self._max_angular = float(max_angular_speed)
        self._base, self._ee = base_frame, ee_frame
        self._wanted_joints = tuple(joint_names)
        self._gripper_joints = tuple(gripper_joints)
        self._max_width = float(gripper_max_width)
        self._state_timeout = float(state_timeout)
        self._connect_timeout = float(connect_timeout)
        self._fixed_orientation = None if orientation is None else np.asarray(orientation, dtype=np.float64)
        if self._fixed_orientation is not None and self._fixed_orientation.shape != (4,):
            raise ValueError(f"orientation must be a quaternion x, y, z, w, got {orientation!r}")
        self._clock = clock
        self._lock = threading.RLock()
        self._tree = TransformTree()
        self._joints: tuple[tuple[str, ...], np.ndarray, np.ndarray, float] | None = None
        self._pose: tuple[np.ndarray, np.ndarray, float] | None = None  # from the pose topic
        self._orientation: np.ndarray | None = None
        self._target: np.ndarray | None = None  # latest approved position; None: holding
        self._opening = 1.0
        self._connected = False
        self._stale_reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Motion commanded since the newest end-effector state arrived (dead reckoning between two states:
        # without it, a driver that goes quiet would be pushed toward the target from an old pose for up to
        # state_timeout, overshooting it at max_speed).
        self._commanded: tuple[np.ndarray, np.ndarray] = (np.zeros(3), np.zeros(3))
        self.twists_sent = 0
        self.last_twist: tuple[np.ndarray, np.ndarray] = (np.zeros(3), np.zeros(3))

    # ---- StateSink (the transport's thread) -----------------------------------------------------------------

    def on_joint_state(
        self, names: Sequence[str], positions: Sequence[float], velocities: Sequence[float]
    ) -> None:
        names = tuple(names)
        q = np.asarray(positions, dtype=np.float64)
        dq = (
            np.asarray(velocities, dtype=np.float64)
            if len(velocities) == len(names)
            else np.zeros(len(names))
        )
        if q.size != len(names):
            return  # malformed: ignored, so a driver sending only these goes stale
        with self._lock:
            if self._joints is not None and not self._wanted_joints:
                # Drivers may split their joints over several publishers (arm, gripper): merge by name.
                old_names, old_q, old_dq, _ = self._joints
                merged = dict(zip(old_names, zip(old_q, old_dq, strict=True), strict=True))
                merged.update(zip(names, zip(q, dq, strict=True), strict=True))
                names = tuple(merged)
                q = np.array([merged[n][0] for n in names])
                dq = np.array([merged[n][1] for n in names])
            elif self._joints is not None:
                old_names, old_q, old_dq, _ = self._joints
                index = {n: i for i, n in enumerate(names)}
                q = np.array([q[index[n]] if n in index else old_q[i] for i, n in enumerate(old_names)])
                dq = np.array([dq[index[n]] if n in index else old_dq[i] for i, n in enumerate(old_names)])
                names = old_names
                if not any(n in index for n in self._wanted_joints):
                    return  # another publisher's joints (a gripper's): not the arm's freshness
            elif self._wanted_joints:
                index = {n: i for i, n in enumerate(names)}
                missing = [n for n in self._wanted_joints if n not in index]
                if missing:
                    return  # not (yet) the arm's message
                order = [index[n] for n in self._wanted_joints]
                names, q, dq = self._wanted_joints, q[order], dq[order]
            self._joints = (names, q, dq, self._clock())

    def on_transforms(self, transforms: Sequence[Transform]) -> None:
        now = self._clock()
        with self._lock:
            for transform in transforms:
                self._tree.add(transform, now)
            if any(not t.static for t in transforms):
                self._commanded = (np.zeros(3), np.zeros(3))

    def on_pose(self, frame_id: str, position: Sequence[float], orientation: Sequence[float]) -> None:
        if frame_id and frame_id != self._base:
            return  # a pose in another frame is not one this backend can use
        with self._lock:
            self._pose = (
                np.asarray(position, dtype=np.float64).reshape(3),
                np.asarray(orientation, dtype=np.float64).reshape(4),
                self._clock(),
            )
            self._commanded = (np.zeros(3), np.zeros(3))

    # ---- connection ----------------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        """Open the transport and wait (up to `connect_timeout`) for the driver's joint states and pose."""
        with self._lock:
            if self._connected:
                return
            if self._transport is None:
                raise ArmConnectionError(
                    "the servo backend needs a ROS transport (the arm controller node's)"
                )
            self._transport.open(self._config, self)
        deadline = self._clock() + self._connect_timeout
        while True:
            with self._lock:
                why = self._staleness()
                if why is None:
                    break
            if self._clock() > deadline:
                self._transport.close()
                raise ArmConnectionError(
                    f"no state from the arm's ROS driver within {self._connect_timeout} s: {why}"
                )
            time.sleep(0.01)
        with self._lock:
            _, rotation = self._ee_pose()
            fixed = self._fixed_orientation
            self._orientation = rotation if fixed is None else fixed / np.linalg.norm(fixed)
            self._target = None
            self._stale_reason = None
            self._connected = True
            self._stop.clear()
            self._thread = threading.Thread(target=self._stream, name="servo twist stream", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
            self._target = None
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)
        if was_connected and self._transport is not None:
            self._transport.publish_twist(
                (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)
            )  # Servo: stop now, not at its timeout
        if self._transport is not None:
            self._transport.close()

    def recover(self) -> None:
        """Succeeds once the driver's state is fresh again; raises ArmConnectionError saying what is missing."""
        with self._lock:
            self._require_open()
            why = self._staleness()
            if why is not None:
                raise ArmConnectionError(f"the arm's ROS driver is still silent: {why}")
            self._stale_reason = None
            self._target = None

    def _require_open(self) -> None:
        if not self._connected:
            raise ArmConnectionError("the servo backend is not connected (call connect())")

    def _staleness(self) -> str | None:
        """Why the driver's state cannot be used now (None: fresh). Called with the lock held."""
        now = self._clock()
        if self._joints is None:
            return f"no {self._config.joint_states_topic} received"
        age = now - self._joints[3]
        if age > self._state_timeout:
            return f"{self._config.joint_states_topic} silent for {age:.2f} s"
        if self._config.state_source == "pose":
            if self._pose is None:
                return f"no {self._config.pose_topic} received in frame {self._base}"
            age = now - self._pose[2]
            if age > self._state_timeout:
                return f"{self._config.pose_topic} silent for {age:.2f} s"
            return None
        found = self._tree.lookup(self._base, self._ee)
        if found is None:
            return f"no transform {self._base} -> {self._ee} on /tf, /tf_static"
        age = now - found[2]
        if age > self._state_timeout:
            return f"/tf {self._base} -> {self._ee} silent for {age:.2f} s"
        return None

    def _ready(self, doing: str) -> None:
        """Raise ArmConnectionError if the driver's state is stale (the stream is holding then)."""
        self._require_open()
        why = self._staleness()
        if why is not None:
            self._stale_reason = why
            self._target = None
            raise ArmConnectionError(f"stale state from the arm's ROS driver while trying to {doing}: {why}")

    def _ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        if self._config.state_source == "pose":
            assert self._pose is not None
            return self._pose[0].copy(), self._pose[1] / np.linalg.norm(self._pose[1])
        found = self._tree.lookup(self._base, self._ee)
        assert found is not None
        return found[0], found[1]

    # ---- state ---------------------------------------------------------------------------------------------

    def read_state(self) -> ArmState:
        with self._lock:
            self._ready("read the arm state")
            assert self._joints is not None
            names, q, dq, _ = self._joints
            position, rotation = self._ee_pose()
            return ArmState(
                ee_position=position,
                ee_orientation=rotation,
                gripper=self._gripper_opening(names, q),
                joint_names=names,
                joint_positions=q,
                joint_velocities=dq,
                stamp=self._clock(),
                extras={"twists_sent": float(self.twists_sent)},
            )

    def _gripper_opening(self, names: tuple[str, ...], q: np.ndarray) -> float:
        if self._gripper_joints and all(n in names for n in self._gripper_joints):
            width = sum(float(q[names.index(n)]) for n in self._gripper_joints)
            return float(np.clip(width / self._max_width, 0.0, 1.0))
        return self._opening

    # ---- commands ------------------------------------------------------------------------------------------

    def send_target(self, ee_position: np.ndarray, gripper: float) -> None:
        pos = np.asarray(ee_position, dtype=np.float64)
        if pos.shape != (3,) or not np.all(np.isfinite(pos)):
            raise ValueError(f"ee_position must be a finite 3-vector, got {ee_position!r}")
        value = float(gripper)
        if not math.isfinite(value):
            raise ValueError(f"gripper opening must be finite, got {gripper!r}")
        with self._lock:
            self._ready("servo to a target")
            self._target = pos
            self._opening = float(np.clip(value, 0.0, 1.0))

    def hold(self) -> None:
        with self._lock:
            self._require_open()
            self._target = None  # the stream sends zero twists from its next cycle
            self._ready("hold")

    def move_home(self, ee_position: np.ndarray, gripper: float, timeout: float = 30.0) -> None:
        """Blocking: servo to `ee_position` at the stream's speed cap; ArmError after `timeout` seconds."""
        self.send_target(ee_position, gripper)
        deadline = self._clock() + timeout
        target = np.asarray(ee_position, dtype=np.float64)
        while True:
            with self._lock:
                self._ready("move home")
                position, _ = self._ee_pose()
            if float(np.linalg.norm(position - target)) < 1e-3:
                self.hold()
                return
            if self._clock() > deadline:
                self.hold()
                raise ArmError(f"home not reached within {timeout} s; end effector at {position.tolist()}")
            time.sleep(self._dt)

    def twist_toward(self, target: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The twist this cycle (called with the lock held, state fresh): zero without a target."""
        if target is None or self._orientation is None:
            return np.zeros(3), np.zeros(3)
        position, rotation = self._ee_pose()
        moved, turned = self._commanded
        position = position + moved
        rotation = quat_multiply(rotvec_to_quat(turned), rotation)
        linear = (target - position) / self._period
        speed = float(np.linalg.norm(linear))
        if speed > self._max_speed:
            linear *= self._max_speed / speed
        # The rotation that takes the current orientation to the held one, in the base frame.
        angular = quat_to_rotvec(quat_multiply(self._orientation, quat_conjugate(rotation))) / self._period
        rate = float(np.linalg.norm(angular))
        if rate > self._max_angular:
            angular *= self._max_angular / rate
        return linear, angular

    def _stream(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            with self._lock:
                if not self._connected:
                    break
                why = self._staleness()
                if why is not None:
                    if self._stale_reason is None:
                        self._stale_reason = why
                    self._target = None  # stays held until a new target after the state came back
                    linear, angular = np.zeros(3), np.zeros(3)
                else:
                    linear, angular = self.twist_toward(self._target)
                self.last_twist = (linear, angular)
                moved, turned = self._commanded
                self._commanded = (moved + linear * self._dt, turned + angular * self._dt)
                self.twists_sent += 1
                assert self._transport is not None
                self._transport.publish_twist(tuple(linear), tuple(angular))
            next_at += self._dt
            delay = next_at - self._clock()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = self._clock()
