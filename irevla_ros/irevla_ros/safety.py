"""The one safety layer between a policy and any arm backend.

A policy emits normalised actions (dx, dy, dz, gripper) in [-1, 1]; the layer turns each into an absolute
Cartesian target (metres, robot base frame) and a gripper opening that are guaranteed to lie inside the
workspace box, to move at most `max_step` per tick and at most `max_speed` between accepted commands, and to
be a hold whenever the input is garbage, the action stream went silent (watchdog) or an e-stop is latched.

Gripper conventions (the single place they are defined):
- Policy action `a[3]` follows Meta-World: -1 opens, +1 closes.
- The layer outputs an *opening* in [gripper_min, gripper_max], normalised 0 (closed) .. 1 (fully open):
  `opening = gripper_max - (a + 1) / 2 * (gripper_max - gripper_min)`, so a = -1 -> gripper_max.
- Each backend maps the opening to its hardware: `hardware.arm.sim.opening_to_metaworld_gripper` (back to
  Meta-World's -1 open .. +1 closed; the round trip is the identity for the default range 0..1), and the
  Franka backend uses `opening * max_width` metres.

Anti-windup: targets are integrated from the last *commanded* target (not from the measured position), so a
lagging arm cannot make consecutive targets jump; and a target is never pushed further than
`SafetyLimits.lead_limit` from the measured end effector, so a stream of actions cannot wind the target up
far ahead of an arm that is not following.
"""

from __future__ import annotations

import enum
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

import numpy as np

from irevla_ros.param_spec import check_settings, internal, required, setting

# Absolute slack for the invariant checks: float rounding of a clip or a rescale, never a real violation.
_EPS = 1e-9

Vec3 = tuple[float, float, float]


class SafetyConfigError(ValueError):
    """A SafetyLimits field is missing, unknown, non-finite or inconsistent; the message names the field."""


class SafetyInvariantError(RuntimeError):
    """The layer was about to emit a command outside its own limits. A bug in this module, never expected."""


class CommandStatus(str, enum.Enum):
    OK = "ok"
    CLIPPED = "clipped"
    REJECTED_NONFINITE = "rejected_nonfinite"
    REJECTED_SHAPE = "rejected_shape"
    REJECTED_MAGNITUDE = "rejected_magnitude"
    REJECTED_OUTSIDE_WORKSPACE = "rejected_outside_workspace"
    ESTOP = "estop"
    HOLD_WATCHDOG = "hold_watchdog"


_MOVING = frozenset({CommandStatus.OK, CommandStatus.CLIPPED})


