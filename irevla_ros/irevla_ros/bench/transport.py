"""Benchmark `transport.json`: a long simulated session with two cameras; steps published vs steps stored.

Published: the policy node's own count per episode (STEPS_DONE num_steps on /episode_manager/events).
Stored: the episode store's catalogue after the graph stopped. Goal: 0 steps lost.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from irevla_ros.bench.harness import RESULTS_DIR, log, sim_graph, summary, write_result
from irevla_ros.bench.observer import Observations

CAMERAS = ("camera", "wrist_camera")

MEASURES = {
    "steps_published": "sum over the session's episodes of the policy node's STEPS_DONE num_steps",
    "records_observed": (
        "distinct (episode_id, step_index) step records the benchmark's observer received on "
        "/policy/step_records (reliable QoS); a shortfall here is the observer's loss, not the store's"
    ),
    "steps_stored": (
        "sum of num_steps of the same episodes in the store's catalogue "
        "(EpisodeStore(path, read_only=True).list()) after the graph stopped"
    ),
    "lost_steps": "steps_published - steps_stored (goal 0); episodes never stored count all their steps",
    "episodes": (
        "episodes with STEPS_DONE seen; an episode still running when the run stops has no STEPS_DONE and is "
        "reported as in_flight_at_stop, not counted"
    ),
}


def _catalogue(store_path: Path) -> dict[str, object]:
    from irevla_ros.store.episode_store import EpisodeStore

    if not (store_path / "catalog.sqlite").exists():
        return {}
    with EpisodeStore(store_path, read_only=True) as store:
        return {row.episode_id: row for row in store.list()}


def account(seen: Observations, rows: dict[str, object], cameras: Sequence[str]) -> dict:
    """Published vs observed vs stored, per episode and in total."""
    observed: dict[str, set[int]] = {}
    duplicates = 0
    images_per_record: list[int] = []
    for record in seen.records:
        steps = observed.setdefault(record.episode_id, set())
        if record.step_index in steps:
            duplicates += 1
        steps.add(record.step_index)
        if not record.hold:
            images_per_record.append(len(record.image_stamps_ns))
    episodes = []
    for episode_id, published in seen.steps_done.items():
        row = rows.get(episode_id)
        episodes.append(
            {
                "episode_id": episode_id,
                "task": getattr(row, "task", None),
                "outcome": getattr(row, "outcome", None),
                "published": published,
                "observed": len(observed.get(episode_id, ())),
                "stored": getattr(row, "num_steps", 0),
                "complete": getattr(row, "complete", False),
                "size_bytes": getattr(row, "size_bytes", 0),
            }
        )
    published = sum(e["published"] for e in episodes)
    stored = sum(e["stored"] for e in episodes)
    holds = sum(1 for r in seen.records if r.hold)
    return {
        "cameras": list(cameras),
        "episodes": len(episodes),
        "episodes_stored": sum(1 for e in episodes if e["episode_id"] in rows),
        "episodes_incomplete": sum(1 for e in episodes if e["episode_id"] in rows and not e["complete"]),
        "episodes_not_stored": [e["episode_id"] for e in episodes if e["episode_id"] not in rows],
        "in_flight_at_stop": sorted(set(seen.started) - set(seen.steps_done)),
        "steps_published": published,
        "records_observed": sum(e["observed"] for e in episodes),
        "records_observed_duplicates": duplicates,
        "steps_stored": stored,
        "lost_steps": published - stored,
        "goal_met": published - stored == 0 and all(e["episode_id"] in rows for e in episodes),
        "hold_records": holds,
        "images_per_non_hold_record": summary(images_per_record),
        "images_observed_per_topic": {topic: len(v) for topic, v in seen.images.items()},
        "stored_bytes": sum(e["size_bytes"] for e in episodes),
        "successes": sum(1 for e in episodes if e["outcome"] == "success"),
        "per_episode": episodes,
    }


def run(
    out_dir: Path = RESULTS_DIR,
    work_dir: Path = Path("runs") / "bench" / "transport",
    episodes: int = 20,
    max_seconds: float = 240.0,
    cameras: Sequence[str] = CAMERAS,
    extra_overrides: Sequence[str] = (),
    startup_timeout: float = 120.0,
) -> Path:
    overrides = [
        "/sim_cell.real_time_factor=0.0",
        f"/episode_manager.num_episodes={episodes}",
        *extra_overrides,
    ]
    with sim_graph(work_dir, overrides, cameras) as graph:
        obs = graph.observer
        graph.wait_for(lambda: obs.count("actions") > 0, startup_timeout, "the first action")
        started = time.monotonic()
        log(
            f"transport: first action; running until {episodes} episodes are stored "
            f"(at most {max_seconds:.0f} s)"
        )
        deadline = started + max_seconds
        next_report = started + 15.0
        while len(obs.snapshot().stored) < episodes and time.monotonic() < deadline:
            graph.check()
            if time.monotonic() >= next_report:
                seen = obs.snapshot()
                log(
                    f"transport: {len(seen.stored)}/{episodes} episodes stored, "
                    f"{len(seen.records)} records seen"
                )
                next_report += 15.0
            time.sleep(0.2)
        # Episodes the policy has closed are owed to the store: give the trainer time to finish writing them.
        owed_until = time.monotonic() + 30.0
        while time.monotonic() < owed_until:
            seen = obs.snapshot()
            if set(seen.steps_done) <= set(seen.stored):
                break
            graph.check()
            time.sleep(0.2)
        wall = time.monotonic() - started
        seen = obs.snapshot()
    rows = _catalogue(work_dir / "store")
    result = account(seen, rows, cameras)
    result["wall_s"] = round(wall, 1)
    result["steps_per_wall_s"] = round(result["steps_published"] / wall, 2) if wall > 0 else None
    log(
        f"transport: {result['episodes']} episodes, {result['steps_published']} steps published, "
        f"{result['records_observed']} observed, {result['steps_stored']} stored, lost {result['lost_steps']}"
    )
    parameters = {
        "graph": "collect (sim profile), scripted expert with action_noise 0.1",
        "real_time_factor": 0.0,
        "cameras": list(cameras),
        "episodes_requested": episodes,
        "max_seconds": max_seconds,
        "overrides": overrides,
    }
    return write_result(out_dir / "transport.json", "transport", parameters, {"measures": MEASURES, **result})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=240.0)
    args = parser.parse_args(argv)
    run(args.out, episodes=args.episodes, max_seconds=args.max_seconds)


if __name__ == "__main__":
    main()
