"""A Franka arm (Panda / FR3) through franky (libfranka), streaming absolute Cartesian targets.

Each approved target becomes an asynchronous absolute `CartesianMotion`; franky lets a new motion take over
the running one seamlessly, so a 10 Hz controller streams targets and franky's Ruckig generator produces the
1 kHz trajectory between them. Its limits are `dynamics_factor` of the robot's velocity limits and
`acceleration_factor` of its acceleration and jerk limits, and `max_speed` (pass the SafetyLayer's) caps the
end effector's translational speed. The cap matters: each streamed target starts a new time-optimal
point-to-point profile that chases the target, so without it the arm peaked ~45% above the stream's speed
against franky-sim; and a low acceleration factor lengthens braking, so a target stopping at the workspace
wall was overshot by 1.7 mm (all factors 0.1) instead of < 0.5 mm (0.1 velocity, 0.3 acceleration/jerk).
Orientation is held at the one the arm had at `connect()` (or `orientation`, if given).

Gripper (franka_hand over its own libfranka connection): the opening 0..1 maps to `opening * max_width`
metres; the state also reports it as franka_ros2's finger joints fr3_finger_joint1/2, each at half the
width. Gripper commands are slow (hundreds of ms) and blocking inside libfranka, so at most one is in flight:
a new opening is sent only when the previous command has finished (latest wins) and differs by
more than `gripper_deadband` metres. Besides being gentle on the hardware this avoids a franky-sim 1.0.4
bug: a gripper command sent while another is running makes the server drop the first command's reply, and
libfranka then waits for it forever (the client deadlocks). Closing below `grasp_below` uses `grasp`
(force-controlled, succeeds whatever the object's width) instead of `move`, which fails on an object.

Lost connections: libfranka reports them lazily. A state read raises after its 1 s UDP timeout; a motion
fails in franky's motion thread and surfaces at the next `send_target`/`hold` (via `poll_motion`). Either way
this backend raises ArmConnectionError and `is_connected` turns False.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import franky
import numpy as np

from irevla_ros.hardware.arm.base import ArmBackend, ArmConnectionError, ArmError, ArmMotionAborted, ArmState

JOINT_NAMES: tuple[str, ...] = tuple(f"fr3_joint{i}" for i in range(1, 8))
# The Franka hand's fingers as franka_ros2 names them: each at half the gripper width, in metres.
FINGER_JOINTS: tuple[str, ...] = ("fr3_finger_joint1", "fr3_finger_joint2")

# franky's exception classes do not share one base (pybind11 registers each on builtins.Exception).
_FRANKY_ERRORS: tuple[type[BaseException], ...] = tuple(
    obj
    for name in dir(franky)
    if isinstance(obj := getattr(franky, name), type) and issubclass(obj, BaseException)
)


def _is_connection_error(exc: BaseException) -> bool:
    # libfranka's state reads raise a bare RuntimeError("Net Exception") on a UDP timeout.
    return isinstance(exc, franky.NetworkException) or (type(exc) is RuntimeError and "Net" in str(exc))


class FrankyArm(ArmBackend):
    """ArmBackend for a Franka robot at `host` (its FCI address, or a franky-sim loopback address)."""

    def __init__(
        self,
        host: str,
        realtime_ignore: bool = True,
        dynamics_factor: float = 0.1,
        acceleration_factor: float = 0.3,
        max_speed: float | None = None,
        home_dynamics_factor: float = 0.05,
        use_gripper: bool = True,
        gripper_speed: float = 0.05,
        gripper_force: float = 20.0,
        gripper_deadband: float = 0.004,
        grasp_below: float = 0.05,
        orientation: Sequence[float] | None = None,
        joint_names: Sequence[str] = JOINT_NAMES,
    ) -> None:
        if not host:
            raise ValueError("host must name the robot's FCI address")
        for name, value, upper in (
            ("dynamics_factor", dynamics_factor, 1.0),
            ("acceleration_factor", acceleration_factor, 1.0),
            ("max_speed", 1.0 if max_speed is None else max_speed, 1.7),
            ("home_dynamics_factor", home_dynamics_factor, 1.0),
            ("gripper_speed", gripper_speed, 0.1),
            ("gripper_force", gripper_force, 70.0),
        ):
            if not (math.isfinite(value) and 0.0 < value <= upper):
                raise ValueError(f"{name} must lie in (0, {upper}], got {value}")
        if not 0.0 <= grasp_below < 1.0:
            raise ValueError(f"grasp_below must lie in [0, 1), got {grasp_below}")
        self._host = host
        self._realtime = franky.RealtimeConfig.Ignore if realtime_ignore else franky.RealtimeConfig.Enforce
        self._dynamics_factor = float(dynamics_factor)
        self._acceleration_factor = float(acceleration_factor)
        self._max_speed = None if max_speed is None else float(max_speed)
        self._home_factor = float(home_dynamics_factor)
        self._use_gripper = bool(use_gripper)
        self._gripper_speed = float(gripper_speed)
        self._gripper_force = float(gripper_force)
        self._deadband = float(gripper_deadband)
        self._grasp_below = float(grasp_below)
        self._fixed_orientation = None if orientation is None else np.asarray(orientation, dtype=np.float64)
        if self._fixed_orientation is not None and self._fixed_orientation.shape != (4,):
            raise ValueError(f"orientation must be a quaternion x, y, z, w, got {orientation!r}")
        self._joint_names = tuple(joint_names)
        self._lock = threading.RLock()
        self._robot: Any = None
        self._gripper: Any = None
        self._orientation: np.ndarray | None = None
        self._max_width = 0.08
        self._grip_future: Any = None
        self._grip_sent: float | None = None  # width of the last gripper command, metres
        self._grip_wanted: float | None = None
        self._connected = False
        self._stopping = False  # the newest motion sent is a stop: holding again needs no new one

    # ---- connection ----------------------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def host(self) -> str:
        return self._host

    def connect(self) -> None:
        with self._lock:
            if self._connected:
                return
            try:
                robot = franky.Robot(self._host, realtime_config=self._realtime)
                robot.relative_dynamics_factor = franky.RelativeDynamicsFactor(
                    self._dynamics_factor, self._acceleration_factor, self._acceleration_factor
                )
                if self._max_speed is not None:
                    # The limit is scaled by the velocity factor; set it so that the product is max_speed.
                    limit = robot.translation_velocity_limit
                    limit.set(min(float(limit.max), self._max_speed / self._dynamics_factor))
                if robot.has_errors:
                    robot.recover_from_errors()
                pose = robot.state.O_T_EE
                gripper = franky.Gripper(self._host) if self._use_gripper else None
                if gripper is not None:
                    self._max_width = float(gripper.max_width) or self._max_width
                    self._grip_sent = float(gripper.width)
            except Exception as exc:
                raise ArmConnectionError(f"cannot connect to the Franka at {self._host}: {exc}") from exc
            self._robot, self._gripper = robot, gripper
            fixed = self._fixed_orientation
            self._orientation = np.asarray(pose.quaternion, dtype=np.float64) if fixed is None else fixed
            self._connected = True
            self._stopping = False

    def close(self) -> None:
        with self._lock:
            robot, gripper, future = self._robot, self._gripper, self._grip_future
            self._robot = self._gripper = self._grip_future = None
            was_connected, self._connected = self._connected, False
            if was_connected and robot is not None:
                # Closing: the arm is stopping or already gone either way, so errors here change nothing.
                with contextlib.suppress(Exception):
                    robot.move(franky.CartesianStopMotion(), asynchronous=True)
                    robot.join_motion(2.0)
            if was_connected and future is not None:
                # Releasing the gripper while libfranka still waits for a reply would block its destructor.
                with contextlib.suppress(Exception):
                    future.wait(2.0)
            del robot, gripper

    def recover(self) -> None:
        """Clear a reflex/error state (libfranka's automatic error recovery); raises ArmError if it fails."""
        with self._lock:
            robot = self._require()
            ok = self._call(robot.recover_from_errors)
            if not ok:
                raise ArmError("automatic error recovery failed; recover the robot from Desk")

    def _require(self) -> Any:
        if not self._connected or self._robot is None:
            raise ArmConnectionError(f"the Franka at {self._host} is not connected")
        return self._robot

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call franky; what the robot refused or aborted (franky's exceptions, libfranka's bare runtime_errors)
        comes out as ArmError, a lost link as ArmConnectionError, anything else (a programming error) as is."""
        try:
            return fn(*args, **kwargs)
        except ArmError:
            raise
        except Exception as exc:
            if _is_connection_error(exc):
                self._connected = False
                raise ArmConnectionError(f"lost the connection to the Franka at {self._host}: {exc}") from exc
            if isinstance(exc, (*_FRANKY_ERRORS, RuntimeError)):
                raise ArmError(f"the Franka at {self._host} refused or aborted: {exc}") from exc
            raise

    # ---- state ---------------------------------------------------------------------------------------------

    def read_state(self) -> ArmState:
        with self._lock:
            robot = self._require()
            state = self._call(lambda: robot.state)
            stamp = time.monotonic()
            pose = state.O_T_EE
            opening = self._read_opening()
            names, q, dq = self._joint_names, list(state.q), list(state.dq)
            if self._use_gripper:
                names = (*names, *FINGER_JOINTS)
                q += [opening * self._max_width / 2.0] * 2
                dq += [0.0, 0.0]
            return ArmState(
                ee_position=np.asarray(pose.translation, dtype=np.float64),
                ee_orientation=np.asarray(pose.quaternion, dtype=np.float64),
                gripper=opening,
                joint_names=names,
                joint_positions=np.asarray(q, dtype=np.float64),
                joint_velocities=np.asarray(dq, dtype=np.float64),
                stamp=stamp,
                extras={"robot_time": float(state.time.to_sec())},
            )

    def _read_opening(self) -> float:
        if self._gripper is None:
            width = self._grip_sent if self._grip_sent is not None else self._max_width
        else:
            width = float(self._call(lambda: self._gripper.width))
        return float(np.clip(width / self._max_width, 0.0, 1.0))

    # ---- commands ------------------------------------------------------------------------------------------

    def _check_motion(self, robot: Any) -> None:
        # Surfaces an exception from the previous asynchronous motion (reflex, lost connection).
        self._call(self._poll_motion, robot)

    def _poll_motion(self, robot: Any) -> None:
        # franky reports a failure of its own trajectory planner (Ruckig, e.g. -111: no synchronised trajectory
        # from the state it met) as a bare RuntimeError: that motion ended and the arm stopped, with no fault.
        try:
            robot.poll_motion()
        except RuntimeError as exc:
            if type(exc) is RuntimeError and str(exc).startswith("Motion planner failed"):
                raise ArmMotionAborted(f"the Franka at {self._host} aborted its motion: {exc}") from exc
            raise

    def _target_affine(self, ee_position: np.ndarray) -> Any:
        pos = np.asarray(ee_position, dtype=np.float64)
        if pos.shape != (3,) or not np.all(np.isfinite(pos)):
            raise ValueError(f"ee_position must be a finite 3-vector, got {ee_position!r}")
        return franky.Affine(pos, self._orientation)

    def send_target(self, ee_position: np.ndarray, gripper: float) -> None:
        with self._lock:
            robot = self._require()
            affine = self._target_affine(ee_position)
            self._check_motion(robot)
            motion = franky.CartesianMotion(affine, franky.ReferenceType.Absolute)
            self._stopping = False
            self._call(robot.move, motion, asynchronous=True)
            self._service_gripper(gripper)

    def hold(self) -> None:
        """Decelerate to a stop along the current path (franky's CartesianStopMotion) and stay there.

        Sent once per hold: `poll_motion()`'s return value does not tell whether a motion is running (it read False
        throughout running motions against franky-sim), so the backend remembers what it sent last. A stop sent
        again every tick of a long hold only made franky plan a new trajectory from rest at every tick, which is
        where its planner failed once under load (-111)."""
        with self._lock:
            robot = self._require()
            self._check_motion(robot)
            if not self._stopping:
                self._call(robot.move, franky.CartesianStopMotion(), asynchronous=True)
                self._stopping = True

    def move_home(self, ee_position: np.ndarray, gripper: float, timeout: float = 30.0) -> None:
        """Blocking; at min(home_dynamics_factor, dynamics_factor) of the robot's limits, orientation held."""
        with self._lock:
            robot = self._require()
            affine = self._target_affine(ee_position)
            self._check_motion(robot)
            # A motion's factor multiplies the robot's global one, while home_dynamics_factor is absolute.
            factor = min(1.0, self._home_factor / self._dynamics_factor)
            motion = franky.CartesianMotion(
                affine, franky.ReferenceType.Absolute, relative_dynamics_factor=factor
            )
            self._stopping = False
            self._call(robot.move, motion, asynchronous=True)
            if not self._call(robot.join_motion, timeout):
                self._call(robot.move, franky.CartesianStopMotion(), asynchronous=True)
                self._stopping = True
                raise ArmError(f"home move did not finish within {timeout} s")
            self._service_gripper(gripper)
            future = self._grip_future
            if future is not None and not self._call(future.wait, timeout):
                raise ArmError(f"gripper did not reach home opening within {timeout} s")
            self._service_gripper(gripper)  # the wanted opening may have been queued behind a running command

    def _service_gripper(self, opening: float) -> None:
        value = float(opening)
        if not math.isfinite(value):
            raise ValueError(f"gripper opening must be finite, got {opening!r}")
        self._grip_wanted = float(np.clip(value, 0.0, 1.0)) * self._max_width
        if self._gripper is None:
            self._grip_sent = self._grip_wanted
            return
        future = self._grip_future
        if future is not None:
            if not self._call(future.wait, 0.0):
                return  # one command in flight; the latest wanted width goes out once it finishes
            self._grip_future = None
            self._call(future.get)  # raises what the command raised; a False result (blocked move) is fine
        wanted = self._grip_wanted
        if self._grip_sent is not None and abs(wanted - self._grip_sent) <= self._deadband:
            return
        g = self._gripper
        if wanted <= self._grasp_below * self._max_width:
            # Any final width in [0, max_width] counts as a grasp: the point is to squeeze, not to measure.
            future = self._call(g.grasp_async, wanted, self._gripper_speed, self._gripper_force, wanted, 1.0)
        else:
            future = self._call(g.move_async, wanted, self._gripper_speed)
        self._grip_future = future
        self._grip_sent = wanted
