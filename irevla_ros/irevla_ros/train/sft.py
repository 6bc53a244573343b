"""Supervised stages of iRe-VLA: Stage 0 (expert data D_e -> first policy) and Stage 2 (D_e ∪ D_RL, to absorb what
RL found without forgetting). MSE on actions; LoRA, the backbone's new layers, the token learner and the action head
are trained, the pretrained backbone stays frozen (VLAModel.set_trainable("lora_and_action_head")).
Hyperparameters live in SFTConfig; the loop reads top to bottom.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from irevla_ros.train.datasets import Transitions
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.preprocess import preprocess_images


@dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-4  # token learner, action head, new backbone layers
    lr_lora: float = 1e-4
    weight_decay: float = 0.01
    rl_fraction: float = 0.5  # share of each batch drawn from D_RL when it is given (Stage 2)
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if not 0.0 <= self.rl_fraction <= 1.0:
            raise ValueError(f"rl_fraction must be in [0, 1], got {self.rl_fraction}")


@dataclass
class Prepared:
    """A dataset with images preprocessed once for the model (float32, the size the backbone takes)."""

    images: torch.Tensor  # (N, n_cam, 3, S, S)
    proprio: torch.Tensor  # (N, P)
    actions: torch.Tensor  # (N, A)
    instruction_ids: torch.Tensor  # (N,)
    instructions: list[str]

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def prepare(data: Transitions, model: VLAModel) -> Prepared:
    cameras = model.config.cameras
    images = np.stack([preprocess_images(list(sample), model.config) for sample in data.images])
    if images.shape[1] != len(cameras):
        raise ValueError(f"dataset has {images.shape[1]} cameras, the model takes {len(cameras)} ({cameras})")
    return Prepared(
        torch.from_numpy(images),
        torch.from_numpy(np.ascontiguousarray(data.proprio[:, : model.config.proprio_dim])),
        torch.from_numpy(np.ascontiguousarray(data.actions)),
        torch.from_numpy(data.instruction_ids.astype(np.int64)),
        list(data.instructions),
    )


def _batch(data: Prepared, index: torch.Tensor, model: VLAModel) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted action means, target actions) for the samples in `index`."""
    text = model.encode_instruction(
        data.instructions
    )  # few distinct instructions; LoRA may sit in the encoder
    latent = model.encode(data.images[index], text[data.instruction_ids[index]], data.proprio[index])
    return model.action_mean(latent), data.actions[index]


def train_supervised(
    model: VLAModel,
    expert: Transitions,
    rl: Transitions | None = None,
    config: SFTConfig | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, object]:
    cfg = config or SFTConfig()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    d_e = prepare(expert, model)
    d_rl = prepare(rl, model) if rl is not None and len(rl) else None
    n_rl = round(cfg.batch_size * cfg.rl_fraction) if d_rl is not None else 0
    n_e = cfg.batch_size - n_rl

    params = model.set_trainable("lora_and_action_head")
    lora = {id(p) for _, p in model.named_parameter_groups()["lora"]}
    optimiser = torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) in lora], "lr": cfg.lr_lora},
            {"params": [p for p in params if id(p) not in lora], "lr": cfg.lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    model.train()
    losses: list[float] = []
    started = time.monotonic()
    bar = tqdm(range(cfg.steps), desc="supervised", disable=not progress, mininterval=2.0)
    for step in bar:
        lr_scale = 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))  # cosine decay
        for group, base in zip(optimiser.param_groups, (cfg.lr_lora, cfg.lr), strict=True):
            group["lr"] = base * lr_scale
        predicted, target = _batch(d_e, torch.randint(len(d_e), (n_e,), generator=generator), model)
        if d_rl is not None and n_rl:
            p_rl, t_rl = _batch(d_rl, torch.randint(len(d_rl), (n_rl,), generator=generator), model)
            predicted, target = torch.cat([predicted, p_rl]), torch.cat([target, t_rl])
        loss = torch.nn.functional.mse_loss(predicted, target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimiser.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return {
        "config": asdict(cfg),
        "losses": losses,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-10:])),
        "seconds": time.monotonic() - started,
        "samples": {"expert": len(d_e), "rl": 0 if d_rl is None else len(d_rl)},
    }
