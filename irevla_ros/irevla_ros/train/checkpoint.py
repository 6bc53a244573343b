"""Training checkpoints that survive SIGKILL at any moment: every stage resumes from its newest good checkpoint.

    ckpt = Checkpointer(run_dir / "checkpoints" / "stage1", keep=2)
    resumed = ckpt.latest()                       # None on a fresh start
    if resumed is not None:
        step, state = resumed
        model.load_state_dict(state["model"], strict=False); optimiser.load_state_dict(state["optimiser"])
        set_rng_state(state["rng"])
    ...
    ckpt.save(step, {"model": ..., "optimiser": optimiser.state_dict(), "rng": rng_state(), "counters": {...}})

A checkpoint is `ckpt-<step>.pt` (torch.save of tensors, numbers, strings, lists and dicts only) plus
`ckpt-<step>.json` (step, size, sha256), each written durably (`durable`: temp file, fsync, rename, directory
fsync); the JSON is written last, so a checkpoint without a matching JSON is a write that was interrupted and is
ignored. Loading verifies the checksum and uses `torch.load(weights_only=True)`: nothing is unpickled beyond plain
data. A corrupt newest checkpoint falls back to the one before it (so `keep` >= 2 always leaves a good one).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irevla_ros import durable

_NAME_RE = re.compile(r"ckpt-(\d{9})\.json")
_LOG = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be written or none of the existing ones can be read."""


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise CheckpointError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def _paths(self, step: int) -> tuple[Path, Path]:
        stem = self.directory / f"ckpt-{step:09d}"
        return stem.with_suffix(".pt"), stem.with_suffix(".json")

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk (those with their JSON), oldest first."""
        if not self.directory.is_dir():
            return []
        found = (_NAME_RE.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def save(self, step: int, state: Mapping[str, Any]) -> Path:
        if step < 0:
            raise CheckpointError(f"step must be >= 0, got {step}")
        self.directory.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        data = buffer.getvalue()
        pt, meta = self._paths(step)
        durable.write_bytes(pt, data)
        record = {"step": step, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        durable.write_json(meta, record)
        for old in self.steps()[: -self.keep]:
            for path in self._paths(old):
                path.unlink(missing_ok=True)
        for stray in self.directory.glob(f".*{durable.TEMP_SUFFIX}"):
            stray.unlink(missing_ok=True)
        return pt

    def load(self, step: int) -> dict[str, Any]:
        pt, meta = self._paths(step)
        try:
            record = json.loads(meta.read_text())
            data = pt.read_bytes()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {pt}: cannot read ({exc})") from exc
        if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise CheckpointError(f"checkpoint {pt}: checksum mismatch (corrupt or truncated)")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses anything but plain data
            raise CheckpointError(f"checkpoint {pt}: cannot load ({exc})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {pt}: not a mapping")
        return state

    def latest(self) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the newest readable checkpoint, or None when there is none at all."""
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                return step, self.load(step)
            except CheckpointError as exc:
                _LOG.warning("%s; trying an older checkpoint", exc)
                errors.append(str(exc))
        if errors:
            raise CheckpointError("no readable checkpoint: " + "; ".join(errors))
        return None


def rng_state(*generators: torch.Generator | np.random.Generator) -> dict[str, Any]:
    """The global torch, numpy and python RNG states, plus those of the given generators (in order)."""
    extra: list[Any] = []
    for g in generators:
        if isinstance(g, torch.Generator):
            extra.append({"torch": g.get_state()})
        else:
            extra.append({"numpy": _plain(g.bit_generator.state)})
    return {
        "torch": torch.get_rng_state(),
        "numpy": _plain(np.random.get_state(legacy=False)),
        "python": _plain(random.getstate()),
        "generators": extra,
    }


def set_rng_state(state: Mapping[str, Any], *generators: torch.Generator | np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_arrays(state["numpy"]))
    random.setstate(_tuples(state["python"]))
    saved = state.get("generators", [])
    if len(saved) != len(generators):
        raise CheckpointError(f"checkpoint has {len(saved)} generator states, {len(generators)} were given")
    for g, s in zip(generators, saved, strict=True):
        if isinstance(g, torch.Generator):
            g.set_state(s["torch"])
        else:
            g.bit_generator.state = _arrays(s["numpy"])


def _plain(value: Any) -> Any:
    """numpy arrays/scalars inside RNG states -> lists/ints, tuples -> lists: what weights_only loading accepts."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _arrays(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_arrays(v) for v in value]
    return value
