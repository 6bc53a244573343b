"""Shared by the iteration tests: a tiny compact VLA config and synthetic episodes written through the store."""

from __future__ import annotations

import numpy as np

from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import EpisodeMeta, StepData
from irevla_ros.vla.config import VLAConfig

TINY = VLAConfig(
    image_size=32, latent_dim=32, fusion_heads=2, fusion_layers=1, token_learner_hidden=16, head_hidden=(32,),
    lora_rank=2,
)  # fmt: skip
TASKS = {"button-press-v3": "press the button", "drawer-open-v3": "open the drawer"}


def write_episode(
    store: EpisodeStore, episode_id: str, source: str, outcome: str, version: str, n: int = 6, seed: int = 0
) -> None:
    task = list(TASKS)[seed % 2]
    assembler = EpisodeAssembler()
    assembler.start(EpisodeMeta(episode_id, task, TASKS[task], version, source, started_ns=1))
    rng = np.random.default_rng(seed)
    for i in range(n):
        assembler.add_step(
            StepData(
                episode_id=episode_id,
                step_index=i,
                stamp_ns=i * 100_000_000,
                images={"camera": rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)},
                image_stamps_ns={"camera": i * 100_000_000},
                proprioception=rng.normal(size=4).astype(np.float32),
                proprioception_names=["x", "y", "z", "gripper"],
                instruction=TASKS[task],
                action=np.clip(rng.normal(0, 0.3, 4), -1, 1).astype(np.float32),
                log_prob=-2.0 if source == "policy" else None,
                value=None,
                policy_version=version,
                intervention=False,
                hold=False,
            )
        )
    store.write(assembler.end(episode_id, outcome, "simulator", n, ended_ns=2))
