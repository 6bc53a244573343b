"""Test harness: real rclpy over Fast DDS, every test on its own ROS_DOMAIN_ID with localhost-only discovery.

Domain ids are leased with an exclusive file lock, so parallel pytest runs on one host (two developers, CI and
a developer) never share a domain and never cross-talk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from irevla_ros.bringup.domains import leased_domain
from irevla_ros.dds_profile import use_default_profile

os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("MUJOCO_GL", "osmesa")
os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
use_default_profile()  # this process and the children it starts (nodes, peers, verbs)
os.environ.setdefault("ROS_LOG_DIR", str(Path(tempfile.gettempdir()) / "irevla-test-roslog"))
if sys.prefix not in os.environ.get("AMENT_PREFIX_PATH", "").split(":"):
    os.environ["AMENT_PREFIX_PATH"] = ":".join(
        p for p in (sys.prefix, os.environ.get("AMENT_PREFIX_PATH")) if p
    )


@pytest.fixture(autouse=True)
def normal_scheduling() -> Iterator[None]:
    """Every test starts on SCHED_OTHER: franky (libfranka) gives the thread that drives it a real-time policy,
    which every process a later test starts (nodes, validators, busy loops) would inherit."""
    yield
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@pytest.fixture
def ros_domain(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """A ROS_DOMAIN_ID leased for this test; child processes inherit it through the environment."""
    with leased_domain() as domain:
        monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
        yield domain


@pytest.fixture
def ros_context(ros_domain: int) -> Iterator[object]:
    """A per-test rclpy Context on the test's own domain."""
    import rclpy
    from rclpy.context import Context

    context = Context()
    rclpy.init(context=context, domain_id=ros_domain)
    try:
        yield context
    finally:
        context.try_shutdown()


def spin_until(executor: object, predicate: Callable[[], bool], timeout: float, period: float = 0.05) -> bool:
    """Spin `executor` until `predicate()` holds or `timeout` (wall seconds) passes; returns the predicate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        executor.spin_once(timeout_sec=period)  # type: ignore[attr-defined]
    return predicate()


@pytest.fixture
def spin() -> Callable[..., bool]:
    return spin_until


class ChildProcess:
    """A child process (a node executable or a script) with its output captured to a file for diagnosis."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.popen = subprocess.Popen(
            cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env or dict(os.environ)
        )

    def output(self) -> str:
        if not self._out.closed:
            self._out.flush()
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = 2, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()
        return int(self.popen.returncode)


@pytest.fixture
def child(tmp_path: Path, ros_domain: int) -> Iterator[Callable[..., ChildProcess]]:
    started: list[ChildProcess] = []

    def start(cmd: list[str], name: str = "child", env: dict[str, str] | None = None) -> ChildProcess:
        proc = ChildProcess(cmd, tmp_path / f"{name}-{len(started)}.log", env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def sim_graph(tmp_path: Path, ros_domain: int) -> Iterator[Callable[..., object]]:
    """Start the real `collect` graph (sim profile) as child processes, with its store under tmp_path.

    `start(*overrides)` returns the running GraphRunner (logs in tmp_path/logs); it is stopped at teardown.
    """
    from irevla_ros.bringup.graph import collect_graph
    from irevla_ros.bringup.launcher import GraphRunner

    runners: list[GraphRunner] = []

    def start(*overrides: str) -> GraphRunner:
        runner = GraphRunner(
            collect_graph("sim"),
            [
                f"/trainer.store_path={tmp_path / 'store'}",
                f"/trainer.run_dir={tmp_path / 'trainer'}",
                f"/trainer.model_store={tmp_path / 'models'}",
                *overrides,
            ],
            log_dir=tmp_path / "logs",
        )
        runner.start()
        runners.append(runner)
        return runner

    yield start
    for runner in runners:
        runner.stop()
