"""Supervised stages of iRe-VLA: Stage 0 (expert data D_e -> first policy) and Stage 2 (D_e ∪ D_RL, to absorb what
RL found without forgetting). MSE on actions, AdamW, cosine learning-rate decay.

Trainable sets (`SFTConfig.trainable`):
- "lora_and_action_head" (the paper, default): LoRA, the backbone's new (not pretrained) layers, the token learner
  and the action head (VLAModel.set_trainable("lora_and_action_head")). Pretrained backbone weights, the critic
  head and log_std are never changed.
- "full": the same plus every pretrained backbone weight (the LoRA-vs-full comparison; compact backbone only,
  since a model version of the hf backbone does not store the base model's weights).

The same loop runs in one process or under torchrun (see distributed.py): `batch_size` is the global batch; the
indices of step s come from a generator seeded with (seed, s), every rank draws the same global batch and takes
its share. Data order therefore depends only on the step, and a run resumed from a checkpoint (every
`checkpoint_every` steps into `checkpoint_dir`: trainable weights, optimiser, RNG, step, losses) continues exactly
as the uninterrupted run would have, whatever the number of processes before and after.
Hyperparameters live in SFTConfig; the loop reads top to bottom.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from irevla_ros.train.checkpoint import Checkpointer, rng_state, set_rng_state
from irevla_ros.train.config import (
    TRAINABLE_SETS,
    ResumeError,
    SFTConfig,
    SFTConfigError,
)
from irevla_ros.train.datasets import Transitions
from irevla_ros.train.distributed import DistContext, all_reduce_sum, current_context, wrap
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.preprocess import preprocess_images

# Changing these between a checkpoint and its resume would change the run itself (schedule, data, objective).
RUN_DEFINING_KEYS = ("steps", "batch_size", "lr", "lr_lora", "weight_decay", "rl_fraction", "grad_clip", "seed",
                 "trainable")  # fmt: skip


# ---------------------------------------------------------------- data


@dataclass
class Prepared:
    """D_e and D_RL side by side for the model: raw uint8 images (preprocessed per batch, so memory stays that of
    the dataset), proprio, targets, and instruction ids into one shared instruction list."""

    images: np.ndarray  # (N, n_cam, H, W, 3) uint8
    proprio: torch.Tensor  # (N, P)
    actions: torch.Tensor  # (N, A)
    instruction_ids: torch.Tensor  # (N,) into the shared list

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def prepare(data: Transitions, model: VLAModel, instructions: list[str]) -> Prepared:
    """Check `data` against the model and map its instructions into `instructions` (extended in place)."""
    cfg = model.config
    if data.images.ndim != 5 or data.images.dtype != np.uint8:
        raise SFTConfigError(
            f"images must be (N, cameras, H, W, 3) uint8, got {data.images.shape} {data.images.dtype}"
        )
    if data.images.shape[1] != cfg.n_cameras:
        raise SFTConfigError(
            f"dataset has {data.images.shape[1]} cameras, the model takes {cfg.n_cameras} ({list(cfg.cameras)})"
        )
    n = len(data)
    if data.actions.shape != (n, cfg.action_dim) or data.images.shape[0] != n or data.proprio.shape[0] != n:
        raise SFTConfigError(
            f"dataset arrays disagree: images {data.images.shape}, proprio {data.proprio.shape}, actions "
            f"{data.actions.shape} (the model's action_dim is {cfg.action_dim})"
        )
    if data.proprio.shape[1] < cfg.proprio_dim:
        raise SFTConfigError(f"proprio has {data.proprio.shape[1]} values, the model takes {cfg.proprio_dim}")
    if n and (data.instruction_ids.min() < 0 or data.instruction_ids.max() >= len(data.instructions)):
        raise SFTConfigError("instruction_ids point outside the dataset's instruction list")
    for text in data.instructions:
        if text not in instructions:
            instructions.append(text)
    remap = np.array([instructions.index(t) for t in data.instructions], np.int64)
    return Prepared(
        data.images,
        torch.from_numpy(np.ascontiguousarray(data.proprio[:, : cfg.proprio_dim], dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(data.actions, dtype=np.float32)),
        torch.from_numpy(remap[data.instruction_ids.astype(np.int64)] if n else np.zeros(0, np.int64)),
    )


def data_fingerprint(instructions: list[str], *sets: Prepared | None) -> str:
    """A cheap identity of the training data (sizes, targets, proprio, instructions): a checkpoint of one dataset
    is never resumed on another."""
    h = hashlib.sha256(json.dumps(instructions).encode())
    for data in sets:
        if data is None:
            h.update(b"none")
            continue
        h.update(str(data.images.shape).encode())
        for t in (data.proprio, data.actions, data.instruction_ids):
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _step_seed(seed: int, step: int, stream: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def batch_sizes(cfg: SFTConfig, n_rl: int) -> tuple[int, int]:
    """(samples from D_e, samples from D_RL) in each global batch."""
    from_rl = round(cfg.batch_size * cfg.rl_fraction) if n_rl else 0
    return cfg.batch_size - from_rl, from_rl


def batch_indices(
    step: int, cfg: SFTConfig, n_expert: int, n_rl: int, rank: int = 0, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of step `step`'s global batch: (indices into D_e, indices into D_RL).

    The global batch (D_e draws, then D_RL draws) depends only on (seed, step); rank r takes positions
    r, r + world_size, ...: the shares of all ranks are the global batch, each has at least one sample."""
    from_e, from_rl = batch_sizes(cfg, n_rl)
    g = torch.Generator().manual_seed(_step_seed(cfg.seed, step))
    e = torch.randint(max(n_expert, 1), (from_e,), generator=g)
    r = torch.randint(max(n_rl, 1), (from_rl,), generator=g)
    mine = torch.arange(rank, cfg.batch_size, world_size)
    return e[mine[mine < from_e]], r[mine[mine >= from_e] - from_e]


