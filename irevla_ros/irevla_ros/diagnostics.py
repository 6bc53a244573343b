"""What each node reports on /diagnostics, without ROS: levels, messages and key-values from plain numbers.

A node keeps a few counters and windows of recent events, takes a snapshot of them once per check, and one of
the `*_status` functions here turns the snapshot into a `Status` (diagnostic_msgs/DiagnosticStatus without the
message type; `nodes/diagnostics_publisher.py` converts and publishes it). The rules live here, once, with
unit tests; the nodes only measure.

Conventions (diagnostic_updater's): a status is named "<node name>: <what>", its level is the worst of its
problems and its message lists every problem, worst first ("; "-joined), or says what the node is doing when all
is well. Absent data (None or NaN: no frame yet, no clock yet) is never read as fine: each check says what it
does with it. Ages and rates are in seconds of the clock the node's inputs are stamped with (ROS time: simulated
time under use_sim_time), so a paused simulation is not stale; grace periods after start are wall seconds.

Thresholds (why these numbers):
- camera: a frame older than max(3 periods, 0.5 s) is WARN, older than max(10 periods, 1 s) ERROR (periods of
  the configured fps: a few dropped frames are a warning, a second without one is a dead stream; the floors keep
  scheduling jitter on a loaded 2-core machine from flapping a 30 Hz camera). The publish rate, measured over
  RATE_WINDOW once the node has run that long, below RATE_WARN_FRACTION of the fps is WARN. A backend error
  newer than the newest frame is ERROR; so is a file or recording that has ended.
- policy: an input (camera frame, end-effector pose, gripper state) older than the policy's own limit
  (max_image_age, max_state_age: a tick would hold on it) is WARN, older than max(INPUT_ERROR_FACTOR x that
  limit, 1 s) ERROR. Missed control ticks, ticks whose computation overran the control period, and a newest
  tick that held (with its reason) within the last EVENT_WINDOW are WARN.
- arm controller: a latched e-stop or a disconnected backend is ERROR (with the reason); robot state older
  than max(3, 0.5 s) / max(10 periods, 1 s) of `state_rate` is WARN / ERROR; commands the safety layer refused
  within EVENT_WINDOW are WARN.
- trainer: an iteration error is ERROR; free disk space at the store below the node's disk_warn_free_gb /
  disk_error_free_gb is WARN / ERROR; a failed episode write is ERROR until a later one succeeds; the newest
  episode write slower than WRITE_LATENCY_WARN is WARN.
- episode manager: a reset running longer than reset_timeout (abandoned at the next tick), or the newest reset
  failed, is ERROR (with the time to the next try); waiting for the required nodes or for a reset service is WARN.
- teleop: a device reader's error (unplugged, no permission) is ERROR; a malformed /joy is WARN.
- simulated cell: its stepping thread dead is ERROR; periods that advanced without an arm command (each waited
  max_wall_wait) within EVENT_WINDOW are WARN.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

# Every window of recent events (missed ticks, holds, refused commands) and the camera's rate window.
EVENT_WINDOW = 5.0  # s
RATE_WINDOW = 5.0  # s
RATE_WARN_FRACTION = 0.8
# A camera's age thresholds in periods of its fps, with floors in seconds (see the module docstring).
CAMERA_WARN_PERIODS, CAMERA_WARN_FLOOR = 3.0, 0.5
CAMERA_ERROR_PERIODS, CAMERA_ERROR_FLOOR = 10.0, 1.0
# The same rule for the arm controller's state, in periods of state_rate.
STATE_WARN_PERIODS, STATE_WARN_FLOOR = 3.0, 0.5
STATE_ERROR_PERIODS, STATE_ERROR_FLOOR = 10.0, 1.0
# A policy input this many times its own staleness limit (and at least a second) old is an error.
INPUT_ERROR_FACTOR, INPUT_ERROR_FLOOR = 4.0, 1.0
# Wall seconds after a node starts during which data that has never arrived is a warning, not an error.
STARTUP_GRACE = 10.0
# s: writing one episode (MCAP + fsync + catalogue commit) slower than this means the disk cannot keep up.
WRITE_LATENCY_WARN = 10.0

GB = 1e9


class Level(IntEnum):
    """diagnostic_msgs/DiagnosticStatus levels (the byte values)."""

    OK = 0
    WARN = 1
    ERROR = 2
    STALE = 3


class DiagnosticsConfigError(ValueError):
    """A threshold that cannot work (negative, NaN, the warning beyond the error)."""


# The "<what>" of each status name; the "<node name>: " part is the node's own name.
CAMERA_TASK = "frames"
POLICY_TASK = "control"
ARM_TASK = "arm"
SESSION_TASK = "session"
ITERATION_TASK = "iteration"
STORE_TASK = "episode store"
TELEOP_TASK = "device"
SIM_TASK = "world"


def status_name(node: str, task: str) -> str:
    """diagnostic_updater's naming: "<node name>: <what>" (the node's name, without its namespace)."""
    return f"{node}: {task}"


@dataclass(frozen=True)
class Status:
    """One diagnostic_msgs/DiagnosticStatus."""

    name: str
    level: Level
    message: str
    hardware_id: str = ""
    values: tuple[tuple[str, str], ...] = ()

    def value(self, key: str) -> str | None:
        return next((v for k, v in self.values if k == key), None)


def absent(value: float | None) -> bool:
    """No measurement: None or NaN."""
    return value is None or math.isnan(value)


def format_value(value: object) -> str:
    """A key-value's text: floats to 3 decimals (4 significant digits below 1), absent as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.3f}"
    return str(value)


