"""The Stage 2 worker: one rank trains a job folder (resuming from its checkpoints) and rank 0 writes `out/`.

    python -m irevla_ros.train.stage2 --job DIR            # one process
    torchrun --standalone --nproc-per-node N -m irevla_ros.train.stage2 --job DIR

Progress goes to stdout as `IREVLA_STAGE2_PROGRESS {"step": .., "steps": .., "loss": ..}` lines, which the
runner turns into callbacks (also through ssh from another host).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from irevla_ros.train import distributed
from irevla_ros.train.sft import train_supervised
from irevla_ros.train.stage2_job import (
    CHECKPOINTS_DIR,
    EXPERT_FILE,
    RL_FILE,
    ProgressCallback,
    load_parent,
    load_transitions_npz,
    read_job,
    read_result,
    write_result,
)

PROGRESS_TAG = "IREVLA_STAGE2_PROGRESS"


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
            report = write_result(job, model, report)
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
        "--job", type=Path, required=True, help="the job folder (see irevla_ros.train.stage2_job)"
    )
    parser.add_argument("--progress-every", type=int, default=1, help="print a progress line every N steps")
    args = parser.parse_args(argv)
    report = run_job(args.job, progress=_print_progress(max(1, args.progress_every)))
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"stage 2 job {args.job.name}: final loss {report['final_loss']:.5f}, {report.get('seconds', 0):.1f} s"
        )
    return 0
