"""The iteration's plain rules: when a session ends, what survives a restart, the metrics log and the report."""

from __future__ import annotations

import json

import pytest

from irevla_ros.train.config import Stage1Config
from irevla_ros.train.iteration import (
    IterationConfig,
    IterationError,
    IterationRecord,
    session_end_reason,
)
from irevla_ros.train.metrics import MetricsLog, read_metrics
from irevla_ros.train.report import write_report


def test_episode_budget_ends_the_session():
    cfg = IterationConfig(episode_budget=3)
    assert session_end_reason([True, False], cfg) is None
    assert session_end_reason([True, False, False], cfg) == "episode_budget"
    assert session_end_reason([True] * 10, IterationConfig()) is None  # no budget, no plateau: the operator


def test_plateau_needs_two_windows_and_compares_them():
    cfg = IterationConfig(plateau_window=3, plateau_delta=0.2)
    assert session_end_reason([False, False, True, True, True], cfg) is None  # fewer than 2 windows
    # 0/3 then 3/3: still improving
    assert session_end_reason([False, False, False, True, True, True], cfg) is None
    # 2/3 then 2/3: no gain >= 0.2
    assert session_end_reason([True, True, False, True, False, True], cfg) == "plateau"


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="Stage 1 algorithm 'dqn'"):
        IterationConfig(stage1=Stage1Config(algorithm="dqn"))
    with pytest.raises(ValueError, match="episode_budget"):
        IterationConfig(episode_budget=-1)
    with pytest.raises(ValueError, match="validation_margin"):
        IterationConfig(validation_margin=2.0)


def test_record_round_trip_and_corrupt_state(tmp_path):
    path = tmp_path / "iteration.json"
    assert IterationRecord.load(path) is None
    record = IterationRecord(iteration=3, phase="validating", base_version="v0001-x", candidate="v0004-y")
    record.session_successes = [True, False]
    record.save(path)
    assert IterationRecord.load(path) == record
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text("{not json")
    with pytest.raises(IterationError, match="unreadable iteration state"):
        IterationRecord.load(path)
    path.write_text(json.dumps({"phase": "dancing"}))
    with pytest.raises(IterationError, match="unknown phase"):
        IterationRecord.load(path)


def test_metrics_log_survives_a_torn_line_and_report_plots(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(5):
        log.scalar("stage1/policy_loss", 1.0 / (step + 1), step, iteration=1)
        log.scalar("stage2/loss", 0.5 - 0.05 * step, step, iteration=1)
    log.scalar("stage1/value_loss", float("nan"), 5, iteration=1)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"name": "stage2/loss", "val')  # a kill mid-write
    rows = list(read_metrics(tmp_path))
    assert len(rows) == 11
    assert rows[-1]["value"] is None and rows[-1]["non_finite"] == "nan"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())

    history = [
        {
            "iteration": 1,
            "end_reason": "episode_budget",
            "session_episodes": 4,
            "session_success_rate": 0.25,
            "candidate": "v0003-stage2_sft",
            "promoted": True,
            "why": "validation passed",
            "evaluation": {
                "running": {"success_rate": 0.2, "tasks": {"reach-v3": {"success_rate": 0.2}}},
                "candidate": {"success_rate": 0.6, "tasks": {"reach-v3": {"success_rate": 0.6}}},
            },
        }
    ]
    out = write_report(tmp_path, history)
    for name in ("success_rate.png", "losses.png", "report.md", "report.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "success_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "v0003-stage2_sft" in (out / "report.md").read_text()
