"""Stage 0: the first VLA version, supervised on the stored demonstrations (D_e), and its verb `irevla
train-stage0`.

On a robot, demonstrations come from teleoperation (a session of source `expert` with the scripted expert
following `/teleop/command`) and operator takeovers; in simulation from Meta-World's scripted expert. Either way
they are in the episode store, and this trains version 1 of the model store from them, which the policy node
loads (`policy: vla`) and the trainer iterates on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irevla_ros.train.config import DEVICES, SFTConfig
from irevla_ros.vla.config import VLAConfig

if TYPE_CHECKING:  # torch and the store load when Stage 0 runs, not when `irevla` parses its verbs
    from irevla_ros.store.episode_store import EpisodeStore
    from irevla_ros.vla.model_store import VersionInfo

# On a 2-core CPU the first version trains LoRA in the text encoder, the new fusion layers, the token learner and
# the action head; LoRA inside the image encoder (the compact default) needs backpropagation through it, several
# times slower. On a GPU the VLAConfig defaults (LoRA in both encoders) are used.
CPU_LORA_TARGETS = ("query", "value")


class Stage0Error(ValueError):
    """Stage 0 cannot run on what it was given (no demonstrations, unknown cameras, a model store in use)."""


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def recorded_cameras(store: EpisodeStore) -> tuple[str, ...]:
    """The cameras of the first stored demonstration, in the order they were recorded."""
    rows = store.trainable(source="expert", outcome="success")
    if not rows:
        raise Stage0Error(
            f"the episode store {store.root} has no successful demonstration (source expert, outcome success): "
            "record some first (a session with /policy.policy=scripted_expert and /episode_manager.source=expert, "
            "driven by the gamepad, each labelled `irevla label success`; README 'A real cell, step by step')"
        )
    for row in rows:
        for step in store.read(row.episode_id).steps:
            if step.images:  # a held step (no fresh frame, deadman released) may have none
                return tuple(step.images)
    raise Stage0Error(f"no demonstration step in {store.root} has camera images: nothing to train on")


def train_first_version(
    store_path: Path,
    models_path: Path,
    cameras: Sequence[str] = (),
    *,
    steps: int = 150,
    batch_size: int = 16,
    device: str = "auto",
    vla: VLAConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
    checkpoint_dir: Path | None = None,
) -> VersionInfo:
    """Stage 0: supervised learning (MSE; LoRA + new layers + action head) on D_e of the store -> a root version
    in the model store. `cameras` empty: those of the stored demonstrations. `vla` overrides the model's config
    (its cameras are set from `cameras`)."""
    from irevla_ros.store.episode_store import EpisodeStore
    from irevla_ros.train.datasets import expert_set
    from irevla_ros.train.sft import train_supervised
    from irevla_ros.vla.model import VLAModel
    from irevla_ros.vla.model_store import ModelStore

    store_path, models_path = Path(store_path), Path(models_path)
    if not store_path.is_dir():
        raise Stage0Error(f"no episode store at {store_path}")
    device = resolve_device(device)
    with EpisodeStore(store_path, read_only=True) as store:
        cameras = tuple(cameras) or recorded_cameras(store)
        data = expert_set(store, cameras, cache_dir=store_path.parent / "dataset-cache")
    if not len(data):
        raise Stage0Error(f"the episode store {store_path} has no demonstration steps (D_e is empty)")
    base = vla or VLAConfig(lora_targets=CPU_LORA_TARGETS if device == "cpu" else None)
    model = VLAModel(VLAConfig.from_dict({**base.to_dict(), "cameras": list(cameras)}))
    config = SFTConfig(steps=steps, batch_size=batch_size, device=device)
    report = train_supervised(
        model, data, config=config, progress=False, on_step=on_step, checkpoint_dir=checkpoint_dir
    )
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


# ---- the verb --------------------------------------------------------------------------------------------------


def add_verbs(sub: Any, verbs: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    p = sub.add_parser(
        "train-stage0",
        help="train the first VLA version (Stage 0) on the stored demonstrations",
        description="Stage 0 of iRe-VLA: supervised learning on the demonstrations of an episode store (teleoperated "
        "or scripted expert episodes labelled success, and operator takeovers) -> the first version of a model "
        "store, which the policy node (policy: vla) runs and the trainer iterates on. Resumes from its checkpoint "
        "after an interruption.",
    )
    p.add_argument("--store", required=True, help="episode store folder (the trainer's store_path)")
    p.add_argument(
        "--models", required=True, help="model store folder (the policy's and trainer's model_store)"
    )
    p.add_argument(
        "--cameras", default="", help="cameras, comma-separated (default: those of the demonstrations)"
    )
    p.add_argument("--steps", type=int, default=SFTConfig.steps, help="gradient steps (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=int, default=SFTConfig.batch_size, help="batch size (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: cuda when torch sees a GPU")
    p.add_argument(
        "--hf-model-dir",
        default="",
        help="a local transformers VLM (save_pretrained layout) as the backbone instead of the compact one",
    )
    p.add_argument(
        "--force", action="store_true", help="add another first version to a model store that has versions"
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    verbs["train-stage0"] = cmd_train_stage0


def cmd_train_stage0(args: argparse.Namespace) -> int:
    from irevla_ros.vla.model_store import ModelStore

    models = Path(args.models).expanduser().resolve()
    store = Path(args.store).expanduser().resolve()
    if not store.is_dir():
        print(f"irevla train-stage0: no episode store at {store}", file=sys.stderr)
        return 1
    existing = ModelStore(models).latest() if models.is_dir() else None
    if existing is not None and not args.force:
        print(
            f"irevla train-stage0: the model store {models} already has versions (newest {existing.version_id}); "
            "the trainer iterates from there. Use --force to add another first version, or another --models.",
            file=sys.stderr,
        )
        return 3
    vla = None
    if args.hf_model_dir:
        vla = VLAConfig(backbone="hf", hf_model_dir=str(Path(args.hf_model_dir).expanduser().resolve()))
    checkpoints = models.parent / f".{models.name}-stage0-checkpoints"
    started = time.monotonic()

    def on_step(step: int, loss: float) -> None:
        done = step + 1
        if done == args.steps or done % max(1, args.steps // 50) == 0:
            elapsed = time.monotonic() - started
            eta = elapsed / done * (args.steps - done)
            print(
                f"[stage0 {100 * done / args.steps:3.0f}%] step {done}/{args.steps} loss {loss:.4f} "
                f"({elapsed:.0f} s, about {eta:.0f} s left)",
                file=sys.stderr,
                flush=True,
            )

    cameras = tuple(c for c in args.cameras.split(",") if c)
    print(f"[stage0] demonstrations from {store} -> {models}", file=sys.stderr, flush=True)
    try:
        info = train_first_version(
            store,
            models,
            cameras,
            steps=args.steps,
            batch_size=args.batch_size,
            device=args.device,
            vla=vla,
            on_step=on_step,
            checkpoint_dir=checkpoints,
        )
    except (
        ValueError
    ) as exc:  # no demonstrations, bad settings, a checkpoint of other data: named in the message
        print(f"irevla train-stage0: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"irevla train-stage0: interrupted; the next run resumes from {checkpoints}", file=sys.stderr)
        return 130
    shutil.rmtree(checkpoints, ignore_errors=True)
    result = {
        "version": info.version_id,
        "path": str(info.path),
        "cameras": list(ModelStore(models).read_config(info.version_id).cameras),
        "samples": info.data.get("samples") if isinstance(info.data, dict) else None,
        "final_loss": info.metrics.get("final_loss"),
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(
            f"{info.version_id}: Stage 0 on {result['samples']} demonstration steps, final loss "
            f"{result['final_loss']:.4f}, cameras {', '.join(result['cameras'])}, in {result['seconds']} s\n"
            f"next: run the graph with /policy.policy=vla and model_store {models} (the robot profiles' default "
            "policy); the trainer starts iterating from this version.",
            flush=True,
        )
    return 0
