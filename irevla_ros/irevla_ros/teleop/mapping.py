"""Joy state (axes, buttons as in sensor_msgs/Joy) -> a normalised arm command, and the inverse for the simulated
operator.

The arm moves only while the deadman (`enable_button`, teleop_twist_joy's convention) is held: without it the
command is a hold. `takeover_button` engages teleop during a policy episode (the policy node switches its command
source to teleop while it is held); -1 makes the deadman the takeover button too. The command is in the policy's
normalised units (ee_delta in [-1, 1]^3, gripper -1 open .. +1 closed), so the arm controller scales it and runs it
through the same safety layer as a policy action.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from irevla_ros.param_spec import check_settings, setting


class TeleopConfigError(ValueError):
    """A teleop mapping setting is out of range or inconsistent; the message names it."""


class JoyLayoutError(ValueError):
    """A Joy message has fewer axes or buttons than the mapping uses."""


# The policy_version of a /teleop/command: whether the takeover button was held (engaged) when it was sent.
ENGAGED = "teleop:engaged"
IDLE = "teleop:idle"


@dataclass
class TeleopMapping:
    # Defaults: an SDL game controller as joy's game_controller_node lays it out (left stick 0/1, right stick
    # 2/3, LB 9, RB 10). Buttons 0-3 are the episode manager's label/reset/pause buttons: teleop keeps off them.
    x_axis: int = setting(1, "Joy axis of the end-effector x delta (-1: none)", min=-1)
    y_axis: int = setting(0, "Joy axis of the end-effector y delta (-1: none)", min=-1)
    z_axis: int = setting(3, "Joy axis of the end-effector z delta (-1: none)", min=-1)
    x_sign: float = setting(1.0, "sign of the x axis (+1 or -1)", min=-1.0, max=1.0)
    y_sign: float = setting(1.0, "sign of the y axis (+1 or -1)", min=-1.0, max=1.0)
    z_sign: float = setting(1.0, "sign of the z axis (+1 or -1)", min=-1.0, max=1.0)
    gripper_axis: int = setting(
        -1, "Joy axis of the gripper (-1 open .. +1 closed; -1: use the buttons)", min=-1
    )
    gripper_sign: float = setting(1.0, "sign of the gripper axis (+1 or -1)", min=-1.0, max=1.0)
    gripper_close_button: int = setting(10, "button that closes the gripper (-1: none)", min=-1)
    gripper_open_button: int = setting(7, "button that opens the gripper (-1: none)", min=-1)
    enable_button: int = setting(9, "deadman: the arm moves only while this button is held", min=0)
    takeover_button: int = setting(-1, "engages teleop in a policy episode (-1: the deadman does)", min=-1)
    deadzone: float = setting(0.05, "axis magnitudes below this read as 0", min=0.0, max=0.9)
    scale: float = setting(
        1.0, "normalised command at full stick deflection", min=0.0, max=1.0, min_exclusive=True
    )

    def __post_init__(self) -> None:
        check_settings(self, TeleopConfigError, "teleop")
        for name in ("x_sign", "y_sign", "z_sign", "gripper_sign"):
            if abs(getattr(self, name)) != 1.0:
                raise TeleopConfigError(f"teleop {name} must be +1 or -1, got {getattr(self, name)}")
        axes = [a for a in (self.x_axis, self.y_axis, self.z_axis, self.gripper_axis) if a >= 0]
        if len(set(axes)) != len(axes):
            raise TeleopConfigError(f"teleop axes must be distinct, got x/y/z/gripper {axes}")
        buttons = [
            self.enable_button,
            self.takeover_button,
            self.gripper_close_button,
            self.gripper_open_button,
        ]
        used = [b for b in buttons[2:] if b >= 0] + [self.enable_button]
        if len(set(used)) != len(used):
            raise TeleopConfigError(
                f"teleop gripper buttons must differ from each other and the deadman: {used}"
            )
        if (
            self.takeover_button in (self.gripper_close_button, self.gripper_open_button)
            and self.takeover_button >= 0
        ):
            raise TeleopConfigError(f"teleop takeover_button {self.takeover_button} is a gripper button")

    @property
    def takeover(self) -> int:
        return self.enable_button if self.takeover_button < 0 else self.takeover_button

    def needs(self) -> tuple[int, int]:
        """(axes, buttons) a Joy message must have for this mapping."""
        axes = max(self.x_axis, self.y_axis, self.z_axis, self.gripper_axis) + 1
        buttons = (
            max(self.enable_button, self.takeover, self.gripper_close_button, self.gripper_open_button) + 1
        )
        return axes, buttons


@dataclass(frozen=True)
class TeleopCommand:
    ee_delta: tuple[float, float, float]  # normalised, each in [-1, 1]
    gripper: float  # -1 open .. +1 closed
    hold: bool  # deadman released: keep the arm still
    engaged: bool  # takeover button held: teleop commands this tick, not the policy


def _shape(value: float, deadzone: float, scale: float) -> float:
    """Deadzone removed and the rest rescaled to [0, 1] (no jump at its edge), then scaled; clipped to [-1, 1]."""
    magnitude = abs(value)
    if magnitude < deadzone:
        return 0.0
    out = min(1.0, (magnitude - deadzone) / (1.0 - deadzone)) * scale
    return out if value > 0 else -out


def _pressed(buttons: Sequence[int], index: int) -> bool:
    return index >= 0 and bool(buttons[index])


def joy_to_command(
    mapping: TeleopMapping, axes: Sequence[float], buttons: Sequence[int], previous_gripper: float = -1.0
) -> TeleopCommand:
    """The command of one Joy state. With gripper buttons the gripper keeps `previous_gripper` until one is
    pressed. A NaN/inf axis reads as 0 (a driver glitch must not move the arm)."""
    need_axes, need_buttons = mapping.needs()
    if len(axes) < need_axes or len(buttons) < need_buttons:
        raise JoyLayoutError(
            f"Joy has {len(axes)} axes and {len(buttons)} buttons; the teleop mapping needs {need_axes} and "
            f"{need_buttons} (check x_axis.. / enable_button against the device)"
        )

    def axis(index: int, sign: float) -> float:
        if index < 0:
            return 0.0
        value = float(axes[index])
        if value != value or abs(value) == float("inf"):
            return 0.0
        return _shape(sign * max(-1.0, min(1.0, value)), mapping.deadzone, mapping.scale)

    if mapping.gripper_axis >= 0:
        gripper = axis(mapping.gripper_axis, mapping.gripper_sign) / mapping.scale
    elif _pressed(buttons, mapping.gripper_close_button):
        gripper = 1.0
    elif _pressed(buttons, mapping.gripper_open_button):
        gripper = -1.0
    else:
        gripper = max(-1.0, min(1.0, float(previous_gripper)))
    enabled = _pressed(buttons, mapping.enable_button)
    delta = (
        axis(mapping.x_axis, mapping.x_sign),
        axis(mapping.y_axis, mapping.y_sign),
        axis(mapping.z_axis, mapping.z_sign),
    )
    return TeleopCommand(
        ee_delta=delta if enabled else (0.0, 0.0, 0.0),
        gripper=gripper,
        hold=not enabled,
        engaged=_pressed(buttons, mapping.takeover),
    )


def _unshape(command: float, deadzone: float, scale: float) -> float:
    """The axis value `_shape` maps to `command` (the smallest one outside the deadzone)."""
    if command == 0.0:
        return 0.0
    magnitude = min(1.0, abs(command) / scale)
    value = deadzone + magnitude * (1.0 - deadzone)
    return value if command > 0 else -value


def command_to_joy(
    mapping: TeleopMapping,
    ee_delta: Sequence[float],
    gripper: float,
    *,
    enabled: bool = True,
    engaged: bool = False,
    num_axes: int = 0,
    num_buttons: int = 0,
) -> tuple[list[float], list[int]]:
    """Axes and buttons that `joy_to_command` maps to this command (what the simulated operator publishes).
    Exact up to float32 rounding for ee_delta/gripper in [-scale, scale]; a gripper with buttons becomes close
    (> 0) or open (< 0), so `gripper_axis` is what reproduces a continuous expert gripper."""
    need_axes, need_buttons = mapping.needs()
    axes = [0.0] * max(num_axes, need_axes)
    buttons = [0] * max(num_buttons, need_buttons)
    for index, sign, value in (
        (mapping.x_axis, mapping.x_sign, ee_delta[0]),
        (mapping.y_axis, mapping.y_sign, ee_delta[1]),
        (mapping.z_axis, mapping.z_sign, ee_delta[2]),
    ):
        if index >= 0:
            axes[index] = sign * _unshape(float(value), mapping.deadzone, mapping.scale)
    if mapping.gripper_axis >= 0:
        g = max(-1.0, min(1.0, float(gripper))) * mapping.scale
        axes[mapping.gripper_axis] = mapping.gripper_sign * _unshape(g, mapping.deadzone, mapping.scale)
    elif gripper > 0 and mapping.gripper_close_button >= 0:
        buttons[mapping.gripper_close_button] = 1
    elif gripper < 0 and mapping.gripper_open_button >= 0:
        buttons[mapping.gripper_open_button] = 1
    if enabled:
        buttons[mapping.enable_button] = 1
    if engaged:
        buttons[mapping.takeover] = 1
    return axes, buttons
