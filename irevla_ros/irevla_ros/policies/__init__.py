"""Policy registry: the `policy` parameter of the policy node picks one by name."""

from __future__ import annotations

from collections.abc import Mapping

from irevla_ros.policies.base import Policy
from irevla_ros.policies.slot import PolicyLoader


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


def make_policy_slot_parts(params: Mapping[str, object]) -> tuple[Policy, PolicyLoader | None]:
    """The initial policy and, for policies that come in versions (the VLA), the loader of a version by id."""
    name = str(params["policy"])
    noise, seed = float(params["action_noise"]), int(params["seed"])  # type: ignore[arg-type]
    if name != "vla":
        return make_policy(name, noise_std=noise, seed=seed), None
    from irevla_ros.policies.vla import vla_loader

    loader = vla_loader(str(params["model_store"]), deterministic=bool(params["deterministic"]), seed=seed)
    return loader(str(params["version"])), loader
