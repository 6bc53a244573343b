"""Benchmark `sim_camera.json`: simulated camera frames per wall second through the camera node, against the
cost of one bare MuJoCo render of the same cell measured in the same run.

The sim cell renders every camera in `/sim_cell.cameras` once per control period (whether or not a camera
node publishes it), so the graph runs twice: as configured, and with the cell rendering the published camera
only.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import mujoco

from irevla_ros.bench.harness import RESULTS_DIR, image_topic, log, sim_graph, summary, write_result

MS = 1e-6
STALL_MS = 250.0  # a frame interval this long is the loop stalling, not rendering

MEASURES = {
    "bare_render_ms": (
        "wall time of one mujoco.Renderer.render() call of the cell's renderer (MetaWorldCell.renderer, "
        "cell.lock held), scene already updated for the published camera with shadows and reflections off as "
        "cell.render sets them; pooled over the configured tasks; measured in the benchmark process while no "
        "graph runs"
    ),
    "cell_render_ms": "wall time of one MetaWorldCell.render(camera) (update_scene, render, flip)",
    "frames_per_wall_s": (
        "sensor_msgs/Image messages the observer received on the camera node's colour topic per wall second, "
        "real_time_factor 0, window opening 1 s after the first frame"
    ),
    "frames_per_clock_period": "frames received / /clock periods received in the same window (1.0: one each)",
    "ratio_node_fps_to_bare_render_fps": (
        "frames_per_wall_s / (1000 / bare_render_ms p50): the share of the bare renderer's frame rate that "
        "reaches the camera topic through the whole loop"
    ),
    "steady_frames_per_wall_s": (
        "1000 / median frame interval: the frame rate between stalls; ratio_steady_fps_to_bare_render_fps "
        "uses it in place of frames_per_wall_s"
    ),
    "stalled_time_fraction": f"share of the window spent in frame intervals longer than {STALL_MS:g} ms",
    "render_share_of_wall_time": (
        "frames_per_wall_s * sum over the cell's rendered cameras of cell_render_ms p50 / 1000: the fraction "
        "of wall time the cell spends rendering"
    ),
}


def _sim_cell_config() -> dict[str, object]:
    from irevla_ros.bringup.graph import collect_graph, validate_graph

    return dict(validate_graph(collect_graph("sim"))["/sim_cell"])


def _camera_config() -> dict[str, object]:
    from irevla_ros.bringup.graph import collect_graph, validate_graph

    return dict(validate_graph(collect_graph("sim"))["/camera/camera"])


def time_renders(
    tasks: Sequence[str],
    cameras: Sequence[str],
    published: str,
    width: int,
    height: int,
    renders: int = 100,
    warmup: int = 5,
) -> dict[str, object]:
    """Bare `Renderer.render()` and `cell.render(camera)` timings in the cell the graph runs."""
    from irevla_ros.sim.cell import MetaWorldCell

    bare: list[float] = []
    per_task: dict[str, float | None] = {}
    cell_render: dict[str, list[float]] = {c: [] for c in cameras}
    with MetaWorldCell(tasks=list(tasks), width=width, height=height, cameras=list(cameras), seed=0) as cell:
        for task in tasks:
            cell.reset(task=task)
            with cell.lock:
                renderer = cell.renderer
                renderer.update_scene(cell.data, camera=cell.model.camera(published).id)
                renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
                for _ in range(warmup):
                    renderer.render()
                times = []
                for _ in range(renders):
                    t0 = time.perf_counter_ns()
                    renderer.render()
                    times.append((time.perf_counter_ns() - t0) * MS)
            bare.extend(times)
            per_task[task] = summary(times)["p50"]
            for camera in cameras:
                for _ in range(renders // 2):
                    t0 = time.perf_counter_ns()
                    cell.render(camera)
                    cell_render[camera].append((time.perf_counter_ns() - t0) * MS)
    return {
        "bare_render_ms": summary(bare),
        "bare_render_ms_p50_per_task": per_task,
        "cell_render_ms": {c: summary(v) for c, v in cell_render.items()},
    }


def frames_through_node(
    work_dir: Path, seconds: float, sim_cell_cameras: Sequence[str] | None, startup_timeout: float = 120.0
) -> dict[str, object]:
    """Frames per wall second on the camera node's topic, the graph running as fast as it can."""
    overrides = ["/sim_cell.real_time_factor=0.0", "/episode_manager.num_episodes=0"]
    if sim_cell_cameras is not None:
        overrides.append(f"/sim_cell.cameras=[{','.join(sim_cell_cameras)}]")
    topic = image_topic("camera")
    with sim_graph(work_dir, overrides, ("camera",)) as graph:
        obs = graph.observer
        first = graph.wait_for(lambda: obs.count("images") > 0, startup_timeout, "the first camera frame")
        start = graph.run_for(1.0)
        end = graph.run_for(seconds, progress=lambda: f"sim_camera: {obs.count('images')} frames received")
        seen = obs.snapshot()
    frames = [(a.wall_ns, stamp) for a, stamp in seen.images[topic] if start <= a.wall_ns <= end]
    periods = [a for a, _ in seen.clock if start <= a.wall_ns <= end]
    window = (end - start) * 1e-9
    stamps = [s for _, s in frames]
    gaps = [(b - a) * MS for (a, _), (b, _) in pairwise(frames)]
    return {
        "sim_cell_cameras": list(sim_cell_cameras) if sim_cell_cameras is not None else "as configured",
        "window_s": round(window, 2),
        "first_frame_after_start_s": round((first - graph.started_wall_ns) * 1e-9, 1),
        "frames": len(frames),
        "frames_per_wall_s": round(len(frames) / window, 3) if window > 0 else None,
        "frames_per_clock_period": round(len(frames) / len(periods), 3) if periods else None,
        "duplicate_stamps": len(stamps) - len(set(stamps)),
        "frame_interval_ms": summary(gaps),
        "steady_frames_per_wall_s": round(1000.0 / summary(gaps)["p50"], 3) if gaps else None,
        "stalled_time_fraction": round(sum(g for g in gaps if g > STALL_MS) / 1000.0 / window, 4)
        if window > 0
        else None,
    }


