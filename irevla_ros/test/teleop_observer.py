"""Test-side observer of a running graph for the teleop tests: every message it needs, keyed by stamp."""

from __future__ import annotations

import threading

from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from irevla_interfaces.msg import ArmCommand, EpisodeEvent, EpisodeStored, StepRecord
from irevla_ros import topics
from irevla_ros.nodes.common import RELIABLE_QOS, time_to_ns


class Observer:
    def __init__(self, context: object, name: str = "teleop_observer") -> None:
        self.node = Node(name, context=context)  # type: ignore[arg-type]
        self.lock = threading.Lock()
        self.records: dict[tuple[str, int], StepRecord] = {}
        self.teleop: dict[int, ArmCommand] = {}
        self.expert: dict[int, ArmCommand] = {}
        self.actions: dict[tuple[str, int], ArmCommand] = {}
        self.starts: dict[str, EpisodeEvent] = {}
        self.acks: dict[str, EpisodeStored] = {}
        sub = self.node.create_subscription
        sub(StepRecord, topics.STEP_RECORDS, self._on_record, RELIABLE_QOS)
        sub(ArmCommand, topics.TELEOP_COMMAND, lambda m: self._keep(self.teleop, m), 100)
        sub(ArmCommand, topics.SIM_EXPERT_ACTION, lambda m: self._keep(self.expert, m), 100)
        sub(ArmCommand, topics.ACTION, self._on_action, 100)
        sub(EpisodeEvent, topics.EPISODE_EVENTS, self._on_event, RELIABLE_QOS)
        sub(
            EpisodeStored,
            topics.EPISODE_STORED,
            lambda m: self.acks.__setitem__(m.episode_id, m),
            RELIABLE_QOS,
        )
        self.executor = SingleThreadedExecutor(context=context)  # type: ignore[arg-type]
        self.executor.add_node(self.node)

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
