"""The benchmarks' code paths at minimal scale: each runs the real sim graph for a few seconds and writes its
JSON with the keys bench/README.md describes; the statistics themselves are checked on synthetic arrivals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from irevla_ros.bench import control_loop, plot, sim_camera, transport
from irevla_ros.bench.harness import summary
from irevla_ros.bench.observer import ActionSeen, Arrival, Observations, RecordSeen, StatusSeen

MS = 1_000_000  # ns


def numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return []


def load(path: Path, *keys: str) -> dict:
    document = json.loads(path.read_text())
    for key in ("benchmark", "created_utc", "machine", "parameters", "measures", *keys):
        assert key in document, f"{path.name} lacks {key}"
    assert document["machine"]["cpu_count"] >= 1
    assert document["machine"]["python"]
    assert all(math.isfinite(x) for x in numbers(document)), f"{path.name} has a non-finite number"
    return document


def test_summary_percentiles_and_empty() -> None:
    assert summary([]) == {"n": 0, "p50": None, "p99": None, "mean": None, "min": None, "max": None}
    stats = summary(list(range(1, 101)))
    assert stats["n"] == 100 and stats["p50"] == 50.5 and stats["min"] == 1 and stats["max"] == 100
    assert 99.0 <= stats["p99"] <= 100.0


def test_control_loop_statistics_on_synthetic_arrivals() -> None:
    """Ticks 100 ms apart except one 300 ms late tick; frames arrive 30 ms before their record."""
    seen = Observations(images={"/camera/camera/color/image_raw": []})
    wall = 1_000 * MS
    for step in range(20):
        wall += 300 * MS if step == 10 else 100 * MS
        stamp = step * 100 * MS
        image = Arrival(wall - 30 * MS, wall - 30 * MS, wall - 31 * MS)
        seen.images["/camera/camera/color/image_raw"].append((image, stamp))
        arrival = Arrival(wall, wall, wall - 1 * MS)
        seen.actions.append(ActionSeen(arrival, "ep-1", step, False, stamp))
        record = Arrival(wall + 2 * MS, wall + 2 * MS, wall + 1 * MS)
        seen.records.append(RecordSeen(record, "ep-1", step, False, stamp, ("camera",), (stamp,)))
        seen.clock.append((arrival, stamp))
    # A new episode restarts the step index: the gap between episodes is not a period.
    seen.actions.append(ActionSeen(Arrival(wall + 5_000 * MS, 0, 0), "ep-2", 0, False, 0))
    seen.status.append(StatusSeen(0, 3, 0, 0))
    seen.status.append(StatusSeen(wall, 4, 0, 0))
    result = control_loop.analyse(seen, 1_000 * MS, wall + 10_000 * MS, 0.1, 1.0)
    assert result["period_ms"]["n"] == 19
    assert result["period_ms"]["p50"] == pytest.approx(100.0)
    assert result["period_ms"]["max"] == pytest.approx(300.0)
    assert result["periods_over_250ms"] == 1 and result["stalls_over_1s"] == 0
    assert result["jitter_ms"]["max"] == pytest.approx(200.0) and result["jitter_ms"]["p50"] == pytest.approx(
        0.0
    )
    assert result["latency_frame_to_record_ms"]["p50"] == pytest.approx(32.0)
    assert result["latency_frame_to_action_ms"]["p50"] == pytest.approx(30.0)
    assert result["latency_publish_to_publish_ms"]["p50"] == pytest.approx(32.0)
    assert result["frame_age_zero_fraction"] == 1.0 and result["latency_unmatched_frames"] == 0
    assert result["missed_ticks"] == 4 and result["missed_ticks_in_window"] == 1
    assert result["actions_received"] == 21 and result["episodes_seen"] == 2


def test_control_loop_bench_writes_json(tmp_path: Path) -> None:
    path = control_loop.run(tmp_path, tmp_path / "work", real_time_factors=(0.0,), fast_seconds=3.0)
    document = load(path, "entries")
    (entry,) = document["entries"]
    assert entry["real_time_factor"] == 0.0
    assert entry["actions_received"] > 0 and entry["control_steps_per_wall_s"] > 0
    for key in ("period_ms", "jitter_ms", "latency_frame_to_record_ms", "frame_age_sim_ms"):
        assert {"n", "p50", "p99"} <= set(entry[key])
    assert entry["latency_frame_to_record_ms"]["n"] > 0
    assert plot.plot_control_loop(path).stat().st_size > 0


def test_transport_bench_stores_every_published_step(tmp_path: Path) -> None:
    path = transport.run(
        tmp_path,
        tmp_path / "work",
        episodes=1,
        max_seconds=30.0,
        extra_overrides=["/episode_manager.episode_timeout=2.0"],
    )
    document = load(path, "steps_published", "steps_stored", "lost_steps", "per_episode")
    assert document["cameras"] == ["camera", "wrist_camera"]
    assert document["episodes"] == 1 and document["steps_published"] > 0
    assert document["lost_steps"] == 0 and document["goal_met"] is True
    assert document["images_per_non_hold_record"]["max"] == 2


def test_sim_camera_bench_writes_json(tmp_path: Path) -> None:
    path = sim_camera.run(tmp_path, tmp_path / "work", seconds=2.0, renders=4, variants=("published_only",))
    document = load(path, "bare_render_ms", "cell_render_ms", "entries")
    assert document["bare_render_ms"]["p50"] > 0
    (entry,) = document["entries"]
    assert entry["frames"] > 0 and entry["ratio_node_fps_to_bare_render_fps"] > 0
