"""A Stage 2 job folder: everything a worker needs to train, on this host or another, and nothing it unpickles.

A job folder holds everything the worker needs and nothing it has to unpickle:

    <work_dir>/<parent>-<digest>/
        job.json            format, parent version id and manifest checksum, the SFTConfig, dataset file names
        parent/             the parent model as loaded from the store (a Stage 1 heads-only version on its base):
                            model.safetensors, config.json, tokenizer/, parent.json (checksums the worker verifies)
        expert.npz, rl.npz  D_e and D_RL as plain arrays (raw uint8 images, instructions as unicode arrays)
        checkpoints/        written every `checkpoint_every` steps by rank 0: a rerun of the job resumes there
        out/adapter.safetensors   the trained weights of the trainable set (rank 0, atomically)
        out/report.json     losses, samples/s, seconds, world size, adapter checksum; written last (= done)
        log.txt             the worker's output as the runner saw it

The folder's name is a digest of the parent, the run-defining settings and the data, so running the same Stage 2
again finds the same folder and resumes from its checkpoints (or, when out/report.json is there, only loads the
result). An hf backbone's base model is not copied: it must exist at the same hf_model_dir on the worker's host.

`build_job` writes one atomically (a temp folder made durable and renamed, `durable.publish_dir`); `read_job`,
`load_parent` and `read_result` read it back and verify every checksum; `apply_adapter` loads a finished job's
weights into a copy of the parent.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irevla_ros import durable
from irevla_ros.train.datasets import Transitions
from irevla_ros.train.sft import RUN_DEFINING_KEYS, SFTConfig, trainable_state
from irevla_ros.vla.config import VLAConfig, VLAConfigError
from irevla_ros.vla.integrity import sha256_file
from irevla_ros.vla.model import VLAModel, with_residual_defaults
from irevla_ros.vla.model_store import (
    CONFIG,
    TOKENIZER_DIR,
    WEIGHTS,
    InvalidVersionError,
    VersionInfo,
    check_tensors,
    stored_state_dict,
)

JOB_FORMAT = 1
JOB_FILE = "job.json"
PARENT_DIR = "parent"
PARENT_FILE = "parent.json"
EXPERT_FILE = "expert.npz"
RL_FILE = "rl.npz"
CHECKPOINTS_DIR = "checkpoints"
OUT_DIR = "out"
ADAPTER_FILE = "adapter.safetensors"
REPORT_FILE = "report.json"
LOG_FILE = "log.txt"
STAGE = "stage2_sft"

_ARRAYS = (
    "images",
    "proprio",
    "actions",
    "log_probs",
    "rewards",
    "dones",
    "instruction_ids",
    "episode_starts",
)

ProgressCallback = Callable[[int, int, float], None]  # (steps done, total steps, loss of the last step)


class Stage2Error(ValueError):
    """A Stage 2 input or job folder is wrong (bad launcher, bad data files, a parent that fails verification)."""


def save_transitions(path: str | Path, data: Transitions) -> None:
    """Transitions -> one .npz of plain arrays (uncompressed: images are written once and read once)."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(getattr(data, k)) for k in _ARRAYS}
    arrays["instructions"] = np.array(list(data.instructions), dtype=np.str_)
    arrays["episode_ids"] = np.array(list(data.episode_ids), dtype=np.str_)
    with durable.atomic_file(path) as f:
        np.savez(f, allow_pickle=False, **arrays)


