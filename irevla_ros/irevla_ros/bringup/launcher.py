"""Start a graph description as child processes on a machine without `ros2 launch` (pip-only installs).

Same processes, same executables, same parameter files, same order as `launch/collect.launch.py`; Ctrl-C or
SIGTERM is passed on to every child as SIGINT (what `ros2 launch` sends), then escalated after a grace period.
If one process dies, the others are stopped too, and the exit code says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from irevla_ros.bringup.graph import (
    GraphSpec,
    ProcessSpec,
    process_parameter_paths,
    validate_graph,
    with_overrides,
)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # A child must not outlive a launcher that was SIGKILLed (no orphaned arm controllers).
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    executable: str
    popen: subprocess.Popen[bytes]
    stop_timeout: float = 10.0
    label: str = ""  # GraphRunner.label: unique in the graph


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
        self.graph = with_overrides(graph, overrides, self._tmp)
        self.config = config
        self.effective_parameters = validate_graph(self.graph, config)
        self.env = dict(os.environ if env is None else env)
        self.log_dir = log_dir
        self.children: list[Child] = []

    def command(self, process: ProcessSpec | str) -> list[str]:
        """The command line of a process (or of the only process running executable `process`)."""
        if isinstance(process, str):
            matches = [p for p in self.graph.processes if p.executable == process]
            if len(matches) != 1:
                raise ValueError(f"{len(matches)} processes run {process!r}: pass the ProcessSpec")
            process = matches[0]
        exe = shutil.which(process.executable) or str(Path(sys.executable).parent / process.executable)
        cmd = [exe, "--ros-args"]
        if len(process.nodes) == 1:  # one executable may serve several nodes (two cameras): name each
            node = process.nodes[0]
            cmd += ["-r", f"__node:={node.name}", "-r", f"__ns:=/{node.namespace.strip('/')}"]
        for path in process_parameter_paths(self.graph, process, self.config):
            cmd += ["--params-file", str(path)]
        return cmd

    def label(self, process: ProcessSpec) -> str:
        """The process's name in exit codes and log files: its executable, with its node's name when several
        processes run the same executable (one camera_node per camera), so that no process's code or log hides
        another's."""
        if sum(p.executable == process.executable for p in self.graph.processes) == 1:
            return process.executable
        return f"{process.executable}-{process.nodes[0].name}"

    def start(self) -> None:
        for process in self.graph.processes:
            out = None
            label = self.label(process)
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{label}.log", "ab")  # noqa: SIM115 (lives with child)
            popen = subprocess.Popen(
                self.command(process),
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                preexec_fn=_die_with_parent,
            )
            self.children.append(Child(process.executable, popen, process.stop_timeout, label))

    def poll(self) -> Child | None:
        """The first child that has exited, if any."""
        return next((c for c in self.children if c.popen.poll() is not None), None)

    def stop(self, grace: float | None = None) -> dict[str, int]:
        """SIGINT every child at once, wait for each up to its own `stop_timeout` (or `grace` for all), then
        terminate and finally kill what is left; returns every process's exit code by label (negative: the
        signal that ended it, e.g. -11 for a crash, -15 / -9 for one that had to be terminated / killed)."""
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGINT)
        started = time.monotonic()
        for child in self.children:
            deadline = started + (child.stop_timeout if grace is None else grace)
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
        return {c.label: int(c.popen.returncode) for c in self.children}

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
            f"[bringup] {failed.label} exited with {failed.popen.returncode}: stopping the graph",
            flush=True,
        )
    codes = runner.stop()
    print(f"[bringup] stopped: {codes}", flush=True)
    if failed is not None:
        return 1
    return 0 if all(code in (0, -signal.SIGINT) for code in codes.values()) else 1