def run(
    out_dir: Path = RESULTS_DIR,
    work_dir: Path = Path("runs") / "bench" / "sim_camera",
    seconds: float = 40.0,
    renders: int = 100,
    variants: Sequence[str] = ("configured", "published_only"),
) -> Path:
    """`variants`: "configured" (the cell renders /sim_cell.cameras as configured) and/or "published_only"
    (the cell renders the published camera only)."""
    config = _sim_cell_config()
    published = str(_camera_config().get("sim_camera", "corner"))
    tasks = list(config["tasks"])  # type: ignore[call-overload]
    cameras = list(config["cameras"])  # type: ignore[call-overload]
    width, height = int(config["image_width"]), int(config["image_height"])  # type: ignore[call-overload]
    log(f"sim_camera: timing {renders} bare renders per task ({len(tasks)} tasks, {width}x{height})")
    renders_result = time_renders(tasks, cameras, published, width, height, renders)
    bare_ms = float(renders_result["bare_render_ms"]["p50"])  # type: ignore[index]
    cell_ms = {c: float(s["p50"]) for c, s in renders_result["cell_render_ms"].items()}  # type: ignore[attr-defined]
    log(f"sim_camera: bare render p50 {bare_ms:.2f} ms; cell.render p50 {cell_ms}")
    entries = []
    for variant in variants:
        if variant not in ("configured", "published_only"):
            raise ValueError(f"sim_camera variant {variant!r}: expected configured or published_only")
        rendered = cameras if variant == "configured" else [published]
        entry = frames_through_node(
            work_dir / variant, seconds, None if variant == "configured" else rendered
        )
        entry["variant"] = variant
        fps = entry["frames_per_wall_s"] or 0.0
        entry["cameras_rendered_per_period"] = list(rendered)
        entry["ratio_node_fps_to_bare_render_fps"] = round(fps * bare_ms / 1000.0, 4)
        steady = entry["steady_frames_per_wall_s"] or 0.0
        entry["ratio_steady_fps_to_bare_render_fps"] = round(steady * bare_ms / 1000.0, 4)
        entry["render_share_of_wall_time"] = round(fps * sum(cell_ms[c] for c in rendered) / 1000.0, 4)
        log(
            f"sim_camera: cell rendering {rendered}: {fps} frames/s through the node "
            f"(bare renderer {1000 / bare_ms:.0f} frames/s, "
            f"ratio {entry['ratio_node_fps_to_bare_render_fps']})"
        )
        entries.append(entry)
    parameters = {
        "graph": "collect (sim profile), one camera node (/camera/camera), scripted expert",
        "real_time_factor": 0.0,
        "published_sim_camera": published,
        "sim_cell_cameras_configured": cameras,
        "tasks": tasks,
        "image_size": [width, height],
        "renders_per_task": renders,
        "seconds_per_graph_run": seconds,
    }
    body = {
        "measures": MEASURES,
        **renders_result,
        "bare_render_fps": round(1000 / bare_ms, 1),
        "entries": entries,
    }
    return write_result(out_dir / "sim_camera.json", "sim_camera", parameters, body)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args(argv)
    run(args.out, seconds=args.seconds)


if __name__ == "__main__":
    main()