def load_transitions_npz(path: str | Path) -> Transitions:
    """The inverse of save_transitions; never unpickles, refuses missing or malformed arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise Stage2Error(f"{path}: not a readable plain-array .npz ({exc})") from exc
    missing = sorted({*_ARRAYS, "instructions", "episode_ids"} - set(arrays))
    if missing:
        raise Stage2Error(f"{path}: missing arrays {missing}")
    images = arrays["images"]
    if images.dtype != np.uint8 or images.ndim != 5 or images.shape[-1] != 3:
        raise Stage2Error(
            f"{path}: images must be (N, cameras, H, W, 3) uint8, got {images.shape} {images.dtype}"
        )
    n = images.shape[0]
    for key in ("proprio", "actions", "log_probs", "rewards", "dones", "instruction_ids"):
        if arrays[key].shape[:1] != (n,):
            raise Stage2Error(f"{path}: {key} has {arrays[key].shape[:1]} rows, images have {n}")
    return Transitions(
        images=images,
        proprio=arrays["proprio"].astype(np.float32, copy=False),
        actions=arrays["actions"].astype(np.float32, copy=False),
        log_probs=arrays["log_probs"].astype(np.float32, copy=False),
        rewards=arrays["rewards"].astype(np.float32, copy=False),
        dones=arrays["dones"].astype(bool, copy=False),
        instruction_ids=arrays["instruction_ids"].astype(np.int32, copy=False),
        instructions=[str(s) for s in arrays["instructions"]],
        episode_ids=[str(s) for s in arrays["episode_ids"]],
        episode_starts=arrays["episode_starts"].astype(np.int64, copy=False),
    )


def _data_digest(data: Transitions | None) -> str:
    h = hashlib.sha256()
    if data is None:
        return "none"
    for key in _ARRAYS:
        a = np.ascontiguousarray(getattr(data, key))
        h.update(f"{key}{a.shape}{a.dtype}".encode())
        h.update(memoryview(a).cast("B"))
    h.update(json.dumps([list(data.instructions), list(data.episode_ids)]).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class JobSpec:
    path: Path
    parent: str
    parent_manifest_sha256: str
    config: SFTConfig
    has_rl: bool


def job_name(parent: VersionInfo, expert: Transitions, rl: Transitions | None, config: SFTConfig) -> str:
    """Same parent, same run-defining settings, same data -> same job folder (and its checkpoints)."""
    h = hashlib.sha256()
    h.update(json.dumps([JOB_FORMAT, parent.version_id, parent.manifest_sha256]).encode())
    h.update(json.dumps({k: getattr(config, k) for k in RUN_DEFINING_KEYS}, sort_keys=True).encode())
    h.update(_data_digest(expert).encode())
    h.update(_data_digest(rl if rl is not None and len(rl) else None).encode())
    return f"{parent.version_id}-{h.hexdigest()[:16]}"


def _write_parent(folder: Path, model: VLAModel, parent: VersionInfo) -> None:
    """The parent as the worker needs it: full weights (a Stage 1 heads-only version is materialised on its base),
    config, tokenizer, and parent.json with the checksum of each file."""
    from safetensors.torch import save_file

    # Written into the job's temp folder: publish_dir makes every file durable before the folder is renamed.
    folder.mkdir(parents=True)
    save_file(stored_state_dict(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(model.config.to_json() + "\n")
    model.tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))  # type: ignore[attr-defined]
    files = {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    record = {
        "version_id": parent.version_id,
        "manifest_sha256": parent.manifest_sha256,
        "files": files,
        "hf_base": parent.meta.get("hf_base"),
    }
    (folder / PARENT_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def build_job(
    work_dir: str | Path,
    parent: VersionInfo,
    model: VLAModel | Callable[[], VLAModel],
    expert: Transitions,
    rl: Transitions | None,
    config: SFTConfig,
) -> Path:
    """The job folder for this Stage 2 under `work_dir`, built atomically. An existing one (same parent, settings
    and data) is reused with its checkpoints; only its settings that do not define the run (threads, ...) are
    updated. `model` is the parent's model, or a function loading it (called only when the folder is new)."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    final = work / job_name(parent, expert, rl, config)
    has_rl = rl is not None and len(rl) > 0
    spec = {
        "format": JOB_FORMAT,
        "parent": parent.version_id,
        "parent_manifest_sha256": parent.manifest_sha256,
        "sft": config.to_dict(),
        "expert": EXPERT_FILE,
        "rl": RL_FILE if has_rl else None,
    }
    spec_bytes = (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode()
    if (final / JOB_FILE).is_file():
        durable.write_bytes(final / JOB_FILE, spec_bytes)
        return final
    with durable.building_dir(work) as tmp:
        _write_parent(tmp / PARENT_DIR, model if isinstance(model, VLAModel) else model(), parent)
        save_transitions(tmp / EXPERT_FILE, expert)
        if has_rl:
            save_transitions(tmp / RL_FILE, rl)  # type: ignore[arg-type]
        (tmp / JOB_FILE).write_bytes(spec_bytes)
        try:
            durable.publish_dir(tmp, final)
        except OSError:  # built concurrently by someone else: theirs is the same job
            if not (final / JOB_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_job(job_dir: str | Path) -> JobSpec:
    job = Path(job_dir)
    try:
        spec = json.loads((job / JOB_FILE).read_text())
    except FileNotFoundError as exc:
        raise Stage2Error(f"{job}: no {JOB_FILE} (not a Stage 2 job folder)") from exc
    except json.JSONDecodeError as exc:
        raise Stage2Error(f"{job / JOB_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(spec, dict) or spec.get("format") != JOB_FORMAT:
        raise Stage2Error(f"{job / JOB_FILE}: format {spec.get('format') if isinstance(spec, dict) else None!r}, "
                          f"this code reads {JOB_FORMAT}")  # fmt: skip
    try:
        return JobSpec(
            job, str(spec["parent"]), str(spec["parent_manifest_sha256"]), SFTConfig.from_dict(spec["sft"]),
            spec.get("rl") is not None,
        )  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise Stage2Error(f"{job / JOB_FILE}: missing or malformed field ({exc})") from exc


def load_parent(job_dir: str | Path, spec: JobSpec | None = None) -> VLAModel:
    """The parent model from the job folder, verified: parent.json against the job, every file against
    parent.json, tensors against the config's model (and an hf base model's files against their checksums)."""
    from safetensors.torch import load_file

    job = Path(job_dir)
    spec = spec or read_job(job)
    parent = job / PARENT_DIR
    try:
        record = json.loads((parent / PARENT_FILE).read_text())
        files = dict(record["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Stage2Error(f"{parent}: cannot read {PARENT_FILE} ({exc})") from exc
    if (
        record.get("version_id") != spec.parent
        or record.get("manifest_sha256") != spec.parent_manifest_sha256
    ):
        raise Stage2Error(f"{parent}: {PARENT_FILE} names another parent than {JOB_FILE} ({spec.parent})")
    present = sorted(p.relative_to(parent).as_posix() for p in parent.rglob("*") if p.is_file())
    for name in sorted(set(present) - {PARENT_FILE} - set(files)):
        raise Stage2Error(f"{parent}: file {name} is not listed in {PARENT_FILE}")
    for name, entry in sorted(files.items()):
        file = parent / name
        if not file.is_file():
            raise Stage2Error(f"{parent}: file {name} is missing")
        if file.stat().st_size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
            raise Stage2Error(f"{parent}: checksum mismatch for {name}")
    hf_base = record.get("hf_base") or {}
    for name, expected in (hf_base.get("files") or {}).items():
        file = Path(hf_base["dir"]) / name
        if not file.is_file() or sha256_file(file) != expected:
            raise Stage2Error(f"hf base model file {file} is missing or changed on this host")
    try:
        config = VLAConfig.from_json((parent / CONFIG).read_text())
    except VLAConfigError as exc:
        raise Stage2Error(f"{parent / CONFIG}: {exc}") from exc
    tensors = load_file(str(parent / WEIGHTS))
    model = VLAModel(config, load_pretrained=False, tokenizer_dir=parent / TOKENIZER_DIR)
    tensors = with_residual_defaults(tensors, model)
    try:
        check_tensors(tensors, model, spec.parent)
    except InvalidVersionError as exc:
        raise Stage2Error(str(exc)) from exc
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def write_result(job: Path, model: VLAModel, report: Mapping[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    out = job / OUT_DIR
    out.mkdir(exist_ok=True)
    with durable.atomic_path(out / ADAPTER_FILE) as tmp:
        save_file(
            trainable_state(model, str(report["config"]["trainable"])), str(tmp), metadata={"format": "pt"}
        )
    full = {
        **report,
        "format": JOB_FORMAT,
        "job": job.name,
        "adapter": {
            "file": ADAPTER_FILE,
            "sha256": sha256_file(out / ADAPTER_FILE),
            "bytes": (out / ADAPTER_FILE).stat().st_size,
        },
        "host": socket.gethostname(),
        "torch": torch.__version__,
    }
    # The report is written last: its presence means the adapter next to it is complete.
    durable.write_json(out / REPORT_FILE, full, indent=2, allow_nan=False)
    return full


def read_result(job_dir: str | Path) -> dict[str, Any] | None:
    """The finished job's report (adapter checksum verified), or None when the job has not finished."""
    out = Path(job_dir) / OUT_DIR
    if not (out / REPORT_FILE).is_file():
        return None
    try:
        report = json.loads((out / REPORT_FILE).read_text())
        entry = report["adapter"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Stage2Error(f"{out / REPORT_FILE}: malformed ({exc})") from exc
    adapter = out / ADAPTER_FILE
    if not adapter.is_file() or sha256_file(adapter) != entry.get("sha256"):
        raise Stage2Error(f"{adapter}: missing or does not match {REPORT_FILE} (incomplete transfer?)")
    return report


def apply_adapter(model: VLAModel, path: str | Path, trainable: str = "lora_and_action_head") -> None:
    """Load a job's trained weights into `model` (a copy of the parent): names and shapes must be those of the
    trainable set, values finite."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    expected = trainable_state(model, trainable)
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        raise Stage2Error(
            f"{path}: not the {trainable} set of this model: unexpected {unexpected[:5]}, missing {missing[:5]}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise Stage2Error(
                f"{path}: wrong shape for {name}: {tuple(tensor.shape)} vs {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise Stage2Error(f"{path}: non-finite values in {name}")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise Stage2Error(f"{path}: unexpected keys {result.unexpected_keys[:5]}")
    # The job trained with the residual reset (sft.supervised_parameters): its action head learned from D_RL what
    # a Stage 1 residual did, so the new version carries none.
    model.action_residual.reset()
