"""The policy slot: which policy acts now, and how a new version takes its place without the arm noticing.

A new version is loaded and validated on a background thread (the control loop never waits for it); the control
loop picks it up at the start of its next tick with `take_swap()`, so the version changes between two ticks and
every step record names the version that produced its action. A version that fails to load or validate is
refused with its reason, and the running one stays. `rollback()` returns to the previous version the same way.

`close()` ends it before the process exits: no new loads, the loader's resources released (the VLA's validator
child), the loading threads joined, and every policy it holds released (the VLA's ONNX Runtime sessions) while
the interpreter is still whole. A load thread left running at interpreter exit, or a session destroyed during
its teardown, runs native code against libraries that are being unloaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from irevla_ros.policies.base import Policy

PolicyLoader = Callable[..., Policy]  # (version, **hints) -> Policy; may have close() (see PolicySlot.close)


@dataclass
class SlotEvent:
    kind: str  # "loaded", "swapped", "rejected", "rolled_back"
    version: str
    detail: str = ""
    seconds: float = 0.0  # load + validation time for "loaded"/"rejected"


class PolicySlot:
    def __init__(self, initial: Policy, loader: PolicyLoader | None = None) -> None:
        self.active = initial
        self.previous: Policy | None = None
        self._loader = loader
        self._pending: Policy | None = None
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Thread] = {}
        self.events: list[SlotEvent] = []
        self.announced_at: dict[str, float] = {}
        self._closing = False

    def _record(self, event: SlotEvent) -> None:
        with self._lock:
            self.events.append(event)

    def request(self, version: str, **hints: object) -> threading.Thread | None:
        """Load and validate `version` in the background; None if it is active, pending or already loading.
        `hints` (e.g. heads_only=True from the announcement) are passed to the loader as keywords."""
        if self._loader is None:
            raise ValueError("this policy slot has no loader: the active policy does not take versions")
        with self._lock:
            busy = version in self._loading and self._loading[version].is_alive()
            current = self.active.version == version or (
                self._pending is not None and self._pending.version == version
            )
            if busy or current or self._closing:
                return None
            self.announced_at[version] = time.monotonic()
            thread = threading.Thread(
                target=self._load, args=(version, hints), name=f"load-{version}", daemon=True
            )
            self._loading[version] = thread
        thread.start()
        return thread

    def _load(self, version: str, hints: dict[str, object]) -> None:
        assert self._loader is not None
        started = time.monotonic()
        try:
            policy = self._loader(version, **hints) if hints else self._loader(version)
        except Exception as exc:  # any failure to load or validate refuses the version, never the node
            self._record(
                SlotEvent("rejected", version, f"{type(exc).__name__}: {exc}", time.monotonic() - started)
            )
            return
        with self._lock:
            closing = self._closing
            if not closing:
                self._pending = policy
        if closing:  # finished while the slot closed: nobody will run it
            _release(policy)
            return
        note = str(getattr(policy, "load_note", "") or "")
        self._record(SlotEvent("loaded", version, note, seconds=time.monotonic() - started))

    def rollback(self) -> str:
        """Schedule a return to the previous version (at the next tick); returns its name."""
        with self._lock:
            if self.previous is None:
                raise ValueError("no previous version to roll back to")
            self._pending = self.previous
            version = self.previous.version
        self._record(SlotEvent("rolled_back", version))
        return version

    def take_swap(self) -> Policy | None:
        """Called by the control loop at the start of a tick: installs a pending version, if any."""
        with self._lock:
            if self._pending is None:
                return None
            self.previous, self.active, self._pending = self.active, self._pending, None
            new = self.active
            announced = self.announced_at.pop(new.version, None)
        # seconds: from the request (announcement) to this tick; 0 for a rollback's return
        waited = time.monotonic() - announced if announced is not None else 0.0
        self._record(SlotEvent("swapped", new.version, seconds=waited))
        return new

    def close(self, timeout: float = 10.0) -> list[str]:
        """Stop loading and release every policy held; returns the versions whose load thread did not end within
        `timeout` (seconds, all threads together)."""
        with self._lock:
            self._closing = True
            threads = list(self._loading.values())
        close_loader = getattr(self._loader, "close", None)
        if callable(close_loader):
            close_loader()  # e.g. stops a validator child, so the thread waiting on it ends now
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            held = [p for p in (self._pending, self.previous, self.active) if p is not None]
            self._pending = self.previous = None
        for policy in {id(p): p for p in held}.values():
            _release(policy)
        return [t.name.removeprefix("load-") for t in threads if t.is_alive()]


def _release(policy: Policy) -> None:
    close = getattr(policy, "close", None)
    if callable(close):
        close()