class StatusBuilder:
    """Collects the problems and key-values of one status (diagnostic_updater's DiagnosticStatusWrapper)."""

    def __init__(self, name: str, hardware_id: str = "") -> None:
        self.name = name
        self.hardware_id = hardware_id
        self._problems: list[tuple[Level, str]] = []
        self._values: dict[str, str] = {}

    def problem(self, level: Level, message: str) -> None:
        """A condition at `level` (OK: nothing to report, ignored)."""
        if level > Level.OK:
            self._problems.append((level, message))

    def add(self, key: str, value: object) -> None:
        self._values[key] = format_value(value)

    def update(self, values: Mapping[str, object]) -> None:
        for key, value in values.items():
            self.add(key, value)

    @property
    def level(self) -> Level:
        return max((level for level, _ in self._problems), default=Level.OK)

    def build(self, ok_message: str) -> Status:
        """The status: worst level, every problem worst first, or `ok_message` when there is none."""
        ordered = sorted(self._problems, key=lambda p: -p[0])  # stable: same level keeps its order
        message = "; ".join(m for _, m in ordered) if ordered else ok_message
        return Status(self.name, self.level, message, self.hardware_id, tuple(self._values.items()))


@dataclass(frozen=True)
class AgeLimits:
    """Ages (s) beyond which something is WARN and ERROR (inf: never)."""

    warn: float
    error: float

    def __post_init__(self) -> None:
        for name in ("warn", "error"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise DiagnosticsConfigError(f"age limit {name} must be a number >= 0, got {value!r}")
        if self.warn > self.error:
            raise DiagnosticsConfigError(f"age limit warn {self.warn} is beyond error {self.error}")

    @classmethod
    def from_period(
        cls, period: float, warn_periods: float, warn_floor: float, error_periods: float, error_floor: float
    ) -> AgeLimits:
        """Limits in periods of a rate, with floors in seconds."""
        if not (math.isfinite(period) and period > 0):
            raise DiagnosticsConfigError(f"period must be positive and finite, got {period!r}")
        return cls(max(warn_periods * period, warn_floor), max(error_periods * period, error_floor))

    @classmethod
    def from_limit(cls, limit: float) -> AgeLimits:
        """A consumer's own staleness limit is the warning; INPUT_ERROR_FACTOR times it (>= 1 s) the error."""
        if not isinstance(limit, (int, float)) or math.isnan(limit) or limit < 0:
            raise DiagnosticsConfigError(f"staleness limit must be a number >= 0, got {limit!r}")
        return cls(float(limit), max(INPUT_ERROR_FACTOR * limit, INPUT_ERROR_FLOOR, float(limit)))

    def level(self, age: float) -> Level:
        """The level of a present `age` (a negative age, a stamp slightly ahead of this clock, is fresh)."""
        if age > self.error:
            return Level.ERROR
        if age > self.warn:
            return Level.WARN
        return Level.OK


def check_age(
    builder: StatusBuilder, what: str, age: float | None, limits: AgeLimits, since_start: float
) -> None:
    """Add `what`'s age to `builder` with its level; never seen: WARN during STARTUP_GRACE, ERROR after."""
    if absent(age):
        if since_start > STARTUP_GRACE:
            builder.problem(Level.ERROR, f"{what}: nothing received in {since_start:.0f} s")
        else:
            builder.problem(Level.WARN, f"{what}: nothing received yet")
        return
    assert age is not None
    level = limits.level(age)
    if level is Level.ERROR:
        builder.problem(level, f"{what}: newest {age:.2f} s old (error beyond {limits.error:g} s)")
    elif level is Level.WARN:
        builder.problem(level, f"{what}: newest {age:.2f} s old (stale beyond {limits.warn:g} s)")


class EventWindow:
    """Events of the last `window` seconds of one clock, each with a value; thread-safe.

    `rate` is events per second over the whole window, and None until the first event is a window old (a
    partial window would read low at start): a stream that stops then decays to 0 within a window."""

    def __init__(self, window: float = EVENT_WINDOW) -> None:
        if not (math.isfinite(window) and window > 0):
            raise DiagnosticsConfigError(f"window must be positive and finite, got {window!r}")
        self.window = float(window)
        self._events: deque[tuple[float, float]] = deque()
        self._first: float | None = None
        self._lock = threading.Lock()

    def add(self, t: float, value: float = 1.0) -> None:
        with self._lock:
            if self._events and t < self._events[-1][0]:  # the clock went back (simulated time reset)
                self._events.clear()
                self._first = None
            if self._first is None:
                self._first = t
            self._events.append((t, float(value)))

    def _recent(self, now: float) -> list[tuple[float, float]]:
        with self._lock:
            while self._events and self._events[0][0] <= now - self.window:
                self._events.popleft()
            return [e for e in self._events if e[0] <= now]

    def count(self, now: float) -> int:
        return len(self._recent(now))

    def values(self, now: float) -> list[float]:
        return [v for _, v in self._recent(now)]

    def newest(self) -> float | None:
        """Time of the newest event (None: none yet)."""
        with self._lock:
            return self._events[-1][0] if self._events else None

    def rate(self, now: float) -> float | None:
        recent = self._recent(now)
        with self._lock:
            first = self._first
        if first is None or now - first < self.window:
            return None
        return len(recent) / self.window


# --- camera -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CameraSnapshot:
    fps: float  # configured publish rate (Hz)
    rate: float | None  # measured over RATE_WINDOW (None: not run that long yet)
    frame_age: float | None  # s since the newest published frame (None: none yet)
    since_start: float  # wall s since the node started
    frames: int  # published since start
    error: str | None = None  # the backend's newest read error, if newer than the newest frame
    ended: bool = False  # a file or recording without loop has delivered its last frame


def camera_limits(fps: float) -> AgeLimits:
    if not (math.isfinite(fps) and fps > 0):
        raise DiagnosticsConfigError(f"camera fps must be positive and finite, got {fps!r}")
    return AgeLimits.from_period(
        1.0 / fps, CAMERA_WARN_PERIODS, CAMERA_WARN_FLOOR, CAMERA_ERROR_PERIODS, CAMERA_ERROR_FLOOR
    )


def camera_status(node: str, hardware_id: str, s: CameraSnapshot) -> Status:
    limits = camera_limits(s.fps)
    b = StatusBuilder(status_name(node, CAMERA_TASK), hardware_id)
    if s.error is not None:
        b.problem(Level.ERROR, f"backend error: {s.error}")
    if s.ended:
        b.problem(Level.ERROR, "the source has ended (a file or recording without loop)")
    check_age(b, "frames", s.frame_age, limits, s.since_start)
    if not absent(s.rate) and s.rate is not None and s.rate < RATE_WARN_FRACTION * s.fps:
        b.problem(Level.WARN, f"publishing {s.rate:.1f} Hz, configured {s.fps:g} Hz")
    b.update(
        {
            "fps": s.fps,
            "rate": s.rate,
            "frame_age": s.frame_age,
            "frames": s.frames,
            "age_warn": limits.warn,
            "age_error": limits.error,
        }
    )
    return b.build(f"{s.rate:.1f} Hz" if s.rate is not None else f"{s.frames} frames")


# --- policy -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputAge:
    """One input of the policy's observation: the age of its newest message and the policy's own limit."""

    name: str
    age: float | None
    max_age: float


@dataclass(frozen=True)
class PolicySnapshot:
    policy: str
    version: str
    in_episode: bool
    inputs: tuple[InputAge, ...]
    since_start: float  # wall s
    period: float  # control period (s)
    ticks: int  # ticks in the window that ran in an episode
    missed: int  # ticks missed in the window
    overruns: int  # ticks in the window whose computation took longer than the period
    slowest_tick: float | None  # s, the longest computation in the window
    holds: int  # ticks in the window that held
    hold_reason: str | None  # the newest tick's hold reason (None: it acted, or no tick yet)
    counters: Mapping[str, object] = field(default_factory=dict)  # cumulative values, reported as they are


def policy_status(node: str, s: PolicySnapshot) -> Status:
    b = StatusBuilder(status_name(node, POLICY_TASK))
    b.update(s.counters)  # first: the keys /policy/status readers have always found there
    for item in s.inputs:
        check_age(b, item.name, item.age, AgeLimits.from_limit(item.max_age), s.since_start)
        b.add("age_" + item.name.replace(" ", "_"), item.age)
    if s.missed:
        b.problem(Level.WARN, f"{s.missed} control tick(s) missed in the last {EVENT_WINDOW:g} s")
    if s.overruns:
        slowest = f" (slowest {s.slowest_tick:.3f} s)" if s.slowest_tick is not None else ""
        b.problem(
            Level.WARN,
            f"{s.overruns} of {s.ticks} tick(s) took longer than the {s.period:g} s period{slowest}",
        )
    if s.in_episode and s.hold_reason is not None:
        b.problem(Level.WARN, f"holding: {s.hold_reason} ({s.holds} of {s.ticks} ticks held)")
    b.update(
        {
            "in_episode": s.in_episode,
            "recent_ticks": s.ticks,
            "recent_missed_ticks": s.missed,
            "recent_overruns": s.overruns,
            "slowest_tick": s.slowest_tick,
            "recent_holds": s.holds,
            "hold_reason": s.hold_reason or "",
        }
    )
    activity = "in an episode" if s.in_episode else "idle"
    return b.build(f"{s.policy} {s.version}, {activity}")


# --- arm controller -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmSnapshot:
    backend: str
    connected: bool
    estop_reason: str | None  # None: not latched
    state_age: float | None  # s since the newest robot state the controller published (None: none yet)
    state_rate: float  # Hz
    since_start: float  # wall s
    rejected: int  # commands the safety layer refused within the window
    last_rejection: str  # its reason
    holding: str  # why the arm holds now ("" while it follows commands)
    homing: bool
    counters: Mapping[str, object] = field(default_factory=dict)
    aborted: int = 0  # motions the arm aborted without a fault (ArmMotionAborted) within the window
    last_abort: str = ""  # the newest one's message


def arm_status(node: str, hardware_id: str, s: ArmSnapshot) -> Status:
    b = StatusBuilder(status_name(node, ARM_TASK), hardware_id)
    if s.estop_reason is not None:
        b.problem(Level.ERROR, f"e-stop latched: {s.estop_reason}")
    if not s.connected:
        b.problem(Level.ERROR, f"backend {s.backend} is not connected")
    limits = AgeLimits.from_period(
        1.0 / s.state_rate, STATE_WARN_PERIODS, STATE_WARN_FLOOR, STATE_ERROR_PERIODS, STATE_ERROR_FLOOR
    )
    check_age(b, "robot state", s.state_age, limits, s.since_start)
    if s.rejected:
        b.problem(
            Level.WARN,
            f"{s.rejected} command(s) refused by the safety layer in the last {EVENT_WINDOW:g} s: "
            f"{s.last_rejection}",
        )
    if s.aborted:
        b.problem(
            Level.WARN,
            f"{s.aborted} motion(s) aborted by the arm in the last {EVENT_WINDOW:g} s: {s.last_abort}",
        )
    b.update(s.counters)
    b.update(
        {
            "estop": "latched" if s.estop_reason is not None else "clear",
            "connected": s.connected,
            "state_age": s.state_age,
            "recent_rejected": s.rejected,
            "holding": s.holding,
            "homing": s.homing,
        }
    )
    if s.homing:
        ok = "moving home"
    elif s.holding:
        ok = f"holding: {s.holding}"
    else:
        ok = "following commands"
    return b.build(ok)


# --- episode manager ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionSnapshot:
    state: str  # idle, resetting, running, awaiting_label, paused
    finished: bool
    waiting_for: Sequence[str]  # required nodes not yet listening to the episode events
    reset_running: float | None  # wall s the reset in progress has taken (None: none in progress)
    reset_timeout: float
    reset_error: str | None  # the newest reset's failure (None: it succeeded, or none yet)
    reset_service: bool  # a reset service (simulator or arm homing) is available
    wants_reset: bool
    counters: Mapping[str, object] = field(default_factory=dict)
    # s until the next try after a failed reset (None: no failure pending)
    reset_retry_in: float | None = None


def session_status(node: str, s: SessionSnapshot) -> Status:
    b = StatusBuilder(status_name(node, SESSION_TASK))
    if s.waiting_for:
        b.problem(
            Level.WARN, f"waiting for {', '.join(sorted(s.waiting_for))} to listen to the episode events"
        )
    if s.reset_running is not None and s.reset_running > s.reset_timeout:
        b.problem(
            Level.ERROR, f"reset running for {s.reset_running:.0f} s (reset_timeout {s.reset_timeout:g} s)"
        )
    if s.reset_error is not None:
        retry = (
            f" (trying again in {max(0.0, s.reset_retry_in):.0f} s)"
            if s.reset_retry_in is not None and s.reset_running is None
            else ""
        )
        b.problem(Level.ERROR, f"reset failed: {s.reset_error}{retry}")
    if s.wants_reset and not s.reset_service and s.reset_running is None:
        b.problem(Level.WARN, "no reset service (/sim/reset_episode, /arm_controller/reset_home) available")
    b.update(s.counters)
    b.update({"state": s.state, "finished": s.finished})
    return b.build(f"{s.state}{', finished' if s.finished else ''}")


# --- trainer ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IterationSnapshot:
    iterate: bool  # False: the trainer only stores episodes
    phase: str  # session, supervised, validating, announcing ("" without iterations)
    iteration: int
    active_version: str
    error: str | None  # the runner's newest error
    message: str  # its progress message (e.g. "no iterations yet: ...")


def iteration_status(node: str, s: IterationSnapshot) -> Status:
    b = StatusBuilder(status_name(node, ITERATION_TASK))
    if s.error:
        b.problem(Level.ERROR, f"iteration failed: {s.error}")
    b.update(
        {
            "phase": s.phase if s.iterate else "store only",
            "iteration": s.iteration,
            "active_version": s.active_version,
        }
    )
    if not s.iterate:
        return b.build("storing episodes (iterate off)")
    note = f": {s.message}" if s.message else ""
    return b.build(f"phase {s.phase}, iteration {s.iteration}{note}")


@dataclass(frozen=True)
class StoreSnapshot:
    path: str
    stored: int  # episodes in the store
    incomplete: int
    pending: int  # being assembled or waiting for the writer
    free_bytes: float | None  # at the store's file system (None: could not be read)
    disk_error: str | None  # why it could not be read
    warn_free_gb: float
    error_free_gb: float
    write_latency: float | None  # s, the newest episode's write (None: none yet)
    write_failure: str | None  # the newest write's failure (None: it succeeded, or none yet)


def store_status(node: str, s: StoreSnapshot) -> Status:
    if not (0 <= s.error_free_gb <= s.warn_free_gb):
        raise DiagnosticsConfigError(
            f"disk thresholds need 0 <= error ({s.error_free_gb} GB) <= warn ({s.warn_free_gb} GB)"
        )
    b = StatusBuilder(status_name(node, STORE_TASK))
    if s.disk_error is not None or absent(s.free_bytes):
        b.problem(Level.ERROR, f"free disk space unknown: {s.disk_error or 'not measured'}")
    else:
        assert s.free_bytes is not None
        free_gb = s.free_bytes / GB
        if free_gb < s.error_free_gb:
            b.problem(Level.ERROR, f"{free_gb:.2f} GB free at the store (error below {s.error_free_gb:g} GB)")
        elif free_gb < s.warn_free_gb:
            b.problem(Level.WARN, f"{free_gb:.2f} GB free at the store (warning below {s.warn_free_gb:g} GB)")
    if s.write_failure is not None:
        b.problem(Level.ERROR, f"storing an episode failed: {s.write_failure}")
    if s.write_latency is not None and s.write_latency > WRITE_LATENCY_WARN:
        b.problem(
            Level.WARN,
            f"the newest episode took {s.write_latency:.1f} s to store (over {WRITE_LATENCY_WARN:g} s)",
        )
    b.update(
        {
            "path": s.path,
            "episodes_stored": s.stored,
            "episodes_incomplete": s.incomplete,
            "episodes_pending": s.pending,
            "free_gb": None if absent(s.free_bytes) else (s.free_bytes or 0.0) / GB,
            "free_warn_gb": s.warn_free_gb,
            "free_error_gb": s.error_free_gb,
            "write_latency": s.write_latency,
        }
    )
    return b.build(f"{s.stored} episodes stored, {s.pending} pending")


# --- teleop -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeleopSnapshot:
    device: str  # joy_topic, evdev, spacemouse
    device_error: str | None  # the reader's error (device modes)
    joy_age: float | None  # s since the newest /joy (None: none yet)
    layout_error: str | None  # the newest /joy could not be mapped
    deadman: bool  # the deadman button is held
    engaged: bool  # the takeover button is held
    commands: int


def teleop_status(node: str, hardware_id: str, s: TeleopSnapshot) -> Status:
    b = StatusBuilder(status_name(node, TELEOP_TASK), hardware_id)
    if s.device_error is not None:
        b.problem(Level.ERROR, f"{s.device}: {s.device_error}")
    if s.layout_error is not None:
        b.problem(Level.WARN, f"/joy ignored: {s.layout_error}")
    b.update(
        {
            "device": s.device,
            "connected": s.device_error is None if s.device != "joy_topic" else None,
            "joy_age": s.joy_age,
            "deadman": "held" if s.deadman else "released",
            "engaged": s.engaged,
            "commands": s.commands,
        }
    )
    if s.joy_age is None:
        return b.build("no /joy yet")
    state = "engaged" if s.engaged else ("deadman held" if s.deadman else "deadman released")
    return b.build(state)


# --- simulated cell -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SimSnapshot:
    running: bool  # the stepping thread is alive
    stopping: bool  # ... or was asked to stop
    sim_time: float  # s
    periods: int
    uncommanded: int  # periods within the window that advanced without an arm command
    max_wall_wait: float  # s


def sim_status(node: str, s: SimSnapshot) -> Status:
    b = StatusBuilder(status_name(node, SIM_TASK))
    if not s.running and not s.stopping:
        b.problem(Level.ERROR, "the cell's stepping thread has died: simulated time stands still")
    if s.uncommanded:
        b.problem(
            Level.WARN,
            f"{s.uncommanded} period(s) in the last {EVENT_WINDOW:g} s advanced without an arm command "
            f"(each after {s.max_wall_wait:g} s of wall time)",
        )
    b.update({"sim_time": s.sim_time, "periods": s.periods, "recent_uncommanded_periods": s.uncommanded})
    return b.build(f"t = {s.sim_time:.1f} s, {s.periods} periods")


def worst(statuses: Iterable[Status]) -> Level:
    return max((s.level for s in statuses), default=Level.OK)
