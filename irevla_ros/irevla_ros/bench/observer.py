"""The benchmarks' observer: a node in the benchmark process (own rclpy Context, the graph's domain) that
records when each message of the collection loop arrived, and nothing else (no image decoding).

Arrival time is the DDS reception timestamp the middleware stamps on each sample (rmw MessageInfo
`received_timestamp`, CLOCK_REALTIME ns): the moment the observer's reader received it, independent of how
late this process's executor ran the callback. The callback's own wall time is kept too (`callback_ns`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from irevla_ros.dds_profile import use_default_profile


@dataclass(frozen=True)
class Arrival:
    wall_ns: int  # DDS reception timestamp (falls back to callback_ns where the rmw gives none)
    callback_ns: int  # time.time_ns() when the observer's callback ran
    source_ns: int  # the publisher's write timestamp (same host, same clock), 0 if unknown


@dataclass(frozen=True)
class ActionSeen:
    arrival: Arrival
    episode_id: str
    step_index: int
    hold: bool
    stamp_ns: int  # header stamp (simulated time)


@dataclass(frozen=True)
class RecordSeen:
    arrival: Arrival
    episode_id: str
    step_index: int
    hold: bool
    stamp_ns: int
    camera_names: tuple[str, ...]
    image_stamps_ns: tuple[int, ...]


@dataclass(frozen=True)
class StatusSeen:
    wall_ns: int
    missed_ticks: int
    holds: int
    steps_published: int


@dataclass
class Observations:
    actions: list[ActionSeen] = field(default_factory=list)
    records: list[RecordSeen] = field(default_factory=list)
    images: dict[str, list[tuple[Arrival, int]]] = field(default_factory=dict)  # topic -> (arrival, stamp ns)
    clock: list[tuple[Arrival, int]] = field(default_factory=list)  # (arrival, /clock ns)
    status: list[StatusSeen] = field(default_factory=list)
    started: dict[str, int] = field(default_factory=dict)  # episode id -> wall ns of START
    ended: dict[str, int] = field(default_factory=dict)  # episode id -> wall ns of END
    steps_done: dict[str, int] = field(default_factory=dict)  # episode id -> STEPS_DONE num_steps
    stored: dict[str, tuple[bool, int, int]] = field(default_factory=dict)  # id -> complete, steps, outcome


def _stamp_ns(stamp: object) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)  # type: ignore[attr-defined]


def _arrival(info: object) -> Arrival:
    now = time.time_ns()
    received = int(info.get("received_timestamp", 0) or 0) if isinstance(info, dict) else 0
    source = int(info.get("source_timestamp", 0) or 0) if isinstance(info, dict) else 0
    return Arrival(received or now, now, source)


class Observer:
    """Subscribes to the loop's topics on `domain` and spins on its own thread until `close()`."""

    def __init__(self, domain: int, camera_topics: Sequence[str] = ()) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import Image

        from irevla_interfaces.msg import ArmCommand, EpisodeEvent, EpisodeStored, StepRecord
        from irevla_ros import topics
        from irevla_ros.nodes.common import RELIABLE_QOS, SENSOR_QOS

        self.seen = Observations()
        self._lock = threading.Lock()
        self._episode_event = EpisodeEvent
        self.context = Context()
        use_default_profile()  # before this process's first DDS participant
        rclpy.init(context=self.context, domain_id=domain)
        self.node = Node("irevla_bench_observer", context=self.context)
        node = self.node
        node.create_subscription(ArmCommand, topics.ACTION, self._on_action, 100)
        node.create_subscription(StepRecord, topics.STEP_RECORDS, self._on_record, RELIABLE_QOS)
        node.create_subscription(Clock, "/clock", self._on_clock, 100)
        node.create_subscription(DiagnosticArray, topics.POLICY_STATUS, self._on_status, 10)
        node.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, self._on_event, RELIABLE_QOS)
        node.create_subscription(EpisodeStored, topics.EPISODE_STORED, self._on_stored, RELIABLE_QOS)
        for topic in camera_topics:
            self.seen.images[topic] = []
            node.create_subscription(
                Image, topic, lambda msg, info, t=topic: self._on_image(t, msg, info), SENSOR_QOS
            )
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(node)
        self._thread = threading.Thread(target=self._spin, name="bench-observer", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while self.context.ok():
            try:
                self._executor.spin_once(timeout_sec=0.1)
            except Exception:  # the context was shut down under us at the end of the run
                return

    # --- callbacks (each takes its arrival time first) ---------------------------------------------------
    def _on_action(self, msg: object, info: object) -> None:
        arrival = _arrival(info)
        seen = ActionSeen(
            arrival,
            str(msg.episode_id),  # type: ignore[attr-defined]
            int(msg.step_index),  # type: ignore[attr-defined]
            bool(msg.hold),  # type: ignore[attr-defined]
            _stamp_ns(msg.header.stamp),  # type: ignore[attr-defined]
        )
        with self._lock:
            self.seen.actions.append(seen)

    def _on_record(self, msg: object, info: object) -> None:
        arrival = _arrival(info)
        seen = RecordSeen(
            arrival,
            str(msg.episode_id),  # type: ignore[attr-defined]
            int(msg.step_index),  # type: ignore[attr-defined]
            bool(msg.hold),  # type: ignore[attr-defined]
            _stamp_ns(msg.header.stamp),  # type: ignore[attr-defined]
            tuple(str(c) for c in msg.camera_names),  # type: ignore[attr-defined]
            tuple(_stamp_ns(s) for s in msg.image_stamps),  # type: ignore[attr-defined]
        )
        with self._lock:
            self.seen.records.append(seen)

    def _on_image(self, topic: str, msg: object, info: object) -> None:
        arrival = _arrival(info)
        with self._lock:
            self.seen.images[topic].append((arrival, _stamp_ns(msg.header.stamp)))  # type: ignore[attr-defined]

    def _on_clock(self, msg: object, info: object) -> None:
        arrival = _arrival(info)
        with self._lock:
            self.seen.clock.append((arrival, _stamp_ns(msg.clock)))  # type: ignore[attr-defined]

    def _on_status(self, msg: object) -> None:
        values = {kv.key: kv.value for st in msg.status for kv in st.values}  # type: ignore[attr-defined]
        if "missed_ticks" not in values:
            return
        seen = StatusSeen(
            time.time_ns(),
            int(values["missed_ticks"]),
            int(values.get("holds", 0)),
            int(values.get("steps_published", 0)),
        )
        with self._lock:
            self.seen.status.append(seen)

    def _on_event(self, msg: object) -> None:
        kind = msg.type  # type: ignore[attr-defined]
        episode = str(msg.episode_id)  # type: ignore[attr-defined]
        with self._lock:
            if kind == self._episode_event.START:
                self.seen.started.setdefault(episode, time.time_ns())
            elif kind == self._episode_event.END:
                self.seen.ended.setdefault(episode, time.time_ns())
            elif kind == self._episode_event.STEPS_DONE:
                self.seen.steps_done[episode] = int(msg.num_steps)  # type: ignore[attr-defined]

    def _on_stored(self, msg: object) -> None:
        with self._lock:
            self.seen.stored[str(msg.episode_id)] = (  # type: ignore[attr-defined]
                bool(msg.complete),  # type: ignore[attr-defined]
                int(msg.num_steps),  # type: ignore[attr-defined]
                int(msg.outcome),  # type: ignore[attr-defined]
            )

    # --- reading -------------------------------------------------------------------------------------------
    def snapshot(self) -> Observations:
        """A consistent copy of everything seen so far."""
        with self._lock:
            s = self.seen
            return Observations(
                list(s.actions),
                list(s.records),
                {t: list(v) for t, v in s.images.items()},
                list(s.clock),
                list(s.status),
                dict(s.started),
                dict(s.ended),
                dict(s.steps_done),
                dict(s.stored),
            )

    def count(self, what: str) -> int:
        """How many `what` (an Observations field: actions, records, images, clock...) were seen so far."""
        with self._lock:
            value = getattr(self.seen, what)
            if what == "images":
                return sum(len(v) for v in value.values())
            return len(value)

    def close(self) -> None:
        self.context.try_shutdown()
        self._thread.join(timeout=3.0)
        with contextlib.suppress(Exception):  # already gone with the context
            self.node.destroy_node()
