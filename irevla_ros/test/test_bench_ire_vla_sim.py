"""The simulation benchmark runner at its tiny scale: every method runs, the JSON and the Markdown table come out
with the episode counts. Success values are not asserted (a tiny run checks code paths, not learning)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from irevla_ros.bench.ire_vla_sim import METHODS, SCALES, BenchConfig, BenchConfigError, load_config, main


def _rate_ok(group: dict) -> None:
    assert 0 <= group["successes"] <= group["episodes"]
    assert group["success_rate"] == pytest.approx(group["successes"] / group["episodes"], abs=1e-4)
    lo, hi = group["ci95"]
    assert 0.0 <= lo <= group["success_rate"] <= hi <= 1.0


def test_tiny_benchmark_writes_json_and_table_for_every_method(tmp_path: Path):
    out = tmp_path / "results"
    assert main(["--scale", "tiny", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    cfg = BenchConfig.from_dict(SCALES["tiny"])
    doc = json.loads((out / "ire_vla_sim.json").read_text())
    assert doc["benchmark"] == "ire_vla_sim" and doc["scale"] == "tiny"
    assert doc["parameters"]["expert_tasks"] == cfg.expert_tasks
    assert set(doc["methods"]) == set(METHODS)
    demos = doc["demonstrations"]
    wanted = cfg.demos_per_task * len(cfg.expert_tasks)
    assert demos["kept"] == wanted
    assert wanted <= demos["episodes_run"] <= wanted * cfg.demo_attempts_per_demo
    eval_episodes = cfg.eval_episodes_per_task * (
        len(cfg.expert_tasks) + len(cfg.rl_tasks) + len(cfg.unseen_tasks)
    )
    for name, m in doc["methods"].items():
        _rate_ok(m["expert"])
        _rate_ok(m["unseen"])
        assert set(m["rl"]) == set(cfg.rl_tasks)
        for group in m["rl"].values():
            _rate_ok(group)
            assert group["episodes"] == cfg.eval_episodes_per_task
        e = m["environment_episodes"]
        assert e["demos"] == demos["episodes_run"] and e["eval"] == eval_episodes
        assert e["rl"] == (0 if name == "SFT" else cfg.rl_episodes_per_task * len(cfg.rl_tasks))
        assert e["train"] == e["demos"] + e["rl"]
        for task in m["per_task"].values():
            assert all(1 <= n <= cfg.max_steps for n in task["lengths"])  # type: ignore[operator]
    stages = doc["stages"]
    assert math.isfinite(stages["stage0"]["final_loss"])
    expected_updates = cfg.rl_episodes_per_task // cfg.episodes_per_update
    for task in cfg.rl_tasks:
        assert len(stages["iRe-VLA"][task]["stage1"]["updates"]) == expected_updates
        assert math.isfinite(stages["iRe-VLA"][task]["stage2"]["final_loss"])
        assert len(stages["PPO-Replay"][task]["updates"]) == expected_updates
    assert (out / "ire_vla_sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "ire_vla_sim.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| Method"))
    assert (
        all(task in header for task in cfg.rl_tasks) and "Expert (1 tasks)" in header and "Unseen" in header
    )
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| Method")]
    assert [r.split("|")[1].strip() for r in rows] == list(METHODS)
    for row, name in zip(rows, METHODS, strict=True):
        e = doc["methods"][name]["environment_episodes"]
        assert f"{e['train']} ({e['demos']} + {e['rl']})" in row


def test_settings_are_validated_with_the_key_named(tmp_path: Path):
    with pytest.raises(BenchConfigError, match="unknown benchmark setting"):
        load_config("tiny", None, {"demos_per_tsk": 3})
    with pytest.raises(BenchConfigError, match="also trained on"):
        load_config("tiny", None, {"unseen_tasks": ["handle-press-v3"]})
    with pytest.raises(BenchConfigError, match="demos_per_task must be a positive integer"):
        load_config("tiny", None, {"demos_per_task": 0})
    with pytest.raises(BenchConfigError, match="unknown scale"):
        load_config("huge", None, {})
    path = tmp_path / "b.yaml"
    path.write_text("demos_per_task: 3\nrl_tasks: [drawer-close-v3]\n")
    cfg = load_config("tiny", path, {"seed": 5})
    assert (cfg.demos_per_task, cfg.rl_tasks, cfg.seed, cfg.max_steps) == (3, ["drawer-close-v3"], 5, 40)
    for scale, values in SCALES.items():
        BenchConfig.from_dict(values)  # every preset is valid
        assert scale in ("tiny", "small", "default", "paper")
    assert main(["--scale", "tiny", "--demos-per-task", "0"]) == 2
