"""Round trip through LeRobot's own dataset code: store -> LeRobotDataset v3 -> LeRobotDataset loader -> store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from irevla_ros.interop import lerobot_dataset as lr
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import AssembledEpisode, EpisodeMeta, StepData

PERIOD_NS = 100_000_000  # 10 Hz
CAMERAS = ("camera", "wrist_camera")
NAMES = ["x", "y", "z", "gripper"]


def _episode(episode_id: str, steps: int, seed: int, interventions: set[int]) -> AssembledEpisode:
    rng = np.random.default_rng(seed)
    start = 1_000_000_000 * (seed + 1)
    records = [
        StepData(
            episode_id=episode_id,
            step_index=i,
            stamp_ns=start + i * PERIOD_NS,
            images={c: rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for c in CAMERAS},
            image_stamps_ns=dict.fromkeys(CAMERAS, start + i * PERIOD_NS),
            proprioception=rng.normal(size=4).astype(np.float32),
            proprioception_names=NAMES,
            instruction="push the puck to the goal",
            action=rng.normal(size=4).astype(np.float32),
            log_prob=None,
            value=None,
            policy_version="v0001",
            intervention=i in interventions,
            hold=False,
        )
        for i in range(steps)
    ]
    meta = EpisodeMeta(
        episode_id=episode_id,
        task="push",
        instruction="push the puck to the goal",
        policy_version="v0001",
        source="policy",
        started_ns=start,
        ended_ns=start + steps * PERIOD_NS,
        outcome="unknown",
        expected_steps=steps,
    )
    return AssembledEpisode(meta=meta, steps=records, complete=True)


def test_round_trip_through_lerobot(tmp_path: Path) -> None:
    LeRobotDataset = lr._lerobot_dataset_class()
    store = EpisodeStore(tmp_path / "store")
    store.write(_episode("ep-a", 6, 0, {2, 3}))
    store.write(_episode("ep-b", 5, 1, set()))
    store.relabel("ep-a", "success", "operator", 5)
    store.relabel("ep-b", "failure", "operator", 6)
    lines: list[str] = []
    out = tmp_path / "ds"
    result = lr.export_lerobot(store, out, source="policy", progress=lines.append)
    assert (result.episodes, result.frames, result.fps) == (2, 11, 10)
    assert len(lines) == 2
    # a filter that matches nothing is an error naming the filter
    with pytest.raises(lr.LeRobotInteropError, match="outcome=timeout"):
        lr.export_lerobot(store, tmp_path / "none", outcome="timeout")

    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0"
    assert info["fps"] == 10 and info["total_episodes"] == 2 and info["total_frames"] == 11
    assert info["features"]["observation.state"]["names"] == NAMES
    assert set(info["features"]) >= {f"observation.images.{c}" for c in CAMERAS}

    loaded = LeRobotDataset("irevla/episodes", root=out)
    originals = [store.read("ep-a"), store.read("ep-b")]
    assert loaded.num_episodes == 2 and len(loaded) == 11
    k = 0
    for ep_index, record in enumerate(originals):
        for i, step in enumerate(record.steps):
            item = loaded[k]
            assert int(item["episode_index"]) == ep_index and int(item["frame_index"]) == i
            assert item["task"] == "push the puck to the goal"
            np.testing.assert_array_equal(item["action"].numpy(), step.action)
            np.testing.assert_array_equal(item["observation.state"].numpy(), step.proprioception)
            assert bool(item[lr.INTERVENTION]) == step.intervention
            last = i == len(record.steps) - 1
            assert bool(item["next.done"]) == last
            assert bool(item["next.success"]) == (last and ep_index == 0)
            for c in CAMERAS:
                image = (item[f"observation.images.{c}"].permute(1, 2, 0).numpy() * 255).round()
                np.testing.assert_array_equal(image.astype(np.uint8), step.images[c])
            k += 1

    fresh = EpisodeStore(tmp_path / "fresh")
    imported = lr.import_lerobot(out, fresh, task="push", progress=lines.append)
    assert len(imported.episode_ids) == 2 and imported.frames == 11
    demos = fresh.trainable(source="expert", task="push")
    assert [d.episode_id for d in demos] == imported.episode_ids
    assert demos[0].outcome == "success" and demos[0].intervention_steps == 2
    for new_id, record in zip(imported.episode_ids, originals, strict=True):
        back = fresh.read(new_id)
        assert back.meta.source == "expert" and back.meta.policy_version.startswith(
            "lerobot:irevla/episodes#"
        )
        assert len(back.steps) == len(record.steps)
        for a, b in zip(back.steps, record.steps, strict=True):
            np.testing.assert_array_equal(a.action, b.action)
            np.testing.assert_array_equal(a.proprioception, b.proprioception)
            assert a.proprioception_names == NAMES and a.intervention == b.intervention
            for c in CAMERAS:
                np.testing.assert_array_equal(a.images[c], b.images[c])
    store.close()
    fresh.close()


def test_cli_verbs_export_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from irevla_ros.cli import main

    with EpisodeStore(tmp_path / "store") as store:
        store.write(_episode("ep-a", 4, 2, {1}))
        store.relabel("ep-a", "success", "operator", 5)
    out = tmp_path / "ds"
    assert main(["export", "lerobot", "--store", str(tmp_path / "store"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "exported 1/1: ep-a (4 steps)" in captured.err and "1 episodes, 4 frames at 10 fps" in captured.out
    # a second export into the same folder is refused, naming it
    assert main(["export", "lerobot", "--store", str(tmp_path / "store"), "--out", str(out)]) == 1
    assert str(out) in capsys.readouterr().err
    assert main(["import", "lerobot", str(out), "--store", str(tmp_path / "fresh"), "--task", "push"]) == 0
    assert "imported episode 0" in capsys.readouterr().err
    with EpisodeStore(tmp_path / "fresh", read_only=True) as fresh:
        (demo,) = fresh.trainable(source="expert")
        assert demo.task == "push" and demo.num_steps == 4 and demo.outcome == "success"


def test_torchvision_stays_out_of_the_venv_for_everything_but_lerobot() -> None:
    # The only torchvision wheel here is built for the CUDA torch; on the venv's path it breaks transformers'
    # model imports (the VLA's BertModel) in every node. Only the LeRobot code path may see it.
    import subprocess
    import sys

    probe = (
        "import importlib.util\n"
        "assert importlib.util.find_spec('torchvision') is None, 'torchvision is importable from the venv'\n"
        "from transformers import BertModel\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
