"""The simulated arm: the Sawyer of a MetaWorldCell, stepped in step with the controller.

Every `send_target` or `hold` advances the cell's physics by exactly one control step (`cell.control_dt`), so
a 10 Hz controller drives the simulation one step per tick and the simulated clock, not the wall clock,
is the arm's time base.
"""

from __future__ import annotations

import math

import numpy as np

from irevla_ros.hardware.arm.base import ArmBackend, ArmConnectionError, ArmError, ArmState
from irevla_ros.sim.cell import MetaWorldCell


def opening_to_metaworld_gripper(opening: float) -> float:
    """Normalised opening (0 closed .. 1 open) to Meta-World's gripper action (-1 open .. +1 closed).

    Meta-World's gripper action is an effort, not a position: +1 squeezes, -1 opens, 0 lets the fingers rest.
    See `irevla_ros.safety` for the full chain of gripper conventions."""
    value = float(opening)
    if not math.isfinite(value):
        raise ValueError(f"gripper opening must be finite, got {value}")
    return float(np.clip(1.0 - 2.0 * value, -1.0, 1.0))


def _xyzw(wxyz: np.ndarray) -> np.ndarray:
    return np.array([wxyz[1], wxyz[2], wxyz[3], wxyz[0]], dtype=np.float64)


class SimArm(ArmBackend):
    """ArmBackend over a MetaWorldCell shared with the simulated camera (all access under `cell.lock`)."""

    def __init__(self, cell: MetaWorldCell, home_tolerance: float = 0.01) -> None:
        if home_tolerance <= 0.0:
            raise ValueError(f"home_tolerance must be positive, got {home_tolerance}")
        self._cell = cell
        self._home_tolerance = float(home_tolerance)
        self._connected = False
        self._grip_action = -1.0  # Meta-World's reset leaves the hand open

    @property
    def cell(self) -> MetaWorldCell:
        return self._cell

    @property
    def is_connected(self) -> bool:
        return self._connected

    def connect(self) -> None:
        self._connected = True

    def close(self) -> None:
        self._connected = False

    def _require(self) -> None:
        if not self._connected:
            raise ArmConnectionError("SimArm is not connected (call connect())")

    def read_state(self) -> ArmState:
        self._require()
        cell = self._cell
        with cell.lock:
            names, q, dq = cell.joint_state()
            quat = cell.data.xquat[cell.model.body("hand").id]
            return ArmState(
                ee_position=cell.ee_position(),
                ee_orientation=_xyzw(quat),
                gripper=cell.gripper_opening(),
                joint_names=tuple(names),
                joint_positions=q,
                joint_velocities=dq,
                stamp=cell.sim_time,
            )

    def send_target(self, ee_position: np.ndarray, gripper: float) -> None:
        self._require()
        grip = opening_to_metaworld_gripper(gripper)
        with self._cell.lock:
            self._cell.move_toward(np.asarray(ee_position, dtype=np.float64), grip)
            self._grip_action = grip

    def hold(self) -> None:
        """One control step with zero hand motion and the last gripper effort."""
        self._require()
        with self._cell.lock:
            self._cell.apply_action(np.array([0.0, 0.0, 0.0, self._grip_action]))

    def move_home(self, ee_position: np.ndarray, gripper: float, timeout: float = 30.0) -> None:
        """Blocking; steps the simulation (at most `action_scale` per axis per step) until the hand is within
        `home_tolerance` of `ee_position` and at rest. `timeout` is simulated seconds."""
        self._require()
        target = np.asarray(ee_position, dtype=np.float64)
        cell = self._cell
        with cell.lock:
            steps = max(1, math.ceil(timeout / cell.control_dt))
            for _ in range(steps):
                self.send_target(target, gripper)
                _, _, dq = cell.joint_state()
                near = float(np.linalg.norm(cell.ee_position() - target)) <= self._home_tolerance
                if near and float(np.max(np.abs(dq[:7]))) < 0.05:
                    return
            raise ArmError(
                f"sim arm did not reach home {target.tolist()} within {timeout} s; "
                f"hand at {cell.ee_position().tolist()}"
            )
