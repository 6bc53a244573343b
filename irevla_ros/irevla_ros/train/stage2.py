"""Stage 2 (supervised, D_e ∪ D_RL) as a self-contained job: run in-process, under torchrun, or on another host.

The trainer calls `Stage2Runner(launcher, nproc).run(parent, expert, rl, config, models)`; it builds a job folder,
runs it, loads the trained weights into a copy of the parent model and saves a new model-store version
(stage "stage2_sft", parent lineage, the episode ids of D_e and D_RL, metrics). The parent is never modified.

The job folder is `stage2_job`'s (its name is a digest of the parent, the run-defining settings and the data, so
running the same Stage 2 again finds the same folder and resumes from its checkpoints, or only loads the result);
the worker that trains it is `stage2_worker`, run as `python -m irevla_ros.train.stage2 --job DIR`.

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

import collections
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from irevla_ros.train import distributed
from irevla_ros.train.datasets import Transitions
from irevla_ros.train.sft import SFTConfig
from irevla_ros.train.stage2_job import (
    ADAPTER_FILE,
    LOG_FILE,
    OUT_DIR,
    REPORT_FILE,
    STAGE,
    ProgressCallback,
    Stage2Error,
    apply_adapter,
    build_job,
    read_job,
    read_result,
)
from irevla_ros.train.stage2_worker import PROGRESS_TAG, main, run_job
from irevla_ros.vla.model_store import ModelStore, VersionInfo

LOG_TAIL_LINES = 40


class Stage2JobError(RuntimeError):
    """The Stage 2 job failed; `log_tail` holds the last lines of its output."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(f"{message}\n--- log tail ---\n{log_tail}" if log_tail else message)
        self.log_tail = log_tail


class Stage2TimeoutError(Stage2JobError):
    """The Stage 2 job ran past the runner's timeout and was killed."""


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
