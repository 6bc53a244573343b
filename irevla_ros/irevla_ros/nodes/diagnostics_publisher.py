"""Publishes a node's `diagnostics.Status`es as diagnostic_msgs/DiagnosticArray on /diagnostics.

Like diagnostic_updater: about once a second (`period`); in between the statuses are computed every
`check_period`, and a status whose level got worse is published at once, so a camera that stops shows within a
check period of crossing its threshold instead of up to a second later. Recoveries wait for the next regular
publish. The timers run on the steady clock: diagnostics keep coming while simulated time is paused (the ages
they report are in the node's ROS time, see `diagnostics.py`). A `statuses` callback that raises becomes an
ERROR status naming the exception: a broken check must not look like silence or health.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.clock import Clock, ClockType
from rclpy.node import Node

from irevla_ros.diagnostics import Level, Status, status_name

DIAGNOSTICS_TOPIC = "/diagnostics"


def to_message(status: Status) -> DiagnosticStatus:
    return DiagnosticStatus(
        level=bytes([int(status.level)]),
        name=status.name,
        message=status.message,
        hardware_id=status.hardware_id,
        values=[KeyValue(key=k, value=v) for k, v in status.values],
    )


class DiagnosticsPublisher:
    """Publishes `statuses()` of `node` on /diagnostics (and on `also`: e.g. the policy's /policy/status)."""

    def __init__(
        self,
        node: Node,
        statuses: Callable[[], Sequence[Status]],
        period: float = 1.0,
        check_period: float = 0.25,
        also: Sequence[str] = (),
        callback_group: object = None,
    ) -> None:
        if not 0 < check_period <= period:
            raise ValueError(f"need 0 < check_period ({check_period}) <= period ({period})")
        self._node = node
        self._statuses = statuses
        self._period = period
        self._publishers = [node.create_publisher(DiagnosticArray, t, 10) for t in (DIAGNOSTICS_TOPIC, *also)]
        self._published_levels: dict[str, Level] = {}
        self._published_at = -float("inf")
        self.published = 0
        self.latest: tuple[Status, ...] = ()
        node.create_timer(
            check_period,
            self.check,
            callback_group=callback_group,  # type: ignore[arg-type]
            clock=Clock(clock_type=ClockType.STEADY_TIME),
        )

    def _compute(self) -> tuple[Status, ...]:
        try:
            return tuple(self._statuses())
        except Exception as exc:
            self._node.get_logger().error(
                f"diagnostics check failed: {traceback.format_exc()}", throttle_duration_sec=10.0
            )
            return (
                Status(
                    status_name(self._node.get_name(), "diagnostics"),
                    Level.ERROR,
                    f"diagnostics check failed: {type(exc).__name__}: {exc}",
                ),
            )

    def check(self) -> None:
        """Compute the statuses; publish them when a period has passed or a level got worse."""
        statuses = self._compute()
        self.latest = statuses
        now = time.monotonic()
        worse = any(s.level > self._published_levels.get(s.name, Level.OK) for s in statuses)
        if worse or now - self._published_at >= self._period * 0.99:
            self.publish(statuses)

    def publish(self, statuses: Sequence[Status] | None = None) -> None:
        """Publish now (diagnostic_updater's force_update): the given statuses or freshly computed ones."""
        statuses = self._compute() if statuses is None else tuple(statuses)
        msg = DiagnosticArray()
        msg.header.stamp = self._node.get_clock().now().to_msg()
        msg.status = [to_message(s) for s in statuses]
        for publisher in self._publishers:
            publisher.publish(msg)
        self._published_levels = {s.name: s.level for s in statuses}
        self._published_at = time.monotonic()
        self.published += 1