# ---------------------------------------------------------------- trainable set


def _groups(trainable: str) -> tuple[str, ...]:
    """VLAModel.named_parameter_groups() groups in a supervised trainable set."""
    base = ("lora", "backbone_new", "token_learner", "action_head")
    return (*base, "pretrained") if trainable == "full" else base


def supervised_parameters(
    model: VLAModel, trainable: str = "lora_and_action_head"
) -> list[tuple[str, nn.Parameter]]:
    """requires_grad on exactly the supervised trainable set; returns its (name, parameter) pairs."""
    if trainable not in TRAINABLE_SETS:
        raise SFTConfigError(f"trainable must be one of {TRAINABLE_SETS}, got {trainable!r}")
    if trainable == "full" and model.backbone.base_state_keys():
        raise SFTConfigError(
            "trainable='full' needs the compact backbone: a version of the hf backbone stores only LoRA and the "
            "new layers, so fully fine-tuned base weights would be lost"
        )
    model.set_trainable("lora_and_action_head")
    # Supervised stages distil a Stage 1 residual (PLD): the action head learns from D_RL what the residual did,
    # so the residual starts and ends at no correction and the version is a plain VLA again.
    model.action_residual.reset()
    groups = model.named_parameter_groups()
    named = [(n, p) for g in _groups(trainable) for n, p in groups[g]]
    for _, p in named:
        p.requires_grad_(True)
    return named


class _SupervisedForward(nn.Module):
    """The supervised forward pass as one module call: DistributedDataParallel synchronises gradients only for
    what runs through its wrapped module's forward."""

    def __init__(self, model: VLAModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        images: torch.Tensor,
        proprio: torch.Tensor,
        instruction_ids: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        # Each distinct instruction of the batch is encoded once per step (LoRA may sit in the text encoder).
        text = self.model.backbone.text_features(text_ids, text_mask)
        latent = self.model.encode(images, text[instruction_ids], proprio)
        return self.model.action_mean(latent)


def _images(data: Prepared, index: torch.Tensor, model: VLAModel) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([preprocess_images(list(s), model.config) for s in data.images[index.numpy()]])
    )


# ---------------------------------------------------------------- the loop


