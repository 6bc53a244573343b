"""franky-sim as a peer for tests and benchmarks: libfranka's real network protocol on loopback, a MuJoCo FR3
behind it. Each instance runs its own simulator process on a free 127.x.y.z address (franky-sim binds the fixed
ports 1337/1338, so a private address keeps parallel runs apart)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_loopback_address() -> str:
    for _ in range(200):
        host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(1, 254)}"
        try:
            for port in (1337, 1338):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return host
    raise RuntimeError("no free loopback address for franky-sim")


class FrankySim:
    def __init__(self, log: Path) -> None:
        exe = Path(sys.executable).with_name("franky-sim")
        self.host = free_loopback_address()
        env = dict(os.environ, MUJOCO_GL="osmesa", PYOPENGL_PLATFORM="osmesa", PYTHONUNBUFFERED="1")
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [str(exe), "-s", "mujoco", "--hostname", self.host],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "Connect to the server using" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"franky-sim did not start:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def __enter__(self) -> FrankySim:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
