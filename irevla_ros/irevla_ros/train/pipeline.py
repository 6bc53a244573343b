"""The stages chained as the trainer runs them; used by `irevla demo` (and, in issue 5, by the trainer node)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.datasets import expert_set
from irevla_ros.train.sft import SFTConfig, train_supervised
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore, VersionInfo

# On a 2-core CPU the first version trains LoRA in the text encoder, the new fusion layers, the token learner and
# the action head; LoRA inside the image encoder (the compact default) needs backpropagation through it, several
# times slower. On a GPU workstation use VLAConfig's defaults.
CPU_LORA_TARGETS = ("query", "value")


def train_first_version(
    store_path: Path, models_path: Path, cameras: Sequence[str], *, steps: int = 150, batch_size: int = 16
) -> VersionInfo:
    """Stage 0: supervised learning on the expert episodes of the store -> version 1 in the model store."""
    with EpisodeStore(store_path, read_only=True) as store:
        data = expert_set(store, tuple(cameras), cache_dir=store_path.parent / "dataset-cache")
    model = VLAModel(VLAConfig(cameras=tuple(cameras), lora_targets=CPU_LORA_TARGETS))
    report = train_supervised(model, data, config=SFTConfig(steps=steps, batch_size=batch_size))
    return ModelStore(models_path).save(
        model,
        parent=None,
        stage="stage0_sft",
        data={"expert_episodes": data.episode_ids, "samples": len(data)},
        metrics={
            "first_loss": report["first_loss"],
            "final_loss": report["final_loss"],
            "seconds": report["seconds"],
        },
    )
