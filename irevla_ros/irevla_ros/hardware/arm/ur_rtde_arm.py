"""A Universal Robots arm (CB3 / e-Series) through ur_rtde, servoing absolute Cartesian targets.

Servoing: servoL, streamed by a background thread at `servo_rate` (125 Hz). servoL rather than speedL: servoL
takes a pose, so the arm converges on the latest approved target by itself (the controller's own servo loop
closes the position error), and a late or lost host tick leaves it at an absolute, approved point instead of
coasting at the last velocity; speedL would need the host to close the position loop at 10 Hz through its
own latency (an overshoot for every late tick). But a 10 Hz staircase of targets fed straight to servoL makes
the arm lunge at each new step and then wait. So the thread moves a setpoint toward the latest target at no
more than `max_speed` (pass the SafetyLayer's) and servoL follows that ramp at the servo rate, with
`lookahead_time` smoothing and `gain` stiffness (ur_rtde's ranges: 0.03..0.2 s, 100..2000). Orientation is
held at the one the arm had at `connect()` (or `orientation`, a UR rotation vector).

hold(): the stream stops and servoStop decelerates the arm (`stop_deceleration`, m/s^2) along its path; the
next send_target starts a new ramp from where the arm is. move_home(): a blocking moveL at `home_speed`.

Faults. The UR reports a protective stop, an emergency stop or a stopped control script in its RTDE state;
send_target / hold / move_home then raise ArmError saying which (the arm is already stopped by the
controller), and read_state reports it in `extras` (safety_mode, robot_mode, runtime_state). A protective
stop stays latched until `recover()`: the dashboard's "unlock protective stop" (which the controller refuses
within 5 s of the stop: recover() raises with its answer), "close safety popup", power on and brake release
if needed, and the control script uploaded again. An emergency stop must be released at the robot first. A
lost connection (ur_rtde's receive interface disconnected, or no new RTDE state within `state_timeout`) raises
ArmConnectionError and `is_connected` turns False; the controller's script keeps servoing the last setpoint,
so the arm stops there (at most one ramp step, `max_speed / servo_rate`, ahead of where it was).

Gripper: pluggable (`GripperInterface`): "robotiq" speaks the Robotiq URCap's socket protocol (port 63352,
SET/GET ACT, GTO, POS, SPE, FOR) for a gripper on the UR's tool port; "none" for no gripper (the opening is
remembered). The opening 0..1 maps to Robotiq positions 255 (closed) .. 0 (open); a new opening is sent only
when it differs from the last by more than `gripper_deadband`.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from irevla_ros.hardware.arm.base import ArmBackend, ArmConnectionError, ArmError, ArmState

JOINT_NAMES: tuple[str, ...] = (
    "shoulder_pan_joint",
    "shoulder_lift_joint",
    "elbow_joint",
    "wrist_1_joint",
    "wrist_2_joint",
    "wrist_3_joint",
)

# The RTDE outputs the backend reads (the receive interface asks the controller for exactly these).
RTDE_VARIABLES: tuple[str, ...] = (
    "timestamp",
    "actual_TCP_pose",
    "actual_q",
    "actual_qd",
    "robot_mode",
    "safety_mode",
    "runtime_state",
    "robot_status_bits",
    "safety_status_bits",
)

# Values of the RTDE guide.
SAFETY_MODES = {
    1: "normal",
    2: "reduced",
    3: "protective stop",
    4: "recovery",
    5: "safeguard stop",
    6: "system emergency stop",
    7: "robot emergency stop",
    8: "violation",
    9: "fault",
    10: "validate joint id",
    11: "undefined",
    12: "automatic mode safeguard stop",
    13: "system three position enabling stop",
}
ROBOT_MODE_RUNNING = 7
RUNTIME_PLAYING = 2
_EMERGENCY = (6, 7)
_RUNNING_SAFETY = (1, 2)


def rotvec_to_quaternion(r: Sequence[float]) -> np.ndarray:
    """x, y, z, w of a UR rotation vector (axis * angle)."""
    v = np.asarray(r, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([0.0, 0.0, 0.0, 1.0])
    axis = v / angle
    return np.array([*(axis * math.sin(angle / 2)), math.cos(angle / 2)])


# ---- grippers ----------------------------------------------------------------------------------------------


class GripperInterface(ABC):
    """A gripper driven by an opening in [0, 1] (0 closed, 1 fully open), as `irevla_ros.safety` defines."""

    @abstractmethod
    def connect(self) -> None:
        """Open the connection and activate; raises ArmConnectionError on failure."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection (idempotent)."""

    @abstractmethod
    def command(self, opening: float) -> None:
        """Start moving toward `opening`; returns without waiting."""

    @abstractmethod
    def opening(self) -> float:
        """The measured (or, without a sensor, the last commanded) opening."""


