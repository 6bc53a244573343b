"""Stage 2 (supervised, D_e ∪ D_RL) as a self-contained job: run in-process, under torchrun, or on another host.

The trainer calls `Stage2Runner(launcher, nproc).run(parent, expert, rl, config, models)`; it builds a job folder,
runs it, loads the trained weights into a copy of the parent model and saves a new model-store version
(stage "stage2_sft", parent lineage, the episode ids of D_e and D_RL, metrics). The parent is never modified.

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

Launchers:
- "local": in this process, one rank (no timeout: the caller's thread does the work).
- "torchrun": `torchrun --standalone --nproc-per-node N -m irevla_ros.train.stage2 --job DIR` on this host
  (DDP; gloo on CPU, nccl on GPU). `python -m torch.distributed.run` when the venv has no torchrun script.
- any other string: a shell command template, e.g. for a GPU server

      rsync -a {job}/ gpu-host:/srv/jobs/{job_name}/ &&
      ssh gpu-host 'cd /srv/irevla && . .venv/bin/activate &&
          torchrun --standalone --nproc-per-node {nproc} -m irevla_ros.train.stage2 --job /srv/jobs/{job_name}' &&
      rsync -a gpu-host:/srv/jobs/{job_name}/ {job}/

  `{job}` is the local job folder (shell-quoted), `{job_name}` its name, `{nproc}` the runner's nproc. Shipping
  the folder and bringing back at least `out/` (with `checkpoints/`, a later run can resume on another host) is
  the template's business; the worker's stdout (through ssh) carries the progress lines. The runner waits for the
  command, kills its process group on timeout, and reads `out/` after it exits 0.

A failed or timed-out job raises Stage2JobError with the tail of its log.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irevla_ros import durable
from irevla_ros.train import distributed
from irevla_ros.train.datasets import Transitions
from irevla_ros.train.sft import RUN_DEFINING_KEYS, SFTConfig, train_supervised, trainable_state
from irevla_ros.vla.config import VLAConfig, VLAConfigError
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import (
    CONFIG,
    TOKENIZER_DIR,
    WEIGHTS,
    InvalidVersionError,
    ModelStore,
    VersionInfo,
    check_tensors,
    sha256_file,
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
PROGRESS_TAG = "IREVLA_STAGE2_PROGRESS"
LOG_TAIL_LINES = 40

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


class Stage2JobError(RuntimeError):
    """The Stage 2 job failed; `log_tail` holds the last lines of its output."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}\n--- log tail ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


class Stage2TimeoutError(Stage2JobError):
    """The Stage 2 job ran past the runner's timeout and was killed."""


# ---------------------------------------------------------------- files


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


# ---------------------------------------------------------------- the job folder


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
    try:
        check_tensors(tensors, model, spec.parent)
    except InvalidVersionError as exc:
        raise Stage2Error(str(exc)) from exc
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def _write_result(job: Path, model: VLAModel, report: Mapping[str, Any]) -> dict[str, Any]:
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


def run_job(
    job_dir: str | Path,
    *,
    progress: ProgressCallback | None = None,
    dist: distributed.DistContext | None = None,
) -> dict[str, Any]:
    """The worker: train the job (resuming from its checkpoints), write out/ on rank 0; returns the report.
    Under torchrun it joins the process group from the environment."""
    job = Path(job_dir)
    spec = read_job(job)
    done = read_result(job)
    if done is not None:
        return done
    ctx = dist or distributed.init_from_env(spec.config.device)
    try:
        model = load_parent(job, spec)
        expert = load_transitions_npz(job / EXPERT_FILE)
        rl = load_transitions_npz(job / RL_FILE) if spec.has_rl else None

        def on_step(step: int, loss: float) -> None:
            if progress is not None and ctx.is_main:
                progress(step + 1, spec.config.steps, loss)

        report = train_supervised(
            model, expert, rl, spec.config, progress=False, on_step=on_step,
            checkpoint_dir=job / CHECKPOINTS_DIR, dist=ctx,
        )  # fmt: skip
        report = {**report, "parent": spec.parent, "backend": ctx.backend, "device": str(ctx.device)}
        if ctx.is_main:
            report = _write_result(job, model, report)
        distributed.barrier(ctx)
        return report
    finally:
        if dist is None:
            distributed.shutdown(ctx)


