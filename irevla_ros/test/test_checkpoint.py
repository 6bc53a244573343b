"""Checkpoints: atomic, checksummed, never unpickling code, falling back past a corrupt newest one."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from irevla_ros.train.checkpoint import Checkpointer, CheckpointError, rng_state, set_rng_state


def _state(step: int) -> dict:
    return {"weights": torch.full((3,), float(step)), "counters": {"step": step, "name": "stage1"}}


def test_save_latest_and_pruning(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    assert ckpt.latest() is None
    for step in (10, 20, 30):
        ckpt.save(step, _state(step))
    assert ckpt.steps() == [20, 30]
    step, state = ckpt.latest()
    assert step == 30 and torch.equal(state["weights"], torch.full((3,), 30.0))
    assert state["counters"] == {"step": 30, "name": "stage1"}


def test_corrupt_newest_falls_back_and_interrupted_write_is_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(1, _state(1))
    ckpt.save(2, _state(2))
    pt = tmp_path / "ckpt-000000002.pt"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    (tmp_path / "ckpt-000000003.pt").write_bytes(b"half a checkpoint, no json: killed mid-save")
    step, state = ckpt.latest()
    assert step == 1 and state["counters"]["step"] == 1
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ckpt.load(2)
    (tmp_path / "ckpt-000000001.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ckpt.latest()


class _Payload:  # torch.save pickles it; loading must refuse it
    pass


def test_loading_refuses_arbitrary_objects(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(5, {"evil": _Payload()})
    with pytest.raises(CheckpointError, match="cannot load"):
        ckpt.load(5)


def test_rng_state_round_trip_reproduces_every_stream(tmp_path):
    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(4)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(5)
    Checkpointer(tmp_path).save(0, {"rng": rng_state(gen, rng)})
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen), rng.random(2))
    _, state = Checkpointer(tmp_path).latest()
    set_rng_state(state["rng"], gen, rng)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=gen), rng.random(2))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2]
    assert torch.equal(first[3], again[3]) and np.array_equal(first[4], again[4])
    with pytest.raises(CheckpointError, match="generator states"):
        set_rng_state(state["rng"], gen)
