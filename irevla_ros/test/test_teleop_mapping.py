"""Teleop mapping (Joy state -> normalised command) and its inverse, and the safety layer after it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from irevla_ros.param_spec import from_parameters, parameter_specs
from irevla_ros.safety import SafetyLayer, SafetyLimits
from irevla_ros.teleop.mapping import (
    JoyLayoutError,
    TeleopConfigError,
    TeleopMapping,
    command_to_joy,
    joy_to_command,
)

unit = st.floats(-1.0, 1.0, allow_nan=False, width=32)
GRIPPER_AXIS = TeleopMapping(gripper_axis=4, deadzone=0.1)


@given(st.tuples(unit, unit, unit), unit, st.floats(0.2, 1.0))
def test_the_inverse_mapping_reproduces_the_command(delta, gripper, scale):
    mapping = TeleopMapping(gripper_axis=4, deadzone=0.1, scale=scale)
    target = [d * scale for d in delta]
    axes, buttons = command_to_joy(mapping, target, gripper, enabled=True)
    axes32 = [float(np.float32(a)) for a in axes]  # what a Joy message carries
    command = joy_to_command(mapping, axes32, buttons)
    assert not command.hold and command.engaged  # the deadman takes over by default
    np.testing.assert_allclose(command.ee_delta, target, atol=1e-6)
    assert command.gripper == pytest.approx(gripper, abs=1e-6)


def test_releasing_the_deadman_holds_with_a_zero_delta():
    axes, buttons = command_to_joy(GRIPPER_AXIS, [1.0, -1.0, 0.5], 1.0, enabled=True)
    buttons[GRIPPER_AXIS.enable_button] = 0
    command = joy_to_command(GRIPPER_AXIS, axes, buttons)
    assert command.hold and not command.engaged and command.ee_delta == (0.0, 0.0, 0.0)


def test_a_separate_takeover_button_engages_without_moving():
    mapping = TeleopMapping(takeover_button=8)
    axes, buttons = command_to_joy(mapping, [0.5, 0.0, 0.0], 0.0, enabled=False, engaged=True)
    command = joy_to_command(mapping, axes, buttons)
    assert command.engaged and command.hold
    buttons[mapping.enable_button] = 1
    assert joy_to_command(mapping, axes, buttons).ee_delta[0] == pytest.approx(0.5)


def test_gripper_buttons_latch_until_the_other_one():
    mapping = TeleopMapping()
    axes, buttons = [0.0] * 8, [0] * 11
    buttons[mapping.gripper_close_button] = 1
    closed = joy_to_command(mapping, axes, buttons, previous_gripper=-1.0).gripper
    buttons[mapping.gripper_close_button] = 0
    kept = joy_to_command(mapping, axes, buttons, previous_gripper=closed).gripper
    buttons[mapping.gripper_open_button] = 1
    assert (closed, kept, joy_to_command(mapping, axes, buttons, previous_gripper=kept).gripper) == (1, 1, -1)


def test_deadzone_and_glitches_read_as_zero():
    mapping = TeleopMapping(deadzone=0.2)
    buttons = [0] * 11
    buttons[mapping.enable_button] = 1
    command = joy_to_command(mapping, [0.1, math.nan, 0.0, math.inf], buttons)
    assert command.ee_delta == (0.0, 0.0, 0.0)


def test_bad_layouts_and_settings_are_refused_with_the_name():
    with pytest.raises(JoyLayoutError, match="needs"):
        joy_to_command(TeleopMapping(), [0.0, 0.0], [0, 0])
    with pytest.raises(TeleopConfigError, match="distinct"):
        TeleopMapping(x_axis=0, y_axis=0)
    with pytest.raises(TeleopConfigError, match="x_sign"):
        TeleopMapping(x_sign=0.5)
    with pytest.raises(TeleopConfigError, match="scale"):
        TeleopMapping(scale=0.0)
    with pytest.raises(TeleopConfigError, match="deadman"):
        TeleopMapping(gripper_close_button=9)


def test_the_mapping_settings_are_node_parameters():
    names = {spec.name for spec in parameter_specs(TeleopMapping)}
    assert {"enable_button", "takeover_button", "deadzone", "scale", "x_axis"} <= names
    assert from_parameters(TeleopMapping, {"enable_button": 4}).enable_button == 4


LIMITS = SafetyLimits(workspace_low=(-0.2, -0.2, 0.0), workspace_high=(0.2, 0.2, 0.3), home=(0.0, 0.0, 0.1))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=6, max_size=6),
            st.lists(st.integers(0, 1), min_size=11, max_size=11),
        ),
        min_size=1,
        max_size=40,
    ),
    st.sampled_from([TeleopMapping(), GRIPPER_AXIS, TeleopMapping(scale=0.3, takeover_button=8)]),
)
def test_teleop_through_the_safety_layer_never_leaves_the_limits(joys, mapping):
    layer = SafetyLayer(LIMITS)
    position = np.array(LIMITS.home)
    gripper = -1.0
    for i, (axes, buttons) in enumerate(joys):
        command = joy_to_command(mapping, axes, buttons, gripper)
        gripper = command.gripper
        assert all(-1.0 <= v <= 1.0 for v in (*command.ee_delta, command.gripper))
        assert command.hold or buttons[mapping.enable_button]
        if command.hold:
            safe = layer.hold_target(0.1 * i)
        else:
            safe = layer.command([*command.ee_delta, command.gripper], 0.1 * i, position)
        if safe.target is None:
            continue
        assert np.all(safe.target >= LIMITS.low - 1e-9) and np.all(safe.target <= LIMITS.high + 1e-9)
        assert np.linalg.norm(safe.target - position) <= LIMITS.max_step + 1e-9
        assert LIMITS.gripper_min <= safe.gripper <= LIMITS.gripper_max
        position = safe.target
