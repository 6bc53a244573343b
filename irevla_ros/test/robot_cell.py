"""What the robot-side tests give a graph instead of a real cell: a camera played from a video file (the opencv
backend) and the user's cell file (params_file), as README's 'A real cell, step by step' has a user write it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_video(path: Path, frames: int = 30, fps: float = 30.0, step: int = 8) -> Path:
    """A small MJPG clip of flat grey frames growing brighter by `step` per frame (mod 255)."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), (i * step) % 255, dtype=np.uint8))
    writer.release()
    return path


def write_cell_file(tmp_path: Path, video: Path, extra: str = "", camera: str = "") -> Path:
    """`tmp_path/my_cell.yaml`: the camera playing `video`, the scripted policy, the trainer's and the policy's
    folders under `tmp_path`, then `extra` (more node sections, YAML) and `camera` (more camera keys)."""
    path = tmp_path / "my_cell.yaml"
    path.write_text(
        f"""
/camera/camera:
  ros__parameters:
    backend: opencv
    source: {video}
{camera}
/policy:
  ros__parameters:
    policy: scripted_expert
    model_store: {tmp_path / "models"}
/trainer:
  ros__parameters:
    store_path: {tmp_path / "store"}
    run_dir: {tmp_path / "trainer"}
    model_store: {tmp_path / "models"}
{extra}
"""
    )
    return path
