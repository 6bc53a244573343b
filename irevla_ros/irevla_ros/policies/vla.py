"""The VLA in the policy slot: a model-store version run by ONNX Runtime (torch as fallback), with the model's
own Gaussian exploration (or its mean, deterministic, for evaluation)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from irevla_ros.policies.base import Observation, PolicyError, PolicyOutput
from irevla_ros.vla.model_store import ModelStore
from irevla_ros.vla.preprocess import VLAInputError
from irevla_ros.vla.runtime import make_runtime


class VLAPolicy:
    name = "vla"

    def __init__(self, runtime: object, version: str, *, deterministic: bool = False, seed: int = 0) -> None:
        self.runtime = runtime
        self.version = version
        self.deterministic = deterministic
        self._rng = np.random.default_rng(seed)
        self._instruction = ""

    def reset(self, instruction: str) -> None:
        self._instruction = instruction
        self.runtime.encode_instruction(instruction)  # type: ignore[attr-defined]  # once per episode (cached)

    def act(self, observation: Observation) -> PolicyOutput:
        instruction = observation.instruction or self._instruction
        try:
            mean, value, _ = self.runtime.act(  # type: ignore[attr-defined]
                observation.images, instruction, observation.proprioception
            )
        except VLAInputError as exc:
            raise PolicyError(f"VLA input: {exc}") from exc
        if not (np.all(np.isfinite(mean)) and np.isfinite(value)):
            raise PolicyError(f"VLA {self.version} produced non-finite output {np.asarray(mean).tolist()}")
        action, log_prob = self.runtime.sample(mean, self._rng, deterministic=self.deterministic)  # type: ignore[attr-defined]
        return PolicyOutput(action, log_prob=None if self.deterministic else log_prob, value=float(value))


def vla_loader(store_root: str, *, deterministic: bool = False, seed: int = 0) -> Callable[[str], VLAPolicy]:
    """version id ('' = newest) -> a validated VLAPolicy; raises with the reason for a bad version."""

    def load(version_id: str) -> VLAPolicy:
        store = ModelStore(store_root)
        if not version_id:
            latest = store.latest()
            if latest is None:
                raise FileNotFoundError(
                    f"model store {store_root} has no version yet: train one first (irevla demo does, from "
                    "scripted demonstrations)"
                )
            version_id = latest.version_id
        store.validate(version_id)  # checksums, weights, shapes, finite probe outputs, ONNX vs torch
        return VLAPolicy(
            make_runtime(store.get(version_id).path), version_id, deterministic=deterministic, seed=seed
        )

    return load
