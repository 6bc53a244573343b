"""Datasets from the episode store: D_e and D_RL selection, sparse rewards, decode-once cache."""

from __future__ import annotations

import numpy as np
import pytest

from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import EpisodeMeta, StepData
from irevla_ros.train.datasets import DatasetError, expert_set, load_transitions, rl_set


def _write(
    store: EpisodeStore, episode_id: str, source: str, outcome: str, n: int, complete: bool = True
) -> None:
    assembler = EpisodeAssembler()
    assembler.start(EpisodeMeta(episode_id, "button-press-v3", f"press {source}", "v1", source, started_ns=1))
    rng = np.random.default_rng(len(episode_id) + n)
    for i in range(n):
        if not complete and i == 1:
            continue
        assembler.add_step(
            StepData(
                episode_id=episode_id,
                step_index=i,
                stamp_ns=i * 100_000_000,
                images={"camera": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)},
                image_stamps_ns={"camera": i},
                proprioception=np.full(4, i, np.float32),
                proprioception_names=["x", "y", "z", "g"],
                instruction=f"press {source}",
                action=np.full(4, i / 10, np.float32),
                log_prob=-1.0 if i else None,
                value=None,
                policy_version="v1",
                intervention=False,
                hold=(i == n - 1 and n > 2),
            )
        )
    store.write(assembler.end(episode_id, outcome, "simulator", n, ended_ns=2))


def test_expert_and_rl_sets(tmp_path):
    store = EpisodeStore(tmp_path / "store")
    _write(store, "e1", "expert", "success", 5)
    _write(store, "e2", "expert", "failure", 4)
    _write(store, "p1", "policy", "success", 3)
    _write(store, "p2", "policy", "timeout", 6)
    _write(store, "p3", "policy", "success", 4, complete=False)
    cache = tmp_path / "cache"
    d_e = expert_set(store, cache_dir=cache)
    assert d_e.episode_ids == ["e1"] and len(d_e) == 4  # the hold step is not a demonstration
    assert d_e.images.shape == (4, 1, 16, 16, 3) and d_e.images.dtype == np.uint8
    np.testing.assert_allclose(d_e.actions[:, 0], [0.0, 0.1, 0.2, 0.3])
    assert d_e.rewards.tolist() == [0, 0, 0, 1] and d_e.dones.tolist() == [False, False, False, True]
    assert np.isnan(d_e.log_probs[0]) and d_e.log_probs[1] == -1.0
    assert d_e.instructions == ["press expert"]
    d_rl = rl_set(store, cache_dir=cache)
    assert d_rl.episode_ids == ["p1"]  # incomplete p3 is never trainable
    everything = load_transitions(store, store.trainable(source="policy"), cache_dir=cache)
    assert everything.episode_ids == ["p1", "p2"] and everything.rewards.sum() == 1.0
    assert everything.episode_starts.tolist() == [0, 2]  # p1: 3 steps, the last a hold
    # decoded once: the cache answers the second time, even after the MCAP file is gone
    cached_files = sorted(cache.glob("*.npz"))
    assert len(cached_files) == 3
    (store.root / store.get("e1").path).unlink()
    again = expert_set(store, cache_dir=cache)
    np.testing.assert_array_equal(again.images, d_e.images)
    with pytest.raises(DatasetError, match="not trainable"):
        load_transitions(store, [store.get("p3")])
    store.close()
