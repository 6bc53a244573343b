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


def test_hints_reach_the_loader_and_swaps_report_their_wait():
    seen: list[tuple[str, dict]] = []

    def loader(version: str, **hints: object) -> FixedPolicy:
        seen.append((version, hints))
        if hints.get("heads_only") and not version.startswith("h"):
            raise ValueError(f"{version} was announced as heads-only but the store has a full version")
        policy = FixedPolicy(version, 2.0)
        policy.load_note = "heads-only on v1 (encoder shared)" if version.startswith("h") else ""
        return policy

    slot = PolicySlot(FixedPolicy("v1", 1.0), loader)
    slot.request("h2", heads_only=True).join(5)
    slot.request("v3", heads_only=True).join(5)
    slot.request("v4").join(5)  # no hints: the loader is called with the version alone
    assert seen == [("h2", {"heads_only": True}), ("v3", {"heads_only": True}), ("v4", {})]
    loaded = {e.version: e for e in slot.events if e.kind == "loaded"}
    assert loaded["h2"].detail == "heads-only on v1 (encoder shared)" and loaded["v4"].detail == ""
    rejected = [e for e in slot.events if e.kind == "rejected"]
    assert [e.version for e in rejected] == ["v3"] and "announced as heads-only" in rejected[0].detail
    # the newest loaded version is pending; its swap reports the time since it was requested
    swapped = slot.take_swap()
    assert swapped.version == "v4"
    event = slot.events[-1]
    assert event.kind == "swapped" and 0.0 < event.seconds < 5.0
    slot.rollback()
    assert slot.take_swap().version == "v1" and slot.events[-1].seconds == 0.0