class NoGripper(GripperInterface):
    """No gripper: the opening is remembered, so the state reflects what was commanded."""

    def __init__(self) -> None:
        self._opening = 1.0

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def command(self, opening: float) -> None:
        self._opening = float(opening)

    def opening(self) -> float:
        return self._opening


class RobotiqGripper(GripperInterface):
    """A Robotiq 2F/Hand-E on the UR's tool port, through the Robotiq URCap's socket (text lines on 63352)."""

    def __init__(
        self, host: str, port: int = 63352, speed: int = 128, force: int = 100, timeout: float = 1.0
    ):
        for name, value in (("speed", speed), ("force", force)):
            if not 0 <= int(value) <= 255:
                raise ValueError(f"Robotiq {name} must lie in [0, 255], got {value}")
        self._host, self._port, self._timeout = host, int(port), float(timeout)
        self._speed, self._force = int(speed), int(force)
        self._sock: socket.socket | None = None
        self._buf = b""

    def _ask(self, line: str) -> str:
        if self._sock is None:
            raise ArmConnectionError(f"the Robotiq gripper at {self._host}:{self._port} is not connected")
        try:
            self._sock.sendall((line + "\n").encode())
            while b"\n" not in self._buf:
                chunk = self._sock.recv(1024)
                if not chunk:
                    raise ConnectionError("closed by the robot")
                self._buf += chunk
        except (OSError, ConnectionError) as exc:
            self.close()
            raise ArmConnectionError(f"lost the Robotiq gripper at {self._host}:{self._port}: {exc}") from exc
        reply, self._buf = self._buf.split(b"\n", 1)
        return reply.decode(errors="replace").strip()

    def _set(self, **values: int) -> None:
        line = "SET " + " ".join(f"{k} {v}" for k, v in values.items())
        reply = self._ask(line)
        if reply != "ack":
            raise ArmError(f"the Robotiq gripper refused {line!r}: {reply!r}")

    def _get(self, var: str) -> int:
        reply = self._ask(f"GET {var}")
        name, _, value = reply.partition(" ")
        if name != var or not value.strip().lstrip("-").isdigit():
            raise ArmError(f"unexpected Robotiq reply to GET {var}: {reply!r}")
        return int(value)

    def connect(self) -> None:
        try:
            self._sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        except OSError as exc:
            raise ArmConnectionError(
                f"cannot connect to the Robotiq URCap at {self._host}:{self._port}: {exc}"
            ) from exc
        if self._get("ACT") != 1 or self._get("STA") != 3:
            self._set(ACT=1)
            deadline = time.monotonic() + 5.0
            while self._get("STA") != 3:
                if time.monotonic() > deadline:
                    raise ArmError("the Robotiq gripper did not finish its activation within 5 s")
                time.sleep(0.05)
        self._set(SPE=self._speed, FOR=self._force, GTO=1)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def command(self, opening: float) -> None:
        self._set(POS=round((1.0 - opening) * 255))

    def opening(self) -> float:
        return 1.0 - self._get("POS") / 255.0


