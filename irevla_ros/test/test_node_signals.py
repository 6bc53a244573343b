"""A node process started by run_nodes stops on SIGINT/SIGTERM with exit code 0 wherever the signal lands.

CI saw the trainer node exit 1 on a plain SIGINT: Python's default handler raised KeyboardInterrupt inside rclpy's
message conversion, which pybind11 reported as "RuntimeError: Unable to convert call argument '0' to Python
object". The child below has the same shape without needing the race: its callback turns a KeyboardInterrupt into
a RuntimeError, as pybind11 does, so it exits 1 if a signal ever raises in Python code.

CI then saw the camera and arm controller nodes exit 1: rclpy's signal handler shuts the context down from its own
thread, so a timer callback that was publishing at that moment raised "publisher's context is invalid" out of
`spin`. The child's `publish` mode publishes after the signal, once the context is down; the `live` mode makes the
same kind of rclpy error on a live context, which must still fail the process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

NODE = textwrap.dedent(
    """
    import os, signal, sys, time
    from rclpy.node import Node
    from std_msgs.msg import String
    from irevla_ros.nodes.common import run_nodes

    SIGNUM, MODE = int(sys.argv[1]), sys.argv[2]

    class SignalsItself(Node):
        def __init__(self, context):
            super().__init__("signals_itself", context=context)
            self.create_timer(0.05, self._tick)
            self._pub = self.create_publisher(String, "signals_itself", 10)
            self._sent = False

        def _tick(self):
            if self._sent:
                return
            self._sent = True
            if MODE == "live":  # an rclpy error with no stop requested: a real failure
                self.destroy_publisher(self._pub)
                self._pub.publish(String())
            try:
                os.kill(os.getpid(), SIGNUM)
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:  # Python bytecode running when the handler is called
                    sum(range(1000))
            except KeyboardInterrupt:
                raise RuntimeError("Unable to convert call argument '0' to Python object") from None
            if MODE == "publish":
                deadline = time.monotonic() + 5.0
                while self.context.ok() and time.monotonic() < deadline:
                    time.sleep(0.01)
                print(f"context ok: {self.context.ok()}", flush=True)
                self._pub.publish(String())  # raises: the publisher's context is invalid
            print("callback finished", flush=True)

        def close(self):
            print("closed", flush=True)

    sys.exit(run_nodes(lambda context: [SignalsItself(context)], []))
    """
)


def _run_child(signum: int, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NODE, str(int(signum)), mode], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_callback_stops_the_node_cleanly(signum, ros_domain):
    done = _run_child(signum, "compute")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "callback finished" in done.stdout and "closed" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_publish_cut_off_by_the_shutdown_is_the_stop_not_a_crash(signum, ros_domain):
    done = _run_child(signum, "publish")
    assert "context ok: False" in done.stdout, (
        done.stdout + done.stderr
    )  # the publish did meet a dead context
    assert done.returncode == 0, done.stdout + done.stderr
    assert "callback finished" not in done.stdout and "closed" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "cut off by the shutdown" in done.stderr, done.stderr


def test_an_rclpy_error_on_a_live_context_still_fails_the_process(ros_domain):
    done = _run_child(signal.SIGINT, "live")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "closed" in done.stdout and "Traceback" in done.stderr, done.stdout + done.stderr
