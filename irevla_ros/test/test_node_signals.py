"""A node process started by run_nodes stops on SIGINT/SIGTERM with exit code 0 wherever the signal lands.

CI saw the trainer node exit 1 on a plain SIGINT: Python's default handler raised KeyboardInterrupt inside rclpy's
message conversion, which pybind11 reported as "RuntimeError: Unable to convert call argument '0' to Python
object". The child below has the same shape without needing the race: its callback turns a KeyboardInterrupt into
a RuntimeError, as pybind11 does, so it exits 1 if a signal ever raises in Python code.
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
    from irevla_ros.nodes.common import run_nodes

    SIGNUM = int(sys.argv[1])

    class SignalsItself(Node):
        def __init__(self, context):
            super().__init__("signals_itself", context=context)
            self.create_timer(0.05, self._tick)
            self._sent = False

        def _tick(self):
            if self._sent:
                return
            self._sent = True
            try:
                os.kill(os.getpid(), SIGNUM)
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline:  # Python bytecode running when the handler is called
                    sum(range(1000))
            except KeyboardInterrupt:
                raise RuntimeError("Unable to convert call argument '0' to Python object") from None
            print("callback finished", flush=True)

        def close(self):
            print("closed", flush=True)

    sys.exit(run_nodes(lambda context: [SignalsItself(context)], []))
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_callback_stops_the_node_cleanly(signum, ros_domain):
    done = subprocess.run(
        [sys.executable, "-c", NODE, str(int(signum))], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "callback finished" in done.stdout and "closed" in done.stdout, done.stdout + done.stderr
