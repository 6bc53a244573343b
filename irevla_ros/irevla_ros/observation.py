"""What a policy sees at a control tick and what is checked in what it returns: one computation for the policy
node (inputs from ROS messages) and the direct rollout (inputs straight from the simulated cell).

`assemble` builds the Observation from decoded camera frames, the arm's end-effector position and gripper
opening, and the episode's instruction, with the staleness/skew rules; `decide` runs the policy on it and turns
anything unusable (a PolicyError, a policy that raises, an action of the wrong shape or not finite) into a hold
with its reason. Anything the tick cannot act on raises `HoldTick`. The magnitude of an action is the safety
layer's business (`SafetyLayer.command`), which both paths run too. Plain Python: no rclpy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from irevla_ros.policies.base import ACTION_DIM, Observation, Policy, PolicyError, PolicyOutput

# The layout of Observation.proprioception (and of StepRecord.proprioception_names).
PROPRIOCEPTION_NAMES = ("ee_x", "ee_y", "ee_z", "gripper_opening")


class HoldTick(Exception):
    """This tick cannot act; the message says why."""


@dataclass(frozen=True)
class ObservationRules:
    """The policy input size and the freshness rules (seconds of ROS time; inf: not checked)."""

    cameras: tuple[str, ...]
    image_width: int
    image_height: int
    max_image_age: float = math.inf
    max_camera_skew: float = math.inf
    max_state_age: float = math.inf


@dataclass(frozen=True)
class Frame:
    """One camera's frame and its capture stamp (s). `image` may be a decoder, called only once the frame is
    known to be fresh (a stale frame is reported stale, whatever its bytes); a ValueError from it is a hold."""

    image: np.ndarray | Callable[[], np.ndarray]
    stamp: float

    def pixels(self) -> np.ndarray:
        return self.image() if callable(self.image) else self.image


@dataclass(frozen=True)
class ArmState:
    """The arm state an observation is built from: end-effector position (m), gripper opening, stamp (s)."""

    ee_position: Sequence[float] | np.ndarray
    gripper: float
    stamp: float


@dataclass
class Decision:
    """What a tick does: act with `action` (output is the policy's) or hold (output None, reason given)."""

    action: np.ndarray  # (ACTION_DIM,) float32, zeros on a hold
    output: PolicyOutput | None
    hold_reason: str = ""

    @property
    def hold(self) -> bool:
        return self.output is None


def resize_area(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """A frame at `width` x `height` (INTER_AREA, as the camera node and the policy node resize)."""
    if image.shape[1] != width or image.shape[0] != height:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    return image


def proprioception(ee_position: Sequence[float] | np.ndarray, gripper_opening: float) -> np.ndarray:
    """float32 [ee x, y, z (m), gripper opening]; the position arrives as float64 (pose, joint_states)."""
    p = np.asarray(ee_position, dtype=np.float64).reshape(3)
    return np.array([p[0], p[1], p[2], gripper_opening], dtype=np.float32)


def assemble(
    rules: ObservationRules,
    frames: Mapping[str, Frame | None],
    arm: ArmState | None,
    instruction: str,
    now: float,
    extras: Mapping[str, np.ndarray] | None = None,
) -> Observation:
    """The observation of the tick at ROS time `now`, or HoldTick with the reason it cannot be built."""
    images: dict[str, np.ndarray] = {}
    stamps: list[float] = []
    for cam in rules.cameras:
        frame = frames.get(cam)
        if frame is None:
            raise HoldTick(f"no frame from camera {cam!r} yet")
        age = now - frame.stamp
        if age > rules.max_image_age:
            raise HoldTick(f"camera {cam!r} is stale: newest frame is {age:.3f} s old")
        try:
            image = frame.pixels()
        except ValueError as exc:  # a malformed message (ImageFormatError)
            raise HoldTick(f"camera {cam!r}: {exc}") from exc
        if image.ndim != 3 or image.shape[2] != 3:
            raise HoldTick(f"camera {cam!r}: expected a colour image, got shape {image.shape}")
        images[cam] = resize_area(image, rules.image_width, rules.image_height)
        stamps.append(frame.stamp)
    if stamps and max(stamps) - min(stamps) > rules.max_camera_skew:
        raise HoldTick(f"camera frames are {max(stamps) - min(stamps):.3f} s apart (max_camera_skew)")
    if arm is None:
        raise HoldTick("no arm state stamped at or before the tick yet")
    state_age = now - arm.stamp
    if state_age > rules.max_state_age:
        raise HoldTick(f"arm state is stale: newest ~/ee_pose is {state_age:.3f} s old")
    proprio = proprioception(arm.ee_position, arm.gripper)
    if not np.all(np.isfinite(proprio)):
        raise HoldTick(f"non-finite arm state {proprio.tolist()}")
    return Observation(images, proprio, instruction, now, dict(extras or {}))


def check_action(output: PolicyOutput) -> np.ndarray:
    """The policy's action as float32 (ACTION_DIM,), or HoldTick when it is not ACTION_DIM finite numbers."""
    action = np.asarray(output.action, dtype=np.float32)
    if action.shape != (ACTION_DIM,) or not np.all(np.isfinite(action)):
        raise HoldTick(f"policy output {action.tolist()} is not {ACTION_DIM} finite numbers")
    return action


def holding(reason: str) -> Decision:
    return Decision(np.zeros(ACTION_DIM, dtype=np.float32), None, reason)


def decide(policy: Policy, observation: Observation) -> Decision:
    """Run `policy` on `observation`: act, or hold with the reason. A policy bug (the runtime raising) holds
    the arm like a refused output; the caller keeps running."""
    try:
        output = policy.act(observation)
        return Decision(check_action(output), output)
    except (HoldTick, PolicyError) as exc:
        return holding(str(exc))
    except Exception as exc:
        return holding(f"policy {getattr(policy, 'version', '?')} failed: {type(exc).__name__}: {exc}")
