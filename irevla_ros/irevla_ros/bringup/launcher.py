"""Start a graph description as child processes on a machine without `ros2 launch` (pip-only installs).

Same processes, same executables, same parameter files, same order as `launch/collect.launch.py`; Ctrl-C or
SIGTERM is passed on to every child as SIGINT (what `ros2 launch` sends), then escalated after a grace period.
If one process dies, the others are stopped too, and the exit code says so.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from irevla_ros.bringup.graph import GraphSpec, process_parameter_paths, validate_graph
from irevla_ros.params import ConfigError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A child must not outlive a launcher that was SIGKILLed (no orphaned arm controllers).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def overrides_file(overrides: Sequence[str], directory: Path) -> Path:
    """Turn `--set /node.param=value` strings into a ROS parameter file (values parsed as YAML scalars)."""
    tree: dict[str, dict[str, dict[str, object]]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        node, dot, param = key.rpartition(".")
        if not sep or not dot or not node or not param:
            raise ConfigError(f"--set {item!r}: expected NODE.PARAM=VALUE, e.g. /policy.action_noise=0.2")
        node = node if node.startswith("/") else "/" + node
        tree.setdefault(node, {"ros__parameters": {}})["ros__parameters"][param] = yaml.safe_load(raw)
    path = directory / "overrides.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@dataclass
class Child:
    executable: str
    popen: subprocess.Popen[bytes]


class GraphRunner:
    """Runs the processes of one graph; use as a context manager."""

    def __init__(
        self,
        graph: GraphSpec,
        overrides: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        config: Path | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="irevla-bringup-"))
        if overrides:
            graph = replace(graph, extra_parameter_files=(overrides_file(overrides, self._tmp),))
        self.graph = graph
        self.config = config
        self.effective_parameters = validate_graph(graph, config)
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir
        self.children: list[Child] = []

    def command(self, executable: str) -> list[str]:
        process = next(p for p in self.graph.processes if p.executable == executable)
        exe = shutil.which(executable) or str(Path(sys.executable).parent / executable)
        cmd = [exe, "--ros-args"]
        for path in process_parameter_paths(self.graph, process, self.config):
            cmd += ["--params-file", str(path)]
        return cmd

    def start(self) -> None:
        for process in self.graph.processes:
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{process.executable}.log", "ab")  # noqa: SIM115 (lives with child)
            popen = subprocess.Popen(
                self.command(process.executable),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                preexec_fn=_die_with_parent,
            )
            self.children.append(Child(process.executable, popen))

    def poll(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if c.popen.poll() is not None), None)

    def stop(self, grace: float = 10.0) -> dict[str, int]:
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.popen.terminate()
                try:
                    child.popen.wait(timeout=3.0)
                except subprocess.TimeoutExpired:
                    child.popen.kill()
                    child.popen.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)
        return {c.executable: int(c.popen.returncode) for c in self.children}

    def __enter__(self) -> GraphRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_graph(graph: GraphSpec, overrides: Sequence[str] = (), duration: float = 0.0) -> int:
    """Foreground bring-up for `irevla bringup`: runs until Ctrl-C/SIGTERM, a child exits, or `duration`."""
    stop_requested = False

    def _request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    runner = GraphRunner(graph, overrides)
    names = ", ".join(runner.graph.executables())
    print(f"[bringup] graph {graph.name} ({graph.hardware}): starting {names}", flush=True)
    runner.start()
    started = time.monotonic()
    failed = None
    while not stop_requested:
        failed = runner.poll()
        if failed is not None or (duration and time.monotonic() - started >= duration):
            break
        time.sleep(0.2)
    if failed is not None:
        print(
            f"[bringup] {failed.executable} exited with {failed.popen.returncode}: stopping the graph",
            flush=True,
        )
    codes = runner.stop()
    print(f"[bringup] stopped: {codes}", flush=True)
    if failed is not None:
        return 1
    return 0 if all(code in (0, -signal.SIGINT) for code in codes.values()) else 1