def _print_progress(every: int) -> ProgressCallback:
    def emit(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            print(f"{PROGRESS_TAG} " + json.dumps({"step": step, "steps": total, "loss": loss}), flush=True)

    return emit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Stage 2 worker: train a job folder (one rank of torchrun).")
    parser.add_argument(
        "--job", type=Path, required=True, help="the job folder (see irevla_ros.train.stage2)"
    )
    parser.add_argument("--progress-every", type=int, default=1, help="print a progress line every N steps")
    args = parser.parse_args(argv)
    report = run_job(args.job, progress=_print_progress(max(1, args.progress_every)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"stage 2 job {args.job.name}: final loss {report['final_loss']:.5f}, {report.get('seconds', 0):.1f} s"
        )
    return 0


# ---------------------------------------------------------------- the runner


class Stage2Runner:
    """Runs Stage 2 jobs with one launcher (see the module docstring) and saves their result as a version."""

    def __init__(
        self,
        launcher: str = "local",
        nproc: int = 1,
        *,
        work_dir: str | Path | None = None,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        progress_every: int = 1,
        export_onnx: bool | None = None,
    ) -> None:
        if not isinstance(launcher, str) or not launcher.strip():
            raise Stage2Error("launcher must be 'local', 'torchrun' or a command template containing {job}")
        if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
            raise Stage2Error(f"nproc must be a positive integer, got {nproc!r}")
        if launcher == "local" and nproc != 1:
            raise Stage2Error(
                "the 'local' launcher runs one process in-process; use 'torchrun' for nproc > 1"
            )
        if launcher not in ("local", "torchrun") and "{job}" not in launcher:
            raise Stage2Error(f"launcher template {launcher!r} has no {{job}} placeholder")
        if timeout_s is not None and not timeout_s > 0:
            raise Stage2Error(f"timeout_s must be > 0, got {timeout_s!r}")
        self.launcher = launcher
        self.nproc = nproc
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.timeout_s = timeout_s
        self.env = dict(env or {})
        self.progress_every = progress_every
        self.export_onnx = export_onnx  # passed to ModelStore.save (None: its default)

    def command(self, job: Path) -> list[str] | str:
        """The command that runs `job` (a list for torchrun, a shell string for a template)."""
        worker = [
            "-m",
            "irevla_ros.train.stage2",
            "--job",
            str(job),
            "--progress-every",
            str(self.progress_every),
        ]
        if self.launcher == "torchrun":
            return [
                *distributed.torchrun_command(),
                "--standalone",
                "--nproc-per-node",
                str(self.nproc),
                *worker,
            ]
        if self.launcher == "local":
            return [sys.executable, *worker]
        return (
            self.launcher.replace("{job}", shlex.quote(str(job.resolve())))
            .replace("{job_name}", job.name)
            .replace("{nproc}", str(self.nproc))
        )

    def _parent(self, parent: VersionInfo | str | Path, models: ModelStore) -> VersionInfo:
        if isinstance(parent, VersionInfo):
            parent = parent.path
        if isinstance(parent, Path):
            if parent.resolve().parent != models.root.resolve():
                raise Stage2Error(f"parent {parent} is not a version of the model store {models.root}")
            parent = parent.name
        return models.get(str(parent))

    def job_for(
        self,
        parent: VersionInfo | str | Path,
        expert: Transitions,
        rl: Transitions | None,
        config: SFTConfig,
        models: ModelStore,
        *,
        job_dir: str | Path | None = None,
    ) -> Path:
        """Build (or find) the job folder of this Stage 2 under `job_dir` without running it."""
        if not isinstance(config, SFTConfig):
            raise Stage2Error(f"config must be an SFTConfig, got {type(config).__name__}")
        info = self._parent(parent, models)
        n_cam = models.read_config(info.version_id).n_cameras
        for name, data in (("expert", expert), ("rl", rl)):
            if data is not None and len(data) and data.images.shape[1:2] != (n_cam,):
                raise Stage2Error(
                    f"{name} data has {data.images.shape[1]} cameras, {info.version_id} takes {n_cam}"
                )
        if config.batch_size < self.nproc:
            raise Stage2Error(f"batch_size {config.batch_size} is smaller than nproc {self.nproc}")
        work = Path(job_dir) if job_dir is not None else self.work_dir or models.root.parent / "stage2_jobs"
        return build_job(work, info, lambda: models.load(info.version_id)[0], expert, rl, config)

    def run(
        self,
        parent: VersionInfo | str | Path,
        expert: Transitions,
        rl: Transitions | None,
        config: SFTConfig,
        models: ModelStore,
        progress: ProgressCallback | None = None,
        *,
        job_dir: str | Path | None = None,
    ) -> VersionInfo:
        """Stage 2 from `parent` -> the new version (stage "stage2_sft").

        `job_dir`: the folder the job folders go in, one per distinct job (default: the runner's work_dir, else
        <model store>/../stage2_jobs); running the same job again resumes it. `progress(step, steps, loss)` is
        called as the job reports; an exception it raises stops the job (its process group is killed) and is
        re-raised here unchanged, so a caller can cancel."""
        job = self.job_for(parent, expert, rl, config, models, job_dir=job_dir)
        spec = read_job(job)
        started = time.monotonic()
        try:
            report = read_result(job)
        except (
            Stage2Error
        ) as exc:  # e.g. a transfer cut short: run it again (it resumes from its checkpoints)
            with open(job / LOG_FILE, "a") as log:
                log.write(f"previous result unusable, running again: {exc}\n")
            report = None
        if report is None:
            if self.launcher == "local":
                self._run_local(job, progress)
            else:
                self._run_subprocess(job, progress)
            report = read_result(job)
            if report is None:
                raise Stage2JobError(
                    f"stage 2 job {job} exited 0 but left no {OUT_DIR}/{REPORT_FILE} (a remote template must bring "
                    f"{OUT_DIR}/ back into {{job}})",
                    _tail(job / LOG_FILE),
                )
        for version in reversed(models.versions()):  # saved already (a crash after saving): not a second one
            data = version.data if isinstance(version.data, dict) else {}
            if version.stage == STAGE and data.get("job_dir") == str(job.resolve()):
                return version
        model, _, _ = models.load(spec.parent)
        apply_adapter(model, job / OUT_DIR / ADAPTER_FILE, spec.config.trainable)
        rl_ids = list(rl.episode_ids) if rl is not None and len(rl) else []
        return models.save(
            model,
            parent=spec.parent,
            stage=STAGE,
            data={
                "expert_episodes": list(expert.episode_ids),
                "rl_episodes": rl_ids,
                "samples": {"expert": len(expert), "rl": len(rl) if rl is not None else 0},
                "job": job.name,
                "job_dir": str(job.resolve()),
            },
            metrics={
                "first_loss": report["first_loss"],
                "final_loss": report["final_loss"],
                "train_seconds": report["seconds"],
                "wall_seconds": time.monotonic() - started,
                "samples_per_s": report["samples_per_s"],
                "world_size": report["world_size"],
                "steps": spec.config.steps,
                "resumed_from": report["resumed_from"],
                "trainable": spec.config.trainable,
                "launcher": self.launcher if self.launcher in ("local", "torchrun") else "template",
            },
            export_onnx=self.export_onnx,
        )

    def _run_local(self, job: Path, progress: ProgressCallback | None) -> None:
        raised: list[BaseException] = []

        def relay(step: int, total: int, loss: float) -> None:
            if progress is not None:
                try:
                    progress(step, total, loss)
                except BaseException as exc:
                    raised.append(exc)
                    raise

        try:
            run_job(job, progress=relay, dist=distributed.local_context(read_job(job).config.device))
        except Exception as exc:
            if raised and exc is raised[0]:
                raise  # the caller's own callback (e.g. a cancellation): not a job failure
            text = traceback.format_exc()
            with open(job / LOG_FILE, "a") as log:
                log.write(text)
            raise Stage2JobError(f"stage 2 job {job} failed in-process: {exc}", _last_lines(text)) from exc

    def _run_subprocess(self, job: Path, progress: ProgressCallback | None) -> None:
        cmd = self.command(job)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        raised: list[BaseException] = []
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        with open(job / LOG_FILE, "ab") as log:
            log.write(f"$ {cmd if isinstance(cmd, str) else shlex.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd, shell=isinstance(cmd, str), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: a timeout kills torchrun and every rank
            )  # fmt: skip
            reader = threading.Thread(
                target=_read_output, args=(proc, log, tail, progress, raised), daemon=True
            )
            reader.start()
            try:
                while True:
                    try:
                        rc = proc.wait(timeout=0.2)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if raised:
                        raise raised[0]
                    if deadline is not None and time.monotonic() > deadline:
                        _kill_group(proc)
                        reader.join(timeout=5.0)
                        raise Stage2TimeoutError(
                            f"stage 2 job {job} ran past {self.timeout_s} s and was killed", "\n".join(tail)
                        )
            except BaseException:
                _kill_group(proc)
                raise
            reader.join(timeout=10.0)
        if raised:
            raise raised[0]
        if rc != 0:
            raise Stage2JobError(f"stage 2 job {job} failed (exit status {rc})", "\n".join(tail))


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


def _read_output(
    proc: subprocess.Popen[bytes],
    log: Any,
    tail: collections.deque[str],
    progress: ProgressCallback | None,
    raised: list[BaseException],
) -> None:
    """Copy the job's output to its log, keep the tail, turn progress lines into callbacks; an exception of the
    callback is handed to the waiting thread (which kills the job and re-raises it)."""
    assert proc.stdout is not None
    for raw in proc.stdout:
        log.write(raw)
        log.flush()
        line = raw.decode(errors="replace").rstrip()
        at = line.find(PROGRESS_TAG)
        if at < 0:
            tail.append(line)
            continue
        if progress is None or raised:
            continue
        try:
            item = json.loads(line[at + len(PROGRESS_TAG) :])
            step, total, loss = int(item["step"]), int(item["steps"]), float(item["loss"])
        except (ValueError, KeyError, TypeError):
            tail.append(line)  # a garbled progress line is still output worth seeing
            continue
        try:
            progress(step, total, loss)
        except BaseException as exc:
            raised.append(exc)


def _kill_group(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM the job's process group (torchrun forwards it to its ranks), SIGKILL what is left after grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _last_lines(text: str, n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _tail(path: Path) -> str:
    try:
        return _last_lines(path.read_text(errors="replace"))
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
