"""Start a graph description as child processes on a machine without `ros2 launch` (pip-only installs).

Same processes, same executables, same parameter files, same order as `launch/collect.launch.py`; Ctrl-C or
SIGTERM is passed on to every child as SIGINT (what `ros2 launch` sends), then escalated after a grace period.
The same failure policy as the launch file: a driver marked `respawn` (a camera) that dies is started again after
RESPAWN_DELAY s, at most RESPAWN_MAX_RETRIES times; any other process that dies (arm controller, policy, episode
manager, trainer: on_exit=Shutdown() there) stops the whole graph, with a message naming the process, its nodes
and its exit code, and a non-zero exit code.
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
    RESPAWN_DELAY,
    RESPAWN_MAX_RETRIES,
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


def describe_exit(code: int) -> str:
    """'exit code 3', or 'killed by SIGKILL (-9)' for a negative Popen return code."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name} ({code})"
    return f"exit code {code}"


@dataclass
class Child:
    executable: str
    popen: subprocess.Popen[bytes]
    stop_timeout: float = 10.0
    label: str = ""  # GraphRunner.label: unique in the graph
    process: ProcessSpec | None = None
    respawns: int = 0  # times this process was started again after dying
    died_at: float | None = None  # monotonic time a respawnable child was seen dead, until it is restarted

    @property
    def nodes(self) -> str:
        return ", ".join(n.fully_qualified_name for n in self.process.nodes) if self.process else ""


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
        self.respawn_delay = RESPAWN_DELAY
        self.respawn_max_retries = RESPAWN_MAX_RETRIES
        # What supervision did, in order ("camera_node-camera respawned (1 of 3) after ..."), for logs and tests.
        self.events: list[str] = []

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

    def _spawn(self, process: ProcessSpec) -> subprocess.Popen[bytes]:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{self.label(process)}.log", "ab")  # noqa: SIM115 (lives with child)
        return subprocess.Popen(
            self.command(process),
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            preexec_fn=_die_with_parent,
        )

    def start(self) -> None:
        for process in self.graph.processes:
            popen = self._spawn(process)
            label = self.label(process)
            self.children.append(Child(process.executable, popen, process.stop_timeout, label, process))

    def _event(self, message: str) -> None:
        self.events.append(message)
        print(f"[bringup] {message}", flush=True)

    def poll(self) -> Child | None:
        """Supervise once: restart respawnable children that died (after the delay, within the retry budget);
        return the first child that died and may not be restarted (the graph must stop), if any."""
        now = time.monotonic()
        for child in self.children:
            code = child.popen.poll()
            if code is None:
                continue
            respawnable = child.process is not None and child.process.respawn
            if not respawnable or child.respawns >= self.respawn_max_retries:
                return child
            if child.died_at is None:
                child.died_at = now
                self._event(
                    f"{child.label} ({child.nodes}) died: {describe_exit(code)}; respawning in "
                    f"{self.respawn_delay:g} s ({child.respawns + 1} of {self.respawn_max_retries})"
                )
            elif now - child.died_at >= self.respawn_delay:
                assert child.process is not None
                child.popen = self._spawn(child.process)
                child.respawns += 1
                child.died_at = None
                self._event(f"{child.label} respawned (pid {child.popen.pid})")
        return None

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

    def unclean_exits(self, codes: Mapping[str, int], log_tail: int = 4000) -> str:
        """What `stop()`'s codes say went wrong, empty when every process exited 0: one line per other process
        ('arm_controller_node: exit code 1'), each followed by the end of its log when there is a log dir, so the
        failing process's own last words come first in a report rather than after every other log."""
        lines: list[str] = []
        for label, code in codes.items():
            if code == 0:
                continue
            lines.append(f"{label}: {describe_exit(code)}")
            log = self.log_dir / f"{label}.log" if self.log_dir is not None else None
            if log is not None and log.exists():
                lines.append(f"--- end of {log}\n{log.read_text(errors='replace')[-log_tail:]}")
        return "\n".join(lines)

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
    print(f"[bringup] graph {graph.title}: starting {names}", flush=True)
    runner.start()
    started = time.monotonic()
    failed = None
    while not stop_requested:
        failed = runner.poll()
        if failed is not None or (duration and time.monotonic() - started >= duration):
            break
        time.sleep(0.2)
    if failed is not None:
        code = int(failed.popen.returncode)
        why = (
            f"after {failed.respawns} respawns (the most allowed)"
            if failed.respawns
            else "a critical process (it is not respawned)"
        )
        print(
            f"[bringup] {failed.label} ({failed.nodes}) died: {describe_exit(code)}, {why}: stopping the graph",
            flush=True,
        )
    codes = runner.stop()
    print(f"[bringup] stopped: {codes}", flush=True)
    # A child that Ctrl-C reached (the terminal signals the whole group) before its handler was installed dies by
    # SIGINT: that is the stop the user asked for.
    unclean = runner.unclean_exits({label: code for label, code in codes.items() if code != -signal.SIGINT})
    if unclean:
        print(f"[bringup] not a clean stop:\n{unclean}", flush=True)
    return 1 if failed is not None or unclean else 0
