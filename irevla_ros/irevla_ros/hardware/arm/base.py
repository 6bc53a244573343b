"""The arm backend interface: what the arm controller needs from a simulated or real arm.

Backends receive only targets the SafetyLayer (`irevla_ros.safety`) already approved: absolute end-effector
positions in the robot base frame (metres) and a gripper opening normalised to 0 (closed) .. 1 (fully
open). The gripper conventions are defined once, in `irevla_ros.safety`'s module docstring. Orientation is
not commanded: a backend keeps the end effector's orientation fixed (the one it had at connect, or its home
orientation).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


class ArmError(RuntimeError):
    """The arm refused or failed a command (a reflex, a controller error); the arm is holding or stopped."""


class ArmMotionAborted(ArmError):
    """The arm's own controller aborted the running motion without a fault (a trajectory planner failure): the arm
    stopped where it was and nothing is latched, so the next command starts a new motion. Raised by the call that
    found out, which did not send its own command."""


class ArmConnectionError(ArmError):
    """The connection to the arm is lost or was never made; `is_connected` is False afterwards."""


@dataclass(frozen=True)
class ArmState:
    """One consistent snapshot of the arm.

    `stamp` is in seconds on the backend's own clock (sim: the cell's simulated time; franky: the host's
    `time.monotonic()` at the read, the robot's own clock is in `extras["robot_time"]`); nodes stamp
    messages with their own clock.
    """

    ee_position: np.ndarray  # (3,) metres, base frame
    ee_orientation: np.ndarray  # (4,) quaternion x, y, z, w
    gripper: float  # opening, 0 closed .. 1 fully open
    joint_names: tuple[str, ...]
    joint_positions: np.ndarray
    joint_velocities: np.ndarray
    stamp: float
    extras: dict[str, float] = field(default_factory=dict)  # backend-specific diagnostics

    def __post_init__(self) -> None:
        pos = np.asarray(self.ee_position, dtype=np.float64).reshape(3)
        quat = np.asarray(self.ee_orientation, dtype=np.float64).reshape(4)
        q = np.asarray(self.joint_positions, dtype=np.float64).reshape(-1)
        dq = np.asarray(self.joint_velocities, dtype=np.float64).reshape(-1)
        names = tuple(self.joint_names)
        if not len(names) == q.size == dq.size:
            raise ValueError(f"{len(names)} joint names, {q.size} positions, {dq.size} velocities")
        object.__setattr__(self, "ee_position", pos)
        object.__setattr__(self, "ee_orientation", quat)
        object.__setattr__(self, "joint_names", names)
        object.__setattr__(self, "joint_positions", q)
        object.__setattr__(self, "joint_velocities", dq)
        object.__setattr__(self, "gripper", float(self.gripper))
        object.__setattr__(self, "stamp", float(self.stamp))


class ArmBackend(ABC):
    """A simulated or real arm driven by absolute Cartesian targets at the controller's rate (e.g. 10 Hz).

    Life cycle: `connect()` once, then `read_state()` / `send_target()` / `hold()` from one controller thread,
    `close()` at the end (idempotent). Also a context manager. Every method except `close` and
    `is_connected` raises ArmConnectionError when the arm is not connected.
    """

    @abstractmethod
    def connect(self) -> None:
        """Open the connection (or attach to the simulation); raises ArmConnectionError on failure."""

    @abstractmethod
    def close(self) -> None:
        """Stop any motion and release the arm. Safe to call twice or after a lost connection."""

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """False before connect, after close, and after a lost connection was detected."""

    @abstractmethod
    def read_state(self) -> ArmState:
        """The current state."""

    @abstractmethod
    def send_target(self, ee_position: np.ndarray, gripper: float) -> None:
        """Start moving toward an approved absolute target; returns without waiting for the arm to arrive.

        A new target replaces the previous one (streaming). `gripper` is an opening in [0, 1]."""

    @abstractmethod
    def hold(self) -> None:
        """Stop at (or decelerate to) the current position and stay there; gripper unchanged."""

    @abstractmethod
    def move_home(self, ee_position: np.ndarray, gripper: float, timeout: float = 30.0) -> None:
        """Blocking: move to an approved home position and gripper opening, return when there (or raise
        ArmError after `timeout` seconds). Speed is bounded by the backend's own limits; for a move that
        obeys the SafetyLayer's per-tick step, stream `SafetyLayer.command_home` through `send_target`."""

    def recover(self) -> None:  # noqa: B027 (a default that does nothing, not an abstract method)
        """Clear a fault the arm's own controller latched (a reflex, a protective stop) so that commands are
        accepted again; raises ArmError if the controller refuses. Backends without such faults do nothing."""

    def __enter__(self) -> ArmBackend:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
