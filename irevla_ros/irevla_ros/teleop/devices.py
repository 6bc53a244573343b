"""Input devices read without ROS, producing what sensor_msgs/Joy carries (axes in [-1, 1], buttons 0/1).

- A gamepad through Linux evdev (`evdev` on PyPI): the layout of an SDL game controller as joy's
  game_controller_node publishes it (`GAMEPAD_AXES`, `GAMEPAD_BUTTONS`), sticks up/left positive, so the default
  `TeleopMapping` and the episode manager's buttons mean the same on joy_node and on this reader.
- A 3Dconnexion SpaceMouse through hidraw (`hidapi` on PyPI): axes x, y, z, rx, ry, rz in the device's frame,
  buttons [left, right], as spacenav_node publishes them.

The modules are imported when a device is opened, so the rest of the package runs without them. A missing module,
device or permission raises `DeviceError` saying which and how to fix it (README, "Teleoperation and takeover").
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

UDEV_HINT = (
    "add a udev rule giving your user the device (README, 'Teleoperation and takeover'), e.g. "
    '/etc/udev/rules.d/99-irevla-teleop.rules: KERNEL=="hidraw*", ATTRS{idVendor}=="256f", MODE="0666" and '
    'KERNEL=="event*", SUBSYSTEM=="input", MODE="0664", GROUP="input" (then `sudo udevadm control --reload` '
    "and replug), or add yourself to the 'input' group"
)


class DeviceError(RuntimeError):
    """A teleop device cannot be opened or read: the message names the device and what to do."""


# evdev codes (linux/input-event-codes.h) in SDL game-controller order; evdev's ecodes hold the same numbers.
ABS_X, ABS_Y, ABS_Z, ABS_RX, ABS_RY, ABS_RZ = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
GAMEPAD_AXES: tuple[tuple[int, float], ...] = (
    (ABS_X, -1.0),  # 0 left stick, left positive
    (ABS_Y, -1.0),  # 1 left stick, up positive
    (ABS_RX, -1.0),  # 2 right stick, left positive
    (ABS_RY, -1.0),  # 3 right stick, up positive
    (ABS_Z, 1.0),  # 4 left trigger
    (ABS_RZ, 1.0),  # 5 right trigger
)
BTN_A, BTN_B, BTN_X, BTN_Y = 0x130, 0x131, 0x133, 0x134
BTN_TL, BTN_TR, BTN_SELECT, BTN_START, BTN_MODE, BTN_THUMBL, BTN_THUMBR = (
    0x136, 0x137, 0x13A, 0x13B, 0x13C, 0x13D, 0x13E,
)  # fmt: skip
GAMEPAD_BUTTONS: tuple[int, ...] = (
    BTN_A, BTN_B, BTN_X, BTN_Y, BTN_SELECT, BTN_MODE, BTN_START, BTN_THUMBL, BTN_THUMBR, BTN_TL, BTN_TR,
)  # fmt: skip
EV_KEY, EV_ABS = 0x01, 0x03


@dataclass(frozen=True)
class AxisRange:
    low: int
    high: int

    def normalise(self, raw: int) -> float:
        """Raw evdev value to [-1, 1] (the centre of the range at 0)."""
        span = self.high - self.low
        if span <= 0:
            return 0.0
        return max(-1.0, min(1.0, 2.0 * (raw - self.low) / span - 1.0))


@dataclass
class GamepadState:
    """Joy axes/buttons kept up to date from evdev events (anything with .type, .code, .value)."""

    ranges: dict[int, AxisRange]
    axes: list[float] = field(default_factory=lambda: [0.0] * len(GAMEPAD_AXES))
    buttons: list[int] = field(default_factory=lambda: [0] * len(GAMEPAD_BUTTONS))

    def __post_init__(self) -> None:
        # Triggers rest at their low end: -1 after normalisation, which a stick mapping would read as deflected.
        for i, (code, _) in enumerate(GAMEPAD_AXES):
            if code in (ABS_Z, ABS_RZ) and code in self.ranges:
                self.axes[i] = self.ranges[code].normalise(self.ranges[code].low)

    def apply(self, event: Any) -> bool:
        """Update from one event; True if it changed a known axis or button."""
        if event.type == EV_ABS:
            for i, (code, sign) in enumerate(GAMEPAD_AXES):
                if code == event.code and code in self.ranges:
                    self.axes[i] = sign * self.ranges[code].normalise(int(event.value))
                    return True
        elif event.type == EV_KEY and event.code in GAMEPAD_BUTTONS:
            self.buttons[GAMEPAD_BUTTONS.index(event.code)] = 1 if event.value else 0  # 2 = autorepeat
            return True
        return False


# 3Dconnexion vendor ids: the current one, and Logitech's for the older SpaceNavigator/SpaceMouse models.
SPACEMOUSE_VENDORS = (0x256F, 0x046D)
SPACEMOUSE_FULL_SCALE = 350.0  # raw counts at full deflection (3Dconnexion devices report about +-350)


@dataclass
class SpaceMouseState:
    """Joy axes [x, y, z, rx, ry, rz] and buttons [left, right] from SpaceMouse HID reports.

    Report 1: translation (3 x int16 LE), or all six axes on newer devices (13-byte report); report 2: rotation;
    report 3: button bitmask."""

    axes: list[float] = field(default_factory=lambda: [0.0] * 6)
    buttons: list[int] = field(default_factory=lambda: [0, 0])

    @staticmethod
    def _scaled(raw: Iterable[int]) -> list[float]:
        return [max(-1.0, min(1.0, v / SPACEMOUSE_FULL_SCALE)) for v in raw]

    def apply(self, report: Sequence[int] | bytes) -> bool:
        data = bytes(report)
        if not data:
            return False
        report_id, body = data[0], data[1:]
        if report_id == 1 and len(body) >= 12:
            self.axes[:] = self._scaled(struct.unpack("<6h", body[:12]))
        elif report_id == 1 and len(body) >= 6:
            self.axes[0:3] = self._scaled(struct.unpack("<3h", body[:6]))
        elif report_id == 2 and len(body) >= 6:
            self.axes[3:6] = self._scaled(struct.unpack("<3h", body[:6]))
        elif report_id == 3 and len(body) >= 1:
            self.buttons[:] = [body[0] & 1, (body[0] >> 1) & 1]
        else:
            return False
        return True


class _Reader:
    """Reads a device on a daemon thread; `snapshot()` gives the newest (axes, buttons)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"teleop-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._loop(self._stop)
        except Exception as exc:
            self.error = DeviceError(f"{self.name}: stopped reading: {exc}")

    def _loop(self, stop: threading.Event) -> None:
        raise NotImplementedError

    # Set by each device's constructor: its parsed state (axes, buttons) and the open device handle.
    state: Any
    _device: Any

    def snapshot(self) -> tuple[list[float], list[int]]:
        with self._lock:
            return list(self.state.axes), list(self.state.buttons)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
        self._device.close()