def _vec3(name: str, value: object) -> Vec3:
    # Only the length: check_settings then checks each number (finite) like every other field.
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SafetyConfigError(f"{name} must be 3 numbers, got {value!r}") from exc
    if arr.shape != (3,):
        raise SafetyConfigError(f"{name} must be 3 numbers, got shape {arr.shape}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise SafetyConfigError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise SafetyConfigError(f"{name} must be finite, got {out}")
    return out


@dataclass(frozen=True)
class SafetyLimits:
    """Limits shared by every arm backend. Lengths in metres (robot base frame), times in seconds.

    The fields are the arm controller's parameters (`parameter_specs(SafetyLimits)`, same names). The box and
    home must be given here; the node's parameter defaults for them are the simulated cell's (Meta-World's hand
    bounds): a real arm's profile sets its own box and speed."""

    # runtime=True: settable while the arm controller runs (`ros2 param set`); the node re-validates the whole set
    # and swaps it into the layer between two commands (`SafetyLayer.set_limits`). The others are read-only,
    # each for the reason beside it.
    workspace_low: Vec3 = required(
        "workspace box lower corner (m, base frame)", (-0.525, 0.348, -0.0525), runtime=True
    )
    workspace_high: Vec3 = required(
        "workspace box upper corner (m, base frame)", (0.525, 1.025, 0.7), runtime=True
    )
    home: Vec3 = required("reset-to-home end-effector position (m)", (0.0, 0.6, 0.2), runtime=True)
    max_step: float = setting(
        0.01, "largest end-effector move per command (m)", min=1e-4, max=0.1, runtime=True
    )
    # Above max_step per control period (0.1 m/s at 10 Hz), so that it bounds bursts of early commands without
    # clipping every step of a regular stream. Read-only: the arm backend's own speed cap (franky's velocity
    # limit, ur_rtde's servo ramp) is set from it at connect, so a change would hold for the layer alone.
    max_speed: float = setting(0.25, "largest end-effector speed (m/s)", min=1e-3, max=1.0)
    gripper_min: float = setting(
        0.0, "smallest gripper command (normalised opening)", min=0.0, max=1.0, runtime=True
    )
    gripper_max: float = setting(
        1.0, "largest gripper command (normalised opening)", min=0.0, max=1.0, runtime=True
    )
    watchdog_timeout: float = setting(
        0.3, "hold the arm when the newest action is older than this (s)", min=0.01, runtime=True
    )
    # Read-only: it is what a normalised action means, the scale the policy was trained and its episodes recorded
    # under (and the direct rollout replays), not a limit; max_step bounds every step whatever it is.
    action_scale: float = setting(0.01, "metres per unit of normalised policy action", min=1e-4, max=0.1)
    max_abs_action: float = setting(
        10.0, "normalised actions above this magnitude are rejected as garbage", min=1.0, runtime=True
    )
    home_gripper: float = setting(1.0, "gripper opening at home", min=0.0, max=1.0, runtime=True)
    max_lead: float | None = internal(
        None, "how far the target may run ahead of the measured end effector; None: 4 * max_step"
    )

    def __post_init__(self) -> None:
        for name in ("workspace_low", "workspace_high", "home"):
            object.__setattr__(self, name, _vec3(name, getattr(self, name)))
        # Each field against its declaration (type, finite, range); below, only what relates fields.
        check_settings(self, SafetyConfigError, "safety limit")
        low, high, home = self.workspace_low, self.workspace_high, self.home
        for axis, (lo, hi) in enumerate(zip(low, high, strict=True)):
            if not lo < hi:
                raise SafetyConfigError(
                    f"workspace_low[{axis}]={lo} must be below workspace_high[{axis}]={hi}"
                )
        g_min, g_max = self.gripper_min, self.gripper_max
        if not g_min < g_max:
            raise SafetyConfigError(f"gripper_min={g_min} must be below gripper_max={g_max}")
        if not g_min <= self.home_gripper <= g_max:
            raise SafetyConfigError(f"home_gripper={self.home_gripper} must lie in [{g_min}, {g_max}]")
        outside = [a for a in range(3) if not low[a] <= home[a] <= high[a]]
        if outside:
            raise SafetyConfigError(f"home={list(home)} lies outside the workspace box on axes {outside}")
        if self.max_lead is not None:
            lead = _number("max_lead", self.max_lead)
            if lead < self.max_step:
                raise SafetyConfigError(f"max_lead={lead} must be >= max_step={self.max_step}")
            object.__setattr__(self, "max_lead", lead)

    @property
    def lead_limit(self) -> float:
        return 4.0 * self.max_step if self.max_lead is None else float(self.max_lead)

    @property
    def low(self) -> np.ndarray:
        return np.array(self.workspace_low, dtype=np.float64)

    @property
    def high(self) -> np.ndarray:
        return np.array(self.workspace_high, dtype=np.float64)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SafetyLimits:
        """Build from a parameter mapping (e.g. YAML); unknown or missing keys raise SafetyConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SafetyConfigError(f"unknown safety limit keys {unknown}; known keys: {sorted(known)}")
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise SafetyConfigError(f"missing safety limit keys {missing}")
        return cls(**dict(values))


def policy_gripper_to_opening(action: float, gripper_min: float, gripper_max: float) -> float:
    """Meta-World gripper action (-1 open .. +1 closed) to an opening in [gripper_min, gripper_max]."""
    a = min(1.0, max(-1.0, float(action)))
    opening = gripper_max - (a + 1.0) * 0.5 * (gripper_max - gripper_min)
    return min(gripper_max, max(gripper_min, opening))


@dataclass(frozen=True)
class SafeCommand:
    """What the arm should do this tick.

    `target` is None only for a hold issued before the layer ever produced a target (no action accepted yet
    since construction or `reset`): the caller must then call `ArmBackend.hold()` instead of `send_target`.
    A hold after that repeats the last safe target and gripper, so it never moves the arm.
    """

    target: np.ndarray | None
    gripper: float | None
    status: CommandStatus
    reason: str
    stamp: float
    step: float = 0.0  # distance from the previous commanded target (or the measured position), metres

    @property
    def moves(self) -> bool:
        """True if this command came from an accepted action or goal (it may still be a zero-length step)."""
        return self.status in _MOVING

    @property
    def is_hold(self) -> bool:
        return not self.moves


@dataclass
class _State:
    target: np.ndarray | None = None
    gripper: float | None = None
    last_accept_time: float | None = None  # high-water mark of accepted command times
    last_valid_time: float | None = None
    estop_reason: str | None = None


class SafetyLayer:
    """Turns policy actions into safe absolute targets; thread-safe (one lock around all state)."""

    def __init__(self, limits: SafetyLimits) -> None:
        if not isinstance(limits, SafetyLimits):
            raise TypeError(f"limits must be SafetyLimits, got {type(limits).__name__}")
        self._limits = limits
        self._low = limits.low
        self._high = limits.high
        self._lock = threading.Lock()
        self._s = _State()

    # ---- state ---------------------------------------------------------------------------------------------

    @property
    def limits(self) -> SafetyLimits:
        return self._limits

    @property
    def last_target(self) -> np.ndarray | None:
        with self._lock:
            return None if self._s.target is None else self._s.target.copy()

    @property
    def estopped(self) -> bool:
        with self._lock:
            return self._s.estop_reason is not None

    @property
    def estop_reason(self) -> str | None:
        with self._lock:
            return self._s.estop_reason

    def set_limits(self, limits: SafetyLimits) -> SafetyLimits:
        """Install new limits (already validated as a whole by SafetyLimits) between two commands; returns the old.

        Under the layer's lock, so no command is checked against half of each set. Kept: the last target and
        the timing (the next step is within the new max_step and max_speed from where the last one ended), the
        watchdog and a latched e-stop. A last target the new box leaves outside is not jumped into it: each
        command moves at most the step budget from there toward the box (`_advance`). The last gripper opening
        is clipped into the new range (the gripper is not rate limited)."""
        if not isinstance(limits, SafetyLimits):
            raise TypeError(f"limits must be SafetyLimits, got {type(limits).__name__}")
        with self._lock:
            old = self._limits
            self._limits, self._low, self._high = limits, limits.low, limits.high
            if self._s.gripper is not None:
                self._s.gripper = min(limits.gripper_max, max(limits.gripper_min, self._s.gripper))
            return old

    def reset(self) -> None:
        """Forget the last target and timing (new episode, re-homed arm): the next command starts from the
        measured position with a `max_step` budget. A latched e-stop stays latched."""
        with self._lock:
            estop = self._s.estop_reason
            self._s = _State(estop_reason=estop)

    def home_target(self) -> np.ndarray:
        return np.array(self._limits.home, dtype=np.float64)

    def _outside(self, point: np.ndarray) -> float:
        """Distance from `point` to the workspace box (0 inside)."""
        return float(np.linalg.norm(point - np.clip(point, self._low, self._high)))

    # ---- e-stop and watchdog -------------------------------------------------------------------------------

    def estop(self, reason: str) -> None:
        """Latch an emergency stop: every command is a hold until `clear_estop()`. A second call keeps the
        first reason (the cause, not the echo)."""
        with self._lock:
            if self._s.estop_reason is None:
                self._s.estop_reason = str(reason) or "estop"

    def clear_estop(self) -> None:
        """Unlatch. Target and timing are kept, so the speed limit spans the e-stop and the watchdog stays
        expired until a fresh valid action arrives."""
        with self._lock:
            self._s.estop_reason = None

    def check_watchdog(self, now: float) -> bool:
        """True if the layer must hold: no valid action for `watchdog_timeout` seconds since the last one.

        Before the first accepted action there is nothing to time out (the arm has not been commanded) and
        this returns False; a non-finite `now` returns True."""
        if not math.isfinite(now):
            return True
        with self._lock:
            last = self._s.last_valid_time
            return last is not None and now - last >= self._limits.watchdog_timeout

    def hold_target(self, now: float) -> SafeCommand:
        """A hold command (last safe target and gripper) with status hold_watchdog, or estop if latched."""
        with self._lock:
            if self._s.estop_reason is not None:
                return self._hold(CommandStatus.ESTOP, f"e-stop latched: {self._s.estop_reason}", now)
            last = self._s.last_valid_time
            age = "never" if last is None else f"{now - last:.3f} s ago"
            return self._hold(CommandStatus.HOLD_WATCHDOG, f"watchdog: last valid action {age}", now)

    # ---- commands ------------------------------------------------------------------------------------------

    def command(self, action: object, now: float, current_ee: object) -> SafeCommand:
        """One controller tick: a normalised policy action (dx, dy, dz, gripper) to a safe command."""
        with self._lock:
            if self._s.estop_reason is not None:
                return self._hold(CommandStatus.ESTOP, f"e-stop latched: {self._s.estop_reason}", now)
            checked = self._check_action(action, now)
            if isinstance(checked, SafeCommand):
                return checked
            arr, reasons = checked
            delta = arr[:3] * self._limits.action_scale
            gripper = policy_gripper_to_opening(arr[3], self._limits.gripper_min, self._limits.gripper_max)
            return self._advance(
                lambda ref: ref + delta, gripper, now, current_ee, reasons, valid_action=True
            )

    def command_toward(
        self, target: object, now: float, current_ee: object, gripper: float | None = None
    ) -> SafeCommand:
        """One tick of a rate-limited move toward an absolute goal (e.g. home); `gripper` is an opening
        (None keeps the last one, or home_gripper if there is none). Does not feed the watchdog: a goal
        move is not a live policy."""
        with self._lock:
            if self._s.estop_reason is not None:
                return self._hold(CommandStatus.ESTOP, f"e-stop latched: {self._s.estop_reason}", now)
            if not math.isfinite(now):
                return self._hold(CommandStatus.REJECTED_NONFINITE, f"time is not finite ({now})", now)
            goal = self._as_vector(target, 3, "goal", now)
            if isinstance(goal, SafeCommand):
                return goal
            reasons: list[str] = []
            if gripper is None:
                opening = self._s.gripper if self._s.gripper is not None else self._limits.home_gripper
            else:
                g = float(gripper)
                if not math.isfinite(g):
                    return self._hold(CommandStatus.REJECTED_NONFINITE, f"gripper is not finite ({g})", now)
                opening = min(self._limits.gripper_max, max(self._limits.gripper_min, g))
                if opening != g:
                    reasons.append(f"gripper {g:.3f} clipped to {opening:.3f}")
            return self._advance(lambda _ref: goal, opening, now, current_ee, reasons, valid_action=False)

    def command_home(self, now: float, current_ee: object) -> SafeCommand:
        """One tick toward the configured home pose and home gripper."""
        lim = self._limits  # one set: home and home gripper from the same limits, even across a swap
        return self.command_toward(np.array(lim.home, dtype=np.float64), now, current_ee, lim.home_gripper)

    # ---- internals -----------------------------------------------------------------------------------------

    def _hold(self, status: CommandStatus, reason: str, now: float) -> SafeCommand:
        target = None if self._s.target is None else self._s.target.copy()
        gripper = None if target is None else self._s.gripper
        return SafeCommand(target, gripper, status, reason, float(now))

    def _as_vector(self, value: object, size: int, name: str, now: float) -> np.ndarray | SafeCommand:
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            return self._hold(CommandStatus.REJECTED_SHAPE, f"{name} is not numeric: {exc}", now)
        if arr.shape != (size,):
            return self._hold(
                CommandStatus.REJECTED_SHAPE, f"{name} has shape {arr.shape}, expected ({size},)", now
            )
        if not np.all(np.isfinite(arr)):
            return self._hold(CommandStatus.REJECTED_NONFINITE, f"{name} is not finite: {arr.tolist()}", now)
        return arr

    def _check_action(self, action: object, now: float) -> tuple[np.ndarray, list[str]] | SafeCommand:
        if not isinstance(now, (int, float, np.integer, np.floating)) or not math.isfinite(now):
            return self._hold(CommandStatus.REJECTED_NONFINITE, f"time is not finite ({now!r})", float("nan"))
        arr = self._as_vector(action, 4, "action", now)
        if isinstance(arr, SafeCommand):
            return arr
        worst = float(np.max(np.abs(arr)))
        if worst > self._limits.max_abs_action:
            return self._hold(
                CommandStatus.REJECTED_MAGNITUDE,
                f"action {arr.tolist()} has |a|={worst:.3g} > max_abs_action={self._limits.max_abs_action}",
                now,
            )
        reasons: list[str] = []
        if worst > 1.0:
            reasons.append(f"action {arr.tolist()} clipped to [-1, 1]")
            arr = np.clip(arr, -1.0, 1.0)
        return arr, reasons

    def _advance(
        self,
        desired_from: Callable[[np.ndarray], np.ndarray],
        gripper: float,
        now: float,
        current_ee: object,
        reasons: list[str],
        valid_action: bool,
    ) -> SafeCommand:
        lim = self._limits
        ee = self._as_vector(current_ee, 3, "current_ee", now)
        if isinstance(ee, SafeCommand):
            return ee
        s = self._s
        first: np.ndarray | None = None  # the measured arm, on a first command
        if s.target is None or s.last_accept_time is None:
            first = ee
            # First command since construction or reset: start from the measured arm. An arm resting a hair
            # outside the box (a reset pose on the boundary) starts from its projection, and the first step
            # shrinks by that distance so the target stays within max_step of the real arm.
            ref = np.clip(ee, self._low, self._high)
            outside = float(np.linalg.norm(ee - ref))
            if outside >= lim.max_step:
                return self._hold(
                    CommandStatus.REJECTED_OUTSIDE_WORKSPACE,
                    f"end effector {ee.tolist()} is {outside:.3f} m outside the workspace box; "
                    "move it inside by hand",
                    now,
                )
            allowed = lim.max_step - outside
        else:
            ref = s.target.copy()
            dt = max(0.0, now - s.last_accept_time)
            allowed = min(lim.max_step, lim.max_speed * dt)
            if now < s.last_accept_time:
                reasons.append(f"time went backwards by {s.last_accept_time - now:.3g} s: no motion")

        raw = np.asarray(desired_from(ref), dtype=np.float64)
        desired = np.clip(raw, self._low, self._high)
        if np.any(desired != raw):
            axes = [a for a in range(3) if desired[a] != raw[a]]
            reasons.append(f"target clipped to the workspace box on axes {axes}")
        # Anti-windup: never move the target further than the lead radius from the measured arm. Both
        # projections (ball, then box) contain `ref`, so neither can lengthen the step from it.
        with np.errstate(over="ignore"):  # an absurd but finite measured position only widens the radius
            radius = max(lim.lead_limit, float(np.linalg.norm(ref - ee)))
            offset = desired - ee
            dist = float(np.linalg.norm(offset))
        candidate = desired
        if dist > radius:
            candidate = ee + offset * (radius / dist)
            reasons.append(f"target held within {radius:.3f} m of the measured arm (arm lagging)")
        boxed = np.clip(candidate, self._low, self._high)
        step_vec = boxed - ref
        step = float(np.linalg.norm(step_vec))
        if step > allowed:
            # ref and boxed both lie in the (convex) box, so every point between them does too.
            step_vec = step_vec * (allowed / step)
            limit_name = "max_speed*dt" if first is None and allowed < lim.max_step else "max_step"
            reasons.append(f"step {step:.4f} m limited to {allowed:.4f} m ({limit_name})")
        outside = self._outside(ref)
        if outside == 0.0:
            target = np.clip(ref + step_vec, self._low, self._high)  # float rounding only
        else:
            # The last target lies outside a box shrunk since (`set_limits`): projecting it in could jump further
            # than the step budget. Along the segment toward the box the distance to it only shrinks (convex).
            target = ref + step_vec
            reasons.append(f"last target {outside:.4f} m outside the new workspace box: moving back into it")

        self._verify(target, ref, allowed, gripper)
        if first is not None and float(np.linalg.norm(target - first)) > lim.max_step + _EPS:
            raise SafetyInvariantError(
                f"first target {target.tolist()} > max_step from the arm {first.tolist()}"
            )
        s.target = target
        s.gripper = gripper
        s.last_accept_time = now if s.last_accept_time is None else max(s.last_accept_time, now)
        if valid_action:
            s.last_valid_time = now if s.last_valid_time is None else max(s.last_valid_time, now)
        status = CommandStatus.CLIPPED if reasons else CommandStatus.OK
        return SafeCommand(
            target.copy(),
            gripper,
            status,
            "; ".join(reasons) if reasons else "ok",
            float(now),
            float(np.linalg.norm(target - ref)),
        )

    def _verify(self, target: np.ndarray, ref: np.ndarray, allowed: float, gripper: float) -> None:
        lim = self._limits
        problems = []
        if target.shape != (3,) or not np.all(np.isfinite(target)):
            problems.append(f"target {target!r} not a finite 3-vector")
        elif self._outside(target) > self._outside(ref) + _EPS:
            # Inside the box, or (the last target outside a box shrunk since) no further outside than before.
            problems.append(f"target {target.tolist()} outside the box")
        elif float(np.linalg.norm(target - ref)) > allowed + _EPS:
            problems.append(f"step {np.linalg.norm(target - ref)} > allowed {allowed}")
        if not (math.isfinite(gripper) and lim.gripper_min <= gripper <= lim.gripper_max):
            problems.append(f"gripper {gripper} outside [{lim.gripper_min}, {lim.gripper_max}]")
        if problems:
            raise SafetyInvariantError("safety invariant violated: " + "; ".join(problems))
