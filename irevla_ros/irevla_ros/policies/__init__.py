"""Policy registry: the `policy` parameter of the policy node picks one by name.

A policy's factory takes the policy node's parameters and returns the initial policy and, for policies that come
in versions (the VLA), the loader of a version by id (None otherwise): what the node's PolicySlot needs."""

from __future__ import annotations

from collections.abc import Mapping

from irevla_ros.policies.base import Policy
from irevla_ros.policies.slot import PolicyLoader
from irevla_ros.registry import Registry


class UnknownPolicyError(ValueError):
    """The `policy` parameter names no known policy."""


POLICIES: Registry[tuple[Policy, PolicyLoader | None]] = Registry(
    "policy",
    {
        "scripted_expert": "irevla_ros.policies.scripted:expert_slot",
        "random": "irevla_ros.policies.scripted:random_slot",
        "vla": "irevla_ros.policies.vla:vla_slot",
    },
    UnknownPolicyError,
    plural="policies",
)


def make_policy_slot_parts(params: Mapping[str, object]) -> tuple[Policy, PolicyLoader | None]:
    """The initial policy of `params["policy"]` and its version loader (None: it takes no versions)."""
    return POLICIES.make(str(params["policy"]), params)
