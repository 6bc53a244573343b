"""ROS domain ids leased per run, so simultaneous runs on one host (two demos, a benchmark beside a test suite)
never see each other's topics: an exclusive file lock per id, held for the run. Fast DDS ports overflow above
domain 232."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_DIR = Path(tempfile.gettempdir()) / "irevla-ros-domain-locks"
DOMAIN_RANGE = range(1, 233)


class NoFreeDomainError(RuntimeError):
    pass


@contextmanager
def leased_domain(seed: int | None = None) -> Iterator[int]:
    """An unused ROS_DOMAIN_ID, held until the context exits."""
    LOCK_DIR.mkdir(exist_ok=True)
    start = ((os.getpid() if seed is None else seed) * 13 + 101) % len(DOMAIN_RANGE)
    for offset in range(len(DOMAIN_RANGE)):
        domain = DOMAIN_RANGE[(start + offset) % len(DOMAIN_RANGE)]
        fd = os.open(LOCK_DIR / f"{domain}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield domain
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        return
    raise NoFreeDomainError("no free ROS domain id: too many parallel ROS runs on this host")