def _import(module: str, package: str, device: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise DeviceError(
            f"{device}: the Python module {module!r} is missing: pip install {package} (scripts/setup.sh pins it)"
        ) from exc


class EvdevGamepad(_Reader):
    """A gamepad at /dev/input/eventN (empty path: the first device with sticks and buttons)."""

    def __init__(self, path: str = "") -> None:
        evdev = _import("evdev", "evdev", "gamepad")
        if not path:
            path = self._find(evdev)
        try:
            self._device = evdev.InputDevice(path)
        except PermissionError as exc:
            raise DeviceError(f"gamepad {path}: permission denied; {UDEV_HINT}") from exc
        except OSError as exc:
            raise DeviceError(f"gamepad {path}: cannot open it ({exc})") from exc
        caps = dict(self._device.capabilities(absinfo=True))
        ranges = {code: AxisRange(info.min, info.max) for code, info in caps.get(EV_ABS, [])}
        self.state = GamepadState(ranges)
        super().__init__(f"gamepad {path} ({self._device.name})")

    @staticmethod
    def _find(evdev: Any) -> str:
        denied = []
        for path in evdev.list_devices():
            try:
                device = evdev.InputDevice(path)
            except PermissionError:
                denied.append(path)
                continue
            caps = device.capabilities()
            if ABS_X in [c for c in caps.get(EV_ABS, [])] and BTN_A in caps.get(EV_KEY, []):
                return str(path)
        if denied:
            raise DeviceError(f"gamepad: no permission to read {', '.join(denied)}; {UDEV_HINT}")
        raise DeviceError(
            "gamepad: no evdev device with sticks and buttons under /dev/input (is it plugged in?)"
        )

    def _loop(self, stop: threading.Event) -> None:
        import select

        fd = self._device.fd
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            for event in self._device.read():
                with self._lock:
                    self.state.apply(event)


class SpaceMouse(_Reader):
    """The first 3Dconnexion device hidapi enumerates (or `path`, a hidraw path)."""

    def __init__(self, path: str = "") -> None:
        hid = _import("hid", "hidapi", "SpaceMouse")
        if not path:
            found = [d for d in hid.enumerate() if d.get("vendor_id") in SPACEMOUSE_VENDORS]
            if not found:
                raise DeviceError(
                    "SpaceMouse: no 3Dconnexion HID device found (vendor 256f/046d): is it plugged in? "
                    f"If it is, hidraw may be unreadable: {UDEV_HINT}"
                )
            path = found[0]["path"].decode() if isinstance(found[0]["path"], bytes) else str(found[0]["path"])
        self._device = hid.device()
        try:
            self._device.open_path(path.encode())
        except OSError as exc:
            raise DeviceError(f"SpaceMouse {path}: cannot open it ({exc}); {UDEV_HINT}") from exc
        self._device.set_nonblocking(False)
        self.state = SpaceMouseState()
        super().__init__(f"SpaceMouse {path}")

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            report = self._device.read(64, 100)  # ms timeout, so close() is seen
            if report:
                with self._lock:
                    self.state.apply(report)


DEVICES: dict[str, Callable[[str], _Reader]] = {"evdev": EvdevGamepad, "spacemouse": SpaceMouse}


def open_device(kind: str, path: str = "") -> _Reader:
    """Open and start reading device `kind` ('evdev' or 'spacemouse')."""
    if kind not in DEVICES:
        raise DeviceError(f"teleop device {kind!r} is not one of {', '.join(DEVICES)}")
    reader = DEVICES[kind](path)
    reader.start()
    return reader
