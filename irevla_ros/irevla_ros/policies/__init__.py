"""Policy registry: the `policy` parameter of the policy node picks one by name."""

from __future__ import annotations

from irevla_ros.policies.base import Policy


def make_policy(name: str, *, noise_std: float = 0.0, seed: int = 0) -> Policy:
    if name == "scripted_expert":
        from irevla_ros.policies.scripted import ScriptedExpertPolicy

        return ScriptedExpertPolicy(noise_std=noise_std, seed=seed)
    if name == "random":
        from irevla_ros.policies.scripted import RandomPolicy

        return RandomPolicy(seed=seed)
    if name == "vla":
        raise ValueError(
            "policy 'vla': the VLA policy is not available in this version (scripted_expert, random)"
        )
    raise ValueError(f"unknown policy {name!r} (known: scripted_expert, random, vla)")