def train_supervised(
    model: VLAModel,
    expert: Transitions,
    rl: Transitions | None = None,
    config: SFTConfig | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Train `model` in place. `on_step(step, loss)` after each step (0-based, global batch loss). With
    `checkpoint_dir`, resumes from its newest checkpoint; `dist` defaults to the current torch.distributed
    process group, if any."""
    cfg = config or SFTConfig()
    ctx = dist or current_context(cfg.device)
    torch.set_num_threads(cfg.threads)
    if cfg.batch_size < ctx.world_size:
        raise SFTConfigError(
            f"batch_size {cfg.batch_size} is smaller than the number of processes {ctx.world_size}"
        )
    instructions: list[str] = []
    d_e = prepare(expert, model, instructions)
    d_rl = prepare(rl, model, instructions) if rl is not None and len(rl) else None
    if not len(d_e) and (d_rl is None or cfg.rl_fraction < 1.0):
        raise SFTConfigError("the expert set D_e is empty")
    from_e, from_rl = batch_sizes(cfg, 0 if d_rl is None else len(d_rl))
    fingerprint = data_fingerprint(instructions, d_e, d_rl)
    text_ids, text_mask = model.tokenize(instructions)

    named = supervised_parameters(model, cfg.trainable)
    params = [p for _, p in named]
    model.to(ctx.device)
    low_lr = {id(p) for g in ("lora", "pretrained") for _, p in model.named_parameter_groups()[g]}
    optimiser = torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) in low_lr], "lr": cfg.lr_lora},
            {"params": [p for p in params if id(p) not in low_lr], "lr": cfg.lr},
        ],
        weight_decay=cfg.weight_decay,
    )

    # Resume: trainable weights, optimiser, RNG, step, losses of the newest good checkpoint.
    checkpoints = (
        Checkpointer(checkpoint_dir, keep=cfg.keep_checkpoints) if checkpoint_dir is not None else None
    )
    start, losses = 0, []
    resumed = checkpoints.latest() if checkpoints is not None else None
    if resumed is not None:
        start, state = resumed
        _check_resumable(state, cfg, fingerprint, checkpoints.directory)  # type: ignore[union-attr]
        by_name = dict(named)
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                by_name[name].copy_(tensor)
        optimiser.load_state_dict(state["optimiser"])
        set_rng_state(state["rng"])
        losses = [float(v) for v in state["losses"]]

    forward = wrap(_SupervisedForward(model), ctx)
    text_ids, text_mask = text_ids.to(ctx.device), text_mask.to(ctx.device)
    scale = ctx.world_size / (cfg.batch_size * model.config.action_dim)
    model.train()
    started = time.monotonic()
    bar = tqdm(
        range(start, cfg.steps), desc="supervised", disable=not progress or not ctx.is_main, mininterval=2.0
    )
    for step in bar:
        lr_scale = 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))  # cosine decay
        for group, base in zip(optimiser.param_groups, (cfg.lr_lora, cfg.lr), strict=True):
            group["lr"] = base * lr_scale
        # Dropout (LoRA's, if any) draws from a per-step, per-rank seed: resume replays it exactly too.
        torch.manual_seed(_step_seed(cfg.seed, step, 1 + ctx.rank))
        e_idx, rl_idx = batch_indices(
            step, cfg, len(d_e), 0 if d_rl is None else len(d_rl), ctx.rank, ctx.world_size
        )
        parts = [(d_e, e_idx)] + ([(d_rl, rl_idx)] if d_rl is not None else [])
        parts = [(d, i) for d, i in parts if len(i)]
        images = torch.cat([_images(d, i, model) for d, i in parts]).to(ctx.device)
        proprio = torch.cat([d.proprio[i] for d, i in parts]).to(ctx.device)
        target = torch.cat([d.actions[i] for d, i in parts]).to(ctx.device)
        ids = torch.cat([d.instruction_ids[i] for d, i in parts]).to(ctx.device)
        used, ids = torch.unique(ids, return_inverse=True)
        predicted = forward(images, proprio, ids, text_ids[used], text_mask[used])
        sse = (predicted - target).pow(2).sum()
        optimiser.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks: scaled so the average is the gradient of the global batch's MSE.
        (sse * scale).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimiser.step()
        loss = float(all_reduce_sum(sse.detach(), ctx).item()) / (cfg.batch_size * model.config.action_dim)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(step, loss)
        done = step + 1
        if (
            checkpoints is not None
            and ctx.is_main
            and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
        ):
            checkpoints.save(
                done,
                {
                    "trainable": {n: p.detach().to("cpu").clone() for n, p in named},
                    "optimiser": optimiser.state_dict(),
                    "rng": rng_state(),
                    "step": done,
                    "losses": list(losses),
                    "config": cfg.to_dict(),
                    "data": fingerprint,
                    "world_size": ctx.world_size,
                },
            )
    seconds = time.monotonic() - started
    model.eval()
    steps_run = cfg.steps - start
    return {
        "config": cfg.to_dict(),
        "losses": losses,
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-10:])),
        "seconds": seconds,
        "steps_run": steps_run,
        "resumed_from": start,
        "samples_per_s": steps_run * cfg.batch_size / seconds if steps_run and seconds > 0 else None,
        "world_size": ctx.world_size,
        "samples": {"expert": len(d_e), "rl": 0 if d_rl is None else len(d_rl)},
        "batch": {"expert": from_e, "rl": from_rl},
        "trainable_parameters": int(sum(p.numel() for p in params)),
    }


def _check_resumable(state: Mapping[str, Any], cfg: SFTConfig, fingerprint: str, where: Path) -> None:
    saved = state.get("config", {})
    changed = sorted(k for k in RUN_DEFINING_KEYS if saved.get(k) != getattr(cfg, k))
    if changed:
        diff = ", ".join(f"{k} {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ResumeError(f"checkpoints in {where} are of another run: {diff} (use a fresh checkpoint_dir)")
    if state.get("data") != fingerprint:
        raise ResumeError(f"checkpoints in {where} were trained on other data (use a fresh checkpoint_dir)")


def trainable_state(model: VLAModel, trainable: str = "lora_and_action_head") -> dict[str, torch.Tensor]:
    """The weights of the supervised trainable set by name (CPU, contiguous): what a Stage 2 job ships back."""
    groups = model.named_parameter_groups()
    return {n: p.detach().to("cpu").contiguous() for g in _groups(trainable) for n, p in groups[g]}
