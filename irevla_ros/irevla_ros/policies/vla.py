"""The VLA in the policy slot: a model-store version run by ONNX Runtime (torch as fallback), with the model's
own Gaussian exploration (or its mean, deterministic, for evaluation)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from irevla_ros.policies.base import Observation, PolicyError, PolicyOutput
from irevla_ros.vla.model_store import InvalidVersionError, ModelStore, probe_observation
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


# Run first in the validator child: SCHED_IDLE (the CPU only when the control loop does not want it), set by the
# child itself so the parent can spawn it without a preexec_fn (which forces a full fork of this large process).
_VALIDATE = """
import os, sys
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    os.nice(19)
from irevla_ros.vla.model_store import ModelStore
ModelStore(sys.argv[1]).validate(sys.argv[2])
"""


def _validate_in_subprocess(store_root: Path, version_id: str, timeout: float = 600.0) -> None:
    """Checksums, weights, shapes, finite probe outputs and ONNX-vs-torch, in a niced child process: validation
    runs torch on every core and holds the GIL for long stretches, which would delay the control loop's ticks."""
    result = subprocess.run(
        [sys.executable, "-c", _VALIDATE, str(store_root), version_id],
        capture_output=True,
        text=True,
        timeout=timeout,
        # one core at most: the control loop keeps the other
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ORT_NUM_THREADS": "1"},
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"validation exited with {result.returncode}"
        raise InvalidVersionError(reason.split(": ", 1)[-1] if "Error: " in reason else reason)


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
        _validate_in_subprocess(store.root, version_id)
        runtime = make_runtime(store.get(version_id).path)
        runtime.act(*probe_observation(runtime.config))  # warm-up: the first inference allocates, not a tick
        return VLAPolicy(runtime, version_id, deterministic=deterministic, seed=seed)

    return load
