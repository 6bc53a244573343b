"""Test-side observer of a running graph for the teleop tests: every message it needs, keyed by stamp."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.subscription import Subscription

from irevla_interfaces.msg import ArmCommand, EpisodeEvent, EpisodeStored, StepRecord
from irevla_ros import topics
from irevla_ros.nodes.common import RELIABLE_QOS, listen_to_episodes_once_connected, time_to_ns

NAME = "teleop_observer"


def required_nodes(*nodes: str) -> str:
    """The episode manager's required_nodes with this observer among them: the session's first START waits until
    the observer listens to the episode events, which it does only once every topic it watches or publishes is
    connected. Without it, an observer that discovers the graph a second late (Fast DDS, even on a quiet machine)
    misses the START its script and its checks are timed from, or the first steps' messages."""
    return f"/episode_manager.required_nodes=[{','.join([*nodes, '/' + NAME])}]"


class Observer:
    def __init__(self, context: object, name: str = NAME) -> None:
        self.node = Node(name, context=context)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.records: dict[tuple[str, int], StepRecord] = {}
        self.teleop: dict[int, ArmCommand] = {}
        self.expert: dict[int, ArmCommand] = {}
        self.actions: dict[tuple[str, int], ArmCommand] = {}
        self.starts: dict[str, EpisodeEvent] = {}
        self.acks: dict[str, EpisodeStored] = {}
        self._subscriptions: list[Subscription] = []
        self._publishers: list[Publisher] = []
        sub = self.subscribe
        sub(StepRecord, topics.STEP_RECORDS, self._on_record, RELIABLE_QOS)
        sub(ArmCommand, topics.TELEOP_COMMAND, lambda m: self._keep(self.teleop, m), 100)
        sub(ArmCommand, topics.SIM_EXPERT_ACTION, lambda m: self._keep(self.expert, m), 100)
        sub(ArmCommand, topics.ACTION, self._on_action, 100)
        sub(
            EpisodeStored,
            topics.EPISODE_STORED,
            lambda m: self.acks.__setitem__(m.episode_id, m),
            RELIABLE_QOS,
        )
        listen_to_episodes_once_connected(
            self.node, self._subscriptions, self._on_event, outputs=self._publishers
        )
        self.executor = SingleThreadedExecutor(context=context)  # type: ignore[arg-type]
        self.executor.add_node(self.node)

    def subscribe(
        self, msg_type: type, topic: str, callback: Callable[[Any], None], qos: Any
    ) -> Subscription:
        """A subscription whose publisher must be connected before the observer listens to the episode events."""
        subscription = self.node.create_subscription(msg_type, topic, callback, qos)
        self._subscriptions.append(subscription)
        return subscription

    def publisher(self, msg_type: type, topic: str, qos: Any) -> Publisher:
        """A publisher whose subscriber must be connected before the observer listens to the episode events."""
        publisher = self.node.create_publisher(msg_type, topic, qos)
        self._publishers.append(publisher)
        return publisher

    def _keep(self, into: dict[int, ArmCommand], msg: ArmCommand) -> None:
        with self.lock:
            into[time_to_ns(msg.header.stamp)] = msg

    def _on_record(self, msg: StepRecord) -> None:
        with self.lock:
            self.records[(msg.episode_id, msg.step_index)] = msg

    def _on_action(self, msg: ArmCommand) -> None:
        with self.lock:
            self.actions[(msg.episode_id, msg.step_index)] = msg

    def _on_event(self, msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.START:
            self.starts[msg.episode_id] = msg

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
