"""The observation and action check shared by the policy node and the direct rollout (irevla_ros/observation.py):
each reason a tick holds, and what it acts on otherwise."""

from __future__ import annotations

import re

import numpy as np
import pytest

from irevla_ros.observation import (
    ArmState,
    Frame,
    HoldTick,
    ObservationRules,
    assemble,
    decide,
    resize_area,
)
from irevla_ros.policies.base import Observation, PolicyError, PolicyOutput
from irevla_ros.policies.scripted import EXPERT_ACTION_KEY, ScriptedExpertPolicy

RULES = ObservationRules(("a", "b"), 32, 24, max_image_age=0.25, max_camera_skew=0.1, max_state_age=0.25)
ARM = ArmState(np.array([0.1, 0.6, 0.2]), 0.8, 10.0)


def _frames(stamp_a: float = 10.0, stamp_b: float = 10.0) -> dict[str, Frame | None]:
    rng = np.random.default_rng(0)
    return {
        "a": Frame(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), stamp_a),
        "b": Frame(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), stamp_b),
    }


def _malformed() -> np.ndarray:
    raise ValueError("data has 5 bytes")


def test_assemble_builds_the_policy_input():
    frames = _frames()
    obs = assemble(RULES, frames, ARM, "press", 10.0, {EXPERT_ACTION_KEY: np.ones(4, np.float32)})
    assert obs.images["a"].shape == (24, 32, 3) and obs.images["b"] is frames["b"].image  # type: ignore[union-attr]
    np.testing.assert_array_equal(obs.images["a"], resize_area(frames["a"].image, 32, 24))  # type: ignore[union-attr]
    assert obs.proprioception.dtype == np.float32
    np.testing.assert_array_equal(obs.proprioception, np.array([0.1, 0.6, 0.2, 0.8], np.float32))
    assert obs.instruction == "press" and obs.stamp == 10.0 and EXPERT_ACTION_KEY in obs.extras


@pytest.mark.parametrize(
    ("frames", "arm", "reason"),
    [
        ({"a": _frames()["a"], "b": None}, ARM, "no frame from camera 'b' yet"),
        (_frames(stamp_a=9.7), ARM, "camera 'a' is stale: newest frame is 0.300 s old"),
        (_frames(stamp_b=9.85), ARM, "camera frames are 0.150 s apart (max_camera_skew)"),
        (
            {**_frames(), "b": Frame(np.zeros((24, 32), np.uint8), 10.0)},
            ARM,
            "camera 'b': expected a colour image, got shape (24, 32)",
        ),
        # A decoder runs only for a fresh frame: a stale malformed frame is stale, a fresh one malformed.
        ({**_frames(), "b": Frame(_malformed, 9.7)}, ARM, "camera 'b' is stale: newest frame is 0.300 s old"),
        ({**_frames(), "b": Frame(_malformed, 10.0)}, ARM, "camera 'b': data has 5 bytes"),
        (_frames(), None, "no arm state"),
        (_frames(), ArmState((0.1, 0.6, 0.2), 0.8, 9.7), "arm state is stale"),
        (_frames(), ArmState((np.nan, 0.6, 0.2), 0.8, 10.0), "non-finite arm state [nan"),
    ],
)
def test_assemble_holds_with_the_reason(frames, arm, reason):
    with pytest.raises(HoldTick, match=re.escape(reason)):
        assemble(RULES, frames, arm, "press", 10.0)


class _Returns:
    version = "v-test"

    def __init__(self, result: object) -> None:
        self.result = result

    def reset(self, instruction: str) -> None:
        del instruction

    def act(self, observation: Observation) -> PolicyOutput:
        if isinstance(self.result, Exception):
            raise self.result
        return self.result  # type: ignore[return-value]


def test_decide_acts_or_holds_with_the_reason():
    obs = assemble(RULES, _frames(), ARM, "press", 10.0, {EXPERT_ACTION_KEY: np.full(4, 0.5)})
    acted = decide(ScriptedExpertPolicy(), obs)
    assert not acted.hold and acted.output is not None
    assert acted.action.dtype == np.float32
    np.testing.assert_array_equal(acted.action, np.full(4, 0.5, np.float32))
    cases = [
        (PolicyOutput(np.array([0.0, np.nan, 0.0, 0.0])), "is not 4 finite numbers"),
        (PolicyOutput(np.zeros(3)), "is not 4 finite numbers"),
        (PolicyError("no expert action"), "no expert action"),
        (RuntimeError("runtime died"), "policy v-test failed: RuntimeError: runtime died"),
    ]
    for result, reason in cases:
        decision = decide(_Returns(result), obs)  # type: ignore[arg-type]
        assert decision.hold and decision.output is None and reason in decision.hold_reason, decision
        np.testing.assert_array_equal(decision.action, np.zeros(4, np.float32))