def make_gripper(kind: str, host: str, **params: Any) -> GripperInterface:
    if kind == "none":
        return NoGripper()
    if kind == "robotiq":
        return RobotiqGripper(host, **params)
    raise ValueError(f"unknown gripper kind {kind!r}; known kinds: ['none', 'robotiq']")


# ---- the arm -----------------------------------------------------------------------------------------------


class UrRtdeArm(ArmBackend):
    """ArmBackend for a UR controller at `host` (its address, or a protocol peer's loopback address)."""

    def __init__(
        self,
        host: str,
        frequency: float = 500.0,
        servo_rate: float = 125.0,
        max_speed: float = 0.1,
        lookahead_time: float = 0.1,
        gain: float = 300.0,
        stop_deceleration: float = 1.0,
        home_speed: float = 0.05,
        home_acceleration: float = 0.5,
        state_timeout: float = 0.5,
        gripper: str = "robotiq",
        gripper_port: int = 63352,
        gripper_speed: int = 128,
        gripper_force: int = 100,
        gripper_deadband: float = 0.02,
        orientation: Sequence[float] | None = None,
        joint_names: Sequence[str] = JOINT_NAMES,
    ) -> None:
        if not host:
            raise ValueError("host must name the UR controller's address")
        for name, value, low, high in (
            ("frequency", frequency, 1.0, 500.0),
            ("servo_rate", servo_rate, 10.0, 500.0),
            ("max_speed", max_speed, 1e-3, 1.0),
            ("lookahead_time", lookahead_time, 0.03, 0.2),
            ("gain", gain, 100.0, 2000.0),
            ("stop_deceleration", stop_deceleration, 0.1, 10.0),
            ("home_speed", home_speed, 1e-3, 0.5),
            ("home_acceleration", home_acceleration, 0.01, 2.0),
            ("state_timeout", state_timeout, 0.01, 10.0),
            ("gripper_deadband", gripper_deadband, 0.0, 0.5),
        ):
            if not (math.isfinite(value) and low <= value <= high):
                raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
        self._host = host
        self._frequency = float(frequency)
        self._servo_dt = 1.0 / float(servo_rate)
        self._max_speed = float(max_speed)
        self._lookahead = float(lookahead_time)
        self._gain = float(gain)
        self._stop_dec = float(stop_deceleration)
        self._home_speed = float(home_speed)
        self._home_acc = float(home_acceleration)
        self._state_timeout = float(state_timeout)
        self._deadband = float(gripper_deadband)
        self._gripper = make_gripper(
            gripper,
            host,
            **(
                {"port": gripper_port, "speed": gripper_speed, "force": gripper_force}
                if gripper == "robotiq"
                else {}
            ),
        )
        self._fixed_rotvec = None if orientation is None else np.asarray(orientation, dtype=np.float64)
        if self._fixed_rotvec is not None and self._fixed_rotvec.shape != (3,):
            raise ValueError(f"orientation must be a UR rotation vector rx, ry, rz, got {orientation!r}")
        self._joint_names = tuple(joint_names)
        self._lock = threading.RLock()  # the controller thread's calls and the servo thread's
        self._receive: Any = None
        self._control: Any = None
        self._dashboard: Any = None
        self._rotvec = np.zeros(3)
        self._target: np.ndarray | None = None  # latest approved position; None: holding
        self._setpoint: np.ndarray | None = None  # the ramp's point servoL follows
        self._servoing = False
        self._fault: ArmError | None = None  # raised by the servo thread's last cycle
        self._grip_sent: float | None = None
        self._last_stamp = (-1.0, 0.0)  # RTDE timestamp and the wall time it was first seen
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._connected = False

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
            import dashboard_client
            import rtde_control
            import rtde_receive

            try:
                self._dashboard = dashboard_client.DashboardClient(self._host)
                self._dashboard.connect()
                self._receive = rtde_receive.RTDEReceiveInterface(
                    self._host, self._frequency, list(RTDE_VARIABLES)
                )
                self._check_safety("connect")
                self._control = rtde_control.RTDEControlInterface(self._host, self._frequency)
                self._gripper.connect()
                pose = self._receive.getActualTCPPose()
            except ArmError:
                self._release()
                raise
            except Exception as exc:
                self._release()
                raise ArmConnectionError(f"cannot connect to the UR at {self._host}: {exc}") from exc
            self._rotvec = self._fixed_rotvec if self._fixed_rotvec is not None else np.asarray(pose[3:])
            self._grip_sent = None
            self._last_stamp = (-1.0, time.monotonic())
            self._target = self._setpoint = None
            self._fault = None
            self._connected = True
            self._stop.clear()
            self._thread = threading.Thread(target=self._servo_loop, name="ur_rtde servo", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
            self._stop.set()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=2.0)
        with self._lock:
            if was_connected and self._control is not None:
                # Closing: the arm is stopping or the link is gone either way, so errors change nothing here.
                with contextlib.suppress(Exception):
                    if self._control.isConnected():
                        self._control.servoStop(self._stop_dec)
                        self._control.stopScript()
            self._release()

    def _release(self) -> None:
        for client in (self._control, self._receive):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.disconnect()
        if self._dashboard is not None:
            with contextlib.suppress(Exception):
                self._dashboard.disconnect()
        self._gripper.close()
        self._control = self._receive = self._dashboard = None

    def _require(self) -> None:
        if not self._connected or self._receive is None:
            fault, self._fault = self._fault, None
            if isinstance(fault, ArmConnectionError):
                raise fault  # the servo thread saw the link go: say so once, then "not connected"
            raise ArmConnectionError(f"the UR at {self._host} is not connected")

    def _lost(self, why: str) -> ArmConnectionError:
        self._connected = False
        self._stop.set()
        return ArmConnectionError(f"lost the connection to the UR at {self._host}: {why}")

    def _check_link(self) -> None:
        """Raise ArmConnectionError if the RTDE link is down or its state stopped coming."""
        r = self._receive
        if not r.isConnected():
            raise self._lost("the RTDE connection closed")
        stamp, now = float(r.getTimestamp()), time.monotonic()
        if stamp != self._last_stamp[0]:
            self._last_stamp = (stamp, now)
        elif now - self._last_stamp[1] > self._state_timeout:
            raise self._lost(f"no new RTDE state for {now - self._last_stamp[1]:.2f} s")

    def _check_safety(self, doing: str) -> None:
        """Raise ArmError if the controller is in a protective/emergency stop or its program stopped."""
        r = self._receive
        mode = int(r.getSafetyMode())
        if mode in _EMERGENCY:
            raise ArmError(
                f"the UR at {self._host} is in an emergency stop ({SAFETY_MODES[mode]}) while trying to "
                f"{doing}: release it at the robot, then recover()"
            )
        if mode not in _RUNNING_SAFETY:
            raise ArmError(
                f"the UR at {self._host} is in a {SAFETY_MODES.get(mode, f'safety mode {mode}')} "
                f"(latched) while trying to {doing}: inspect the cause, then recover() (the dashboard "
                "unlocks it)"
            )
        robot_mode = int(r.getRobotMode())
        if robot_mode != ROBOT_MODE_RUNNING:
            raise ArmError(
                f"the UR at {self._host} is not running (robot mode {robot_mode}) while trying to {doing}: "
                "recover() powers it on and releases the brakes"
            )

    def _check_program(self, doing: str) -> None:
        if int(self._receive.getRuntimeState()) != RUNTIME_PLAYING:
            raise ArmError(
                f"the ur_rtde control script is not running on the UR at {self._host} while trying to "
                f"{doing} (stopped from the pendant or the dashboard?): recover() uploads it again"
            )

    def _ready(self, doing: str) -> None:
        self._require()
        fault, self._fault = self._fault, None
        # After a refusal the receive interface may lag the control interface by an RTDE cycle: give the
        # state a few cycles to say why before reporting the bare refusal.
        deadline = time.monotonic() + (5.0 / self._frequency if fault is not None else 0.0)
        while True:
            self._check_link()
            self._check_safety(doing)
            self._check_program(doing)
            if fault is None:
                return
            if time.monotonic() > deadline:
                raise fault
            time.sleep(1.0 / self._frequency)

    def recover(self, timeout: float = 10.0) -> None:
        """Clear a protective stop (and power the arm up) through the dashboard, then restart the control
        script.

        Raises ArmError with the controller's answer if it refuses (e.g. within 5 s of a protective stop, or
        while an emergency stop is still pressed)."""
        with self._lock:
            self._require()
            self._check_link()
            r, db = self._receive, self._dashboard
            mode = int(r.getSafetyMode())
            if mode in _EMERGENCY:
                raise ArmError(
                    f"the emergency stop of the UR at {self._host} is still engaged: release it first"
                )
            try:
                if mode not in _RUNNING_SAFETY:
                    db.unlockProtectiveStop()
                db.closeSafetyPopup()
                if int(r.getRobotMode()) != ROBOT_MODE_RUNNING:
                    db.powerOn()
                    db.brakeRelease()
            except Exception as exc:
                raise ArmError(f"the UR at {self._host} refused to recover: {exc}") from exc
            deadline = time.monotonic() + timeout
            while (
                int(r.getRobotMode()) != ROBOT_MODE_RUNNING or int(r.getSafetyMode()) not in _RUNNING_SAFETY
            ):
                if time.monotonic() > deadline:
                    raise ArmError(f"the UR at {self._host} did not come back to running within {timeout} s")
                time.sleep(0.02)
            if int(r.getRuntimeState()) != RUNTIME_PLAYING:
                if not self._control.reuploadScript():
                    raise ArmError(f"could not upload the control script to the UR at {self._host} again")
                while int(r.getRuntimeState()) != RUNTIME_PLAYING:
                    if time.monotonic() > deadline:
                        raise ArmError(f"the control script did not start on the UR at {self._host}")
                    time.sleep(0.01)
            self._target = self._setpoint = None
            self._servoing = False
            self._fault = None

    # ---- state ---------------------------------------------------------------------------------------------

    def read_state(self) -> ArmState:
        with self._lock:
            self._require()
            self._check_link()
            r = self._receive
            # ur_rtde reads one variable at a time while its thread stores each new RTDE package: a snapshot
            # is consistent when the controller timestamp did not change across the reads.
            for _ in range(5):
                robot_time = float(r.getTimestamp())
                pose = np.asarray(r.getActualTCPPose(), dtype=np.float64)
                q = np.asarray(r.getActualQ(), dtype=np.float64)
                qd = np.asarray(r.getActualQd(), dtype=np.float64)
                modes = (float(r.getSafetyMode()), float(r.getRobotMode()), float(r.getRuntimeState()))
                if float(r.getTimestamp()) == robot_time:
                    break
            stamp = time.monotonic()
            return ArmState(
                ee_position=pose[:3],
                ee_orientation=rotvec_to_quaternion(pose[3:]),
                gripper=float(np.clip(self._grip(self._gripper.opening), 0.0, 1.0)),
                joint_names=self._joint_names,
                joint_positions=q,
                joint_velocities=qd,
                stamp=stamp,
                extras={
                    "robot_time": robot_time,
                    "safety_mode": modes[0],
                    "robot_mode": modes[1],
                    "runtime_state": modes[2],
                },
            )

    # ---- commands ------------------------------------------------------------------------------------------

    @staticmethod
    def _position(ee_position: np.ndarray) -> np.ndarray:
        pos = np.asarray(ee_position, dtype=np.float64)
        if pos.shape != (3,) or not np.all(np.isfinite(pos)):
            raise ValueError(f"ee_position must be a finite 3-vector, got {ee_position!r}")
        return pos

    def send_target(self, ee_position: np.ndarray, gripper: float) -> None:
        pos = self._position(ee_position)
        with self._lock:
            self._ready("servo to a target")
            if self._target is None or self._setpoint is None:
                self._setpoint = np.asarray(self._receive.getActualTCPPose()[:3], dtype=np.float64)
            self._target = pos
            self._service_gripper(gripper)

    def hold(self) -> None:
        with self._lock:
            self._ready("hold")
            self._target = None
            if self._servoing:
                self._servoing = False
                if not self._control.servoStop(self._stop_dec):
                    self._check_safety("hold")
                    raise ArmError(f"the UR at {self._host} refused servoStop")

    def move_home(self, ee_position: np.ndarray, gripper: float, timeout: float = 30.0) -> None:
        """Blocking moveL at `home_speed` / `home_acceleration`, orientation held; ArmError on failure."""
        pos = self._position(ee_position)
        with self._lock:
            self.hold()
            self._service_gripper(gripper)
            distance = float(np.linalg.norm(pos - np.asarray(self._receive.getActualTCPPose()[:3])))
            if distance / self._home_speed > timeout:
                raise ArmError(
                    f"home is {distance:.3f} m away: more than {timeout} s at {self._home_speed} m/s"
                )
            ok = self._control.moveL([*pos, *self._rotvec], self._home_speed, self._home_acc, False)
            if not ok:
                self._check_link()
                self._check_safety("move home")
                raise ArmError(f"the UR at {self._host} did not complete the home move")
            deadline = time.monotonic() + timeout
            while abs(self._grip(self._gripper.opening) - float(np.clip(gripper, 0.0, 1.0))) > max(
                self._deadband, 0.02
            ):
                if time.monotonic() > deadline:
                    raise ArmError(f"gripper did not reach home opening within {timeout} s")
                time.sleep(0.02)

    def _service_gripper(self, opening: float) -> None:
        value = float(opening)
        if not math.isfinite(value):
            raise ValueError(f"gripper opening must be finite, got {opening!r}")
        value = float(np.clip(value, 0.0, 1.0))
        if self._grip_sent is not None and abs(value - self._grip_sent) <= self._deadband:
            return
        self._grip(self._gripper.command, value)
        self._grip_sent = value

    def _grip(self, fn: Any, *args: Any) -> Any:
        # The gripper hangs off the same controller: losing its socket is losing the robot.
        try:
            return fn(*args)
        except ArmConnectionError as exc:
            raise self._lost(str(exc)) from exc

    def _servo_loop(self) -> None:
        next_at = last = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                now = time.monotonic()
                if self._connected and self._target is not None and self._setpoint is not None:
                    # The ramp advances by the time that really passed (a late cycle, then a quick one, must
                    # not move the setpoint faster than max_speed), at most two periods after a stall.
                    self._servo_step(min(now - last, 2 * self._servo_dt))
                last = now
            next_at += self._servo_dt
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()

    def _servo_step(self, elapsed: float) -> None:
        assert self._target is not None and self._setpoint is not None
        step = self._target - self._setpoint
        dist = float(np.linalg.norm(step))
        reach = self._max_speed * elapsed
        self._setpoint = self._target.copy() if dist <= reach else self._setpoint + step * (reach / dist)
        try:
            ok = self._control.servoL(
                [*self._setpoint, *self._rotvec], 0.0, 0.0, self._servo_dt, self._lookahead, self._gain
            )
        except Exception as exc:
            self._fault = self._lost(f"servoL failed: {exc}")
            return
        self._servoing = True
        if not ok:
            # The controller refused (a stop, the script ended): stop streaming until the controller thread
            # has seen why (its next call raises) and the arm is recovered.
            self._target = None
            self._servoing = False
            self._fault = ArmError(f"the UR at {self._host} refused servoL")
