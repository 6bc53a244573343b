"""The policy slot swaps versions only between ticks, refuses bad ones, and rolls back."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from irevla_ros.policies.base import Observation, PolicyOutput
from irevla_ros.policies.slot import PolicySlot


class FixedPolicy:
    """A real (trivial) policy: always the same action, named by its version."""

    name = "fixed"

    def __init__(self, version: str, value: float) -> None:
        self.version = version
        self.value = value
        self.resets: list[str] = []

    def reset(self, instruction: str) -> None:
        self.resets.append(instruction)

    def act(self, observation: Observation) -> PolicyOutput:
        return PolicyOutput(np.full(4, self.value, np.float32))


def test_swap_happens_at_a_tick_boundary_and_bad_versions_are_refused():
    release = threading.Event()

    def loader(version: str) -> FixedPolicy:
        if version == "corrupt":
            raise ValueError("checksum mismatch in model.safetensors")
        release.wait(5)  # a slow load must not block anyone
        return FixedPolicy(version, float(version[1:]))

    slot = PolicySlot(FixedPolicy("v1", 1.0), loader)
    thread = slot.request("v2")
    assert slot.take_swap() is None and slot.active.version == "v1"  # still loading: ticks go on with v1
    assert slot.request("v2") is None  # already loading
    release.set()
    thread.join(5)
    assert slot.active.version == "v1"  # loaded, not yet swapped: only a tick swaps
    assert slot.take_swap().version == "v2" and slot.active.version == "v2"
    assert slot.take_swap() is None

    slot.request("corrupt").join(5)
    assert slot.take_swap() is None and slot.active.version == "v2"
    rejected = [e for e in slot.events if e.kind == "rejected"]
    assert rejected[0].version == "corrupt" and "checksum mismatch" in rejected[0].detail

    assert slot.rollback() == "v1"
    assert slot.take_swap().version == "v1" and slot.previous.version == "v2"


def test_slot_without_loader_takes_no_versions():
    slot = PolicySlot(FixedPolicy("scripted", 0.0))
    with pytest.raises(ValueError, match="no loader"):
        slot.request("v1")
    with pytest.raises(ValueError, match="no previous version"):
        slot.rollback()
