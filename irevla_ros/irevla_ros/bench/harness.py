"""What every benchmark shares: a leased ROS domain, the sim graph as child processes watched by an observer,
the machine description, percentile summaries and the JSON result file."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from irevla_ros import durable
from irevla_ros.bench.observer import Observer
from irevla_ros.bringup.domains import leased_domain

RESULTS_DIR = Path("bench") / "results"


class BenchError(RuntimeError):
    """The graph under measurement failed (a child exited, or it never became ready)."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, object]:
    """The machine and software the numbers come from; the load average says how busy the host was."""
    import mujoco

    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rmw_implementation": os.environ.get("RMW_IMPLEMENTATION", ""),
        "mujoco": mujoco.__version__,
        "mujoco_gl": os.environ.get("MUJOCO_GL", ""),
        "git_revision": _git_revision(),
    }


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float | int | None]:
    """n, p50, p99, mean, min and max of `values` (None when there are no values)."""
    if len(values) == 0:
        return {"n": 0, "p50": None, "p99": None, "mean": None, "min": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    return {
        "n": int(arr.size),
        "p50": round(float(np.percentile(arr, 50)), digits),
        "p99": round(float(np.percentile(arr, 99)), digits),
        "mean": round(float(arr.mean()), digits),
        "min": round(float(arr.min()), digits),
        "max": round(float(arr.max()), digits),
    }


def write_result(path: Path, benchmark: str, parameters: dict[str, object], body: dict[str, object]) -> Path:
    """Write one result file (atomically: a reader never sees half of it) and return its path."""
    document = {
        "benchmark": benchmark,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "parameters": parameters,
        **body,
    }
    _check_finite(document, benchmark)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_json(path, document, indent=1)
    log(f"wrote {path}")
    return path


def _check_finite(value: object, where: str) -> None:
    # json.dumps would write NaN/Infinity, which is not JSON; a non-finite number here is a benchmark bug.
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: non-finite number {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{where}[{i}]")


@dataclass
class SimGraph:
    """The running `collect` graph (sim profile) and the observer watching it."""

    runner: object  # GraphRunner
    observer: Observer
    log_dir: Path
    started_wall_ns: int

    def check(self) -> None:
        failed = self.runner.poll()  # type: ignore[attr-defined]
        if failed is not None:
            raise BenchError(f"{failed.label} exited with {failed.popen.returncode}; see {self.log_dir}")

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> int:
        """Wait until `predicate()` holds; returns the wall time (ns) it did. Raises after `timeout` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check()
            if predicate():
                return time.time_ns()
            time.sleep(0.05)
        raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}; see {self.log_dir}")

    def run_for(self, seconds: float, every: float = 10.0, progress: Callable[[], str] | None = None) -> int:
        """Let the graph run `seconds` wall seconds (printing progress); returns the end wall time (ns)."""
        end = time.monotonic() + seconds
        next_report = time.monotonic() + every
        while (now := time.monotonic()) < end:
            self.check()
            if progress is not None and now >= next_report:
                log(progress())
                next_report += every
            time.sleep(min(0.1, max(0.0, end - now)))
        return time.time_ns()


def image_topic(camera: str) -> str:
    """The colour image topic of camera node `camera` (realsense-ros naming, as the graph wires it)."""
    return f"/{camera}/{camera}/color/image_raw"


@contextmanager
def sim_graph(
    work_dir: Path,
    overrides: Sequence[str],
    cameras: Sequence[str] = ("camera",),
    observe_images: bool = True,
) -> Iterator[SimGraph]:
    """Start the sim `collect` graph with camera nodes `cameras` on a leased domain (localhost discovery),
    the store under `work_dir`, and an observer in this process on the same domain; both stop on exit."""
    from irevla_ros.bringup.graph import collect_graph
    from irevla_ros.bringup.launcher import GraphRunner

    # The observer's own participant reads this at rclpy.init; the children get it through their env.
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    log_dir = work_dir / "logs"
    with leased_domain() as domain:
        env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST")
        settings = [
            f"/trainer.store_path={(work_dir / 'store').resolve()}",
            f"/trainer.run_dir={(work_dir / 'trainer').resolve()}",
            *overrides,
        ]
        runner = GraphRunner(collect_graph("sim", tuple(cameras)), settings, env=env, log_dir=log_dir)
        observer = Observer(domain, [image_topic(c) for c in cameras] if observe_images else [])
        log(
            f"domain {domain}: starting the sim graph, cameras {list(cameras)} ({' '.join(overrides)}); "
            f"logs {log_dir}"
        )
        try:
            runner.start()
            yield SimGraph(runner, observer, log_dir, time.time_ns())
        finally:
            codes = runner.stop()
            observer.close()
            bad = {exe: code for exe, code in codes.items() if code not in (0, -2)}
            if bad:
                log(f"graph exit codes {bad}; see {log_dir}")
