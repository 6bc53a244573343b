"""Export stored episodes to a LeRobotDataset v3 and import one as expert demonstrations (D_e).

ROS-free. Episodes are read and written only through `EpisodeStore`; the dataset files (parquet, meta/info.json,
stats, tasks) are written and read by the `lerobot` package's own `LeRobotDataset`, always local (`root=`), with
the Hugging Face hub offline.

Images are stored as lossless PNG frames (LeRobot feature dtype "image"), not video: encoding works here (PyAV
15.1 has libsvtav1), but `LeRobotDataset` decodes video through torchcodec (needs system FFmpeg libraries and a
build matching torch) or torchvision's VideoReader, and neither runs with the CPU torch 2.13 of this venv.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import AssembledEpisode, EpisodeMeta, StepData

PIP_INSTALL = (
    "pip install --no-deps lerobot==0.4.4 && pip install datasets==5.2.0 av==15.1.0 jsonlines==4.0.0 pandas pyarrow"
    " && pip install --no-deps --target $VIRTUAL_ENV/extras/lerobot torchvision==0.28.0  (scripts/setup.sh does this)"
)
INTERVENTION = "observation.intervention"


class LeRobotUnavailableError(RuntimeError):
    """The optional lerobot dataset code is not installed."""


class LeRobotInteropError(ValueError):
    """A dataset or selection that cannot be exported or imported, with what was wrong."""


def _lerobot_dataset_class() -> Any:
    # Everything stays local: nothing may reach the hub, at import time or after.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # torchvision is kept out of the venv's site-packages (scripts/setup.sh: in the venv it breaks transformers'
    # imports for every other process); only this code path sees it.
    extras = Path(sys.prefix) / "extras" / "lerobot"
    if extras.is_dir() and str(extras) not in sys.path:
        sys.path.append(str(extras))
    try:
        import torch

        # PyPI's torchvision is linked against the CUDA torch; with the CPU torch its _C does not load and
        # torchvision 0.28 then fails at import on an unconditional register_fake("torchvision::nms").
        # Defining the two schemas (no kernels) lets its pure-Python part (transforms) import; LeRobot's
        # image path needs nothing else from it.
        if not hasattr(torch.ops, "torchvision") or not hasattr(torch.ops.torchvision, "nms"):
            try:
                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
                _KEEP.append(lib)
            except RuntimeError:
                pass  # already defined by a working torchvision
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError as exc:
        raise LeRobotUnavailableError(
            f"LeRobotDataset support needs the lerobot dataset code ({exc}); install it with: {PIP_INSTALL}"
        ) from exc
    return LeRobotDataset


_KEEP: list[Any] = []


@dataclass
class ExportResult:
    out: Path
    episodes: int
    frames: int
    fps: int


def _fps(steps: list[StepData], where: str) -> int:
    if len(steps) < 2:
        raise LeRobotInteropError(f"{where}: needs at least 2 steps to know the control period")
    period_s = float(np.median(np.diff([s.stamp_ns for s in steps]))) / 1e9
    fps = round(1.0 / period_s)
    if fps <= 0 or abs(1.0 / fps - period_s) > 1e-4:
        raise LeRobotInteropError(
            f"{where}: control period {period_s} s is not 1/integer fps (LeRobot's fps)"
        )
    return fps


def export_lerobot(
    store: EpisodeStore,
    out: Path | str,
    *,
    repo_id: str = "irevla/episodes",
    source: str | None = None,
    outcome: str | None = None,
    task: str | None = None,
    version: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Write the trainable episodes matching the filters to a new LeRobotDataset v3 at `out`."""
    LeRobotDataset = _lerobot_dataset_class()
    out = Path(out)
    if out.exists():
        raise LeRobotInteropError(f"{out} exists; LeRobot writes a new dataset into a new folder")
    rows = store.trainable(source=source, outcome=outcome, task=task, policy_version=version)
    if not rows:
        raise LeRobotInteropError(
            f"no trainable episode matches source={source} outcome={outcome} task={task} version={version}"
        )
    records = [store.read(r.episode_id) for r in rows]
    first = records[0].steps
    fps = _fps(first, f"episode {records[0].meta.episode_id}")
    cameras = sorted(first[0].images)
    features: dict[str, dict[str, Any]] = {
        f"observation.images.{c}": {
            "dtype": "image",
            "shape": first[0].images[c].shape,
            "names": ["height", "width", "channels"],
        }
        for c in cameras
    }
    state_names = list(first[0].proprioception_names) or [
        f"q{i}" for i in range(len(first[0].proprioception))
    ]
    features["observation.state"] = {"dtype": "float32", "shape": (len(state_names),), "names": state_names}
    features["action"] = {"dtype": "float32", "shape": (len(first[0].action),), "names": None}
    features["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}
    features["next.done"] = {"dtype": "bool", "shape": (1,), "names": None}
    features[INTERVENTION] = {"dtype": "bool", "shape": (1,), "names": None}
    dataset = LeRobotDataset.create(repo_id, fps, features, root=out, use_videos=False)
    frames = 0
    try:
        for n, record in enumerate(records):
            where = f"episode {record.meta.episode_id}"
            if _fps(record.steps, where) != fps or sorted(record.steps[0].images) != cameras:
                raise LeRobotInteropError(f"{where}: fps or cameras differ from the first exported episode")
            last = len(record.steps) - 1
            for i, step in enumerate(record.steps):
                frame: dict[str, Any] = {f"observation.images.{c}": step.images[c] for c in cameras}
                frame["observation.state"] = np.asarray(step.proprioception, np.float32)
                frame["action"] = np.asarray(step.action, np.float32)
                # LeRobot's convention: the reward/success of the transition this frame starts, on the last.
                frame["next.done"] = np.array([i == last])
                frame["next.success"] = np.array([i == last and record.meta.outcome == "success"])
                frame[INTERVENTION] = np.array([bool(step.intervention)])
                frame["task"] = step.instruction or record.meta.instruction
                dataset.add_frame(frame)
            dataset.save_episode()
            frames += len(record.steps)
            if progress:
                progress(
                    f"exported {n + 1}/{len(records)}: {record.meta.episode_id} ({len(record.steps)} steps)"
                )
    finally:
        dataset.finalize()
    return ExportResult(out, len(records), frames, fps)


@dataclass
class ImportResult:
    episode_ids: list[str]
    frames: int


def _scalar(value: Any) -> Any:
    array = np.asarray(value)
    return array.reshape(-1)[0].item() if array.size else None


def import_lerobot(
    dataset_root: Path | str,
    store: EpisodeStore,
    *,
    repo_id: str = "irevla/episodes",
    task: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ImportResult:
    """Store every episode of a local LeRobotDataset as an expert demonstration (source 'expert', D_e).

    Lineage: each episode id is `lerobot-<dataset folder>-<episode index>` and its policy_version
    `lerobot:<repo_id>#<episode index>` (the catalogue has no free metadata field).
    """
    LeRobotDataset = _lerobot_dataset_class()
    root = Path(dataset_root)
    if not (root / "meta" / "info.json").exists():
        raise LeRobotInteropError(f"{root} is not a LeRobotDataset (no meta/info.json)")
    dataset = LeRobotDataset(repo_id, root=root)
    cameras = [k.removeprefix("observation.images.") for k in dataset.meta.camera_keys]
    names = dataset.meta.features["observation.state"].get("names") or []
    period_ns = round(1e9 / dataset.meta.fps)
    stem = "".join(ch if ch.isalnum() else "_" for ch in root.name)
    ids: list[str] = []
    frames = 0
    by_episode: dict[int, list[int]] = {}
    for idx in range(len(dataset.hf_dataset)):
        by_episode.setdefault(int(_scalar(dataset.hf_dataset[idx]["episode_index"])), []).append(idx)
    for ep_index, indices in sorted(by_episode.items()):
        episode_id = f"lerobot-{stem}-{ep_index:06d}"
        steps: list[StepData] = []
        success = False
        instruction = ""
        for i, idx in enumerate(indices):
            item = dataset[idx]
            instruction = str(item["task"])
            stamp = i * period_ns
            images = {
                c: (item[f"observation.images.{c}"].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
                for c in cameras
            }
            intervention = bool(_scalar(item[INTERVENTION])) if INTERVENTION in item else False
            success = success or bool(_scalar(item.get("next.success", False)))
            steps.append(
                StepData(
                    episode_id=episode_id,
                    step_index=i,
                    stamp_ns=stamp,
                    images=images,
                    image_stamps_ns=dict.fromkeys(cameras, stamp),
                    proprioception=item["observation.state"].numpy().astype(np.float32),
                    proprioception_names=list(names),
                    instruction=instruction,
                    action=item["action"].numpy().astype(np.float32),
                    log_prob=None,
                    value=None,
                    policy_version=f"lerobot:{repo_id}#{ep_index}",
                    intervention=intervention,
                    hold=False,
                )
            )
        meta = EpisodeMeta(
            episode_id=episode_id,
            task=task or instruction,
            instruction=instruction,
            policy_version=f"lerobot:{repo_id}#{ep_index}",
            source="expert",
            started_ns=0,
            ended_ns=(len(steps) - 1) * period_ns,
            outcome="success" if success else "unknown",
            label_source="none",
            expected_steps=len(steps),
        )
        store.write(AssembledEpisode(meta=meta, steps=steps, complete=True))
        ids.append(episode_id)
        frames += len(steps)
        if progress:
            progress(f"imported episode {ep_index} as {episode_id} ({len(steps)} steps)")
    return ImportResult(ids, frames)


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
