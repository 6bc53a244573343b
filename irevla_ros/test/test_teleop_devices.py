"""Device readers: evdev events (evdev's own InputEvent) and SpaceMouse HID reports to Joy axes/buttons."""

from __future__ import annotations

import os
import struct
import time

import pytest
from evdev import InputEvent, ecodes

from irevla_ros.teleop.devices import (
    GAMEPAD_BUTTONS,
    AxisRange,
    DeviceError,
    EvdevGamepad,
    GamepadState,
    SpaceMouse,
    SpaceMouseState,
    open_device,
)
from irevla_ros.teleop.mapping import TeleopMapping, joy_to_command

RANGES = {
    code: AxisRange(-32768, 32767) for code in (ecodes.ABS_X, ecodes.ABS_Y, ecodes.ABS_RX, ecodes.ABS_RY)
}
RANGES.update({ecodes.ABS_Z: AxisRange(0, 255), ecodes.ABS_RZ: AxisRange(0, 255)})


def event(type_: int, code: int, value: int) -> InputEvent:
    return InputEvent(0, 0, type_, code, value)


def test_evdev_codes_land_where_joy_puts_them_and_the_default_mapping_reads_them():
    state = GamepadState(RANGES)
    assert state.axes[4] == state.axes[5] == -1.0  # triggers at rest
    state.apply(event(ecodes.EV_ABS, ecodes.ABS_Y, -32768))  # left stick pushed fully up
    state.apply(event(ecodes.EV_ABS, ecodes.ABS_X, 32767))  # and right
    state.apply(event(ecodes.EV_KEY, ecodes.BTN_TL, 1))  # LB: the default deadman
    assert state.axes[1] == pytest.approx(1.0) and state.axes[0] == pytest.approx(-1.0)
    assert state.buttons[9] == 1 and sum(state.buttons) == 1
    command = joy_to_command(TeleopMapping(), state.axes, state.buttons)
    assert not command.hold and command.ee_delta[0] == pytest.approx(1.0) and command.ee_delta[1] < -0.99
    state.apply(event(ecodes.EV_KEY, ecodes.BTN_TL, 0))
    assert joy_to_command(TeleopMapping(), state.axes, state.buttons).hold
    state.apply(event(ecodes.EV_KEY, ecodes.BTN_SOUTH, 1))  # A: the episode manager's success label
    assert state.buttons[0] == 1
    assert not state.apply(event(ecodes.EV_KEY, ecodes.KEY_A, 1))  # a keyboard key: not a gamepad button
    assert len(state.buttons) == len(GAMEPAD_BUTTONS)


def test_spacemouse_reports_one_two_three():
    state = SpaceMouseState()
    assert state.apply(bytes([1]) + struct.pack("<3h", 350, -175, 0))
    assert state.axes[:3] == pytest.approx([1.0, -0.5, 0.0])
    assert state.apply(bytes([2]) + struct.pack("<3h", 0, 700, -350))
    assert state.axes[3:] == pytest.approx([0.0, 1.0, -1.0])
    assert state.apply(bytes([1]) + struct.pack("<6h", 35, 0, 0, 0, 0, 70))  # newer devices: six axes in one
    assert state.axes == pytest.approx([0.1, 0, 0, 0, 0, 0.2])
    assert state.apply(bytes([3, 0b10]))
    assert state.buttons == [0, 1]
    assert not state.apply(bytes([7, 1, 2])) and not state.apply(b"")


def test_missing_devices_are_named_with_the_fix():
    try:
        EvdevGamepad().close()  # a machine with a readable gamepad: nothing to check here
    except DeviceError as exc:
        assert "gamepad" in str(exc) and ("/dev/input" in str(exc) or "udev" in str(exc))
    with pytest.raises(DeviceError, match=r"SpaceMouse.*udev"):
        SpaceMouse()
    with pytest.raises(DeviceError, match="not one of"):
        open_device("wiimote")


@pytest.mark.skipif(not os.access("/dev/uinput", os.W_OK), reason="no writable /dev/uinput on this machine")
def test_a_virtual_gamepad_is_read_through_evdev():
    from evdev import AbsInfo, UInput

    caps = {
        ecodes.EV_KEY: list(GAMEPAD_BUTTONS),
        ecodes.EV_ABS: [(ecodes.ABS_X, AbsInfo(0, -32768, 32767, 0, 0, 0)),
                        (ecodes.ABS_Y, AbsInfo(0, -32768, 32767, 0, 0, 0))],
    }  # fmt: skip
    with UInput(caps, name="irevla-test-pad") as pad:
        time.sleep(0.5)
        reader = open_device("evdev", pad.device.path)
        try:
            pad.write(ecodes.EV_KEY, ecodes.BTN_TL, 1)
            pad.write(ecodes.EV_ABS, ecodes.ABS_Y, -32768)
            pad.syn()
            deadline = time.monotonic() + 5
            while reader.snapshot()[1][9] != 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            axes, buttons = reader.snapshot()
            assert buttons[9] == 1 and axes[1] == pytest.approx(1.0)
        finally:
            reader.close()
