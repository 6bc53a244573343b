"""The episode manager's resets against a reset service over DDS: a failed reset is tried again after a doubling
back-off, a reset nobody answers is abandoned at reset_timeout (its late answer changes nothing), and the
operator's reset request tries at once. The peer serves /sim/reset_episode the way sim_cell_node does, refusing
or not answering on purpose."""

from __future__ import annotations

import time

import pytest
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.task import Future
from std_srvs.srv import Trigger

from irevla_interfaces.msg import EpisodeEvent
from irevla_interfaces.srv import ResetEpisode
from irevla_ros import topics
from irevla_ros.nodes.common import RELIABLE_QOS
from irevla_ros.nodes.episode_manager_node import RESET_RETRY_FIRST, EpisodeManagerNode


class ResetPeer:
    """Serves /sim/reset_episode; `answers` decides each call in turn: True succeed, False refuse, None never
    answer (until `release()`)."""

    def __init__(self, context: object, answers: list[bool | None]) -> None:
        self.node = Node("reset_peer", context=context)  # type: ignore[arg-type]
        self.answers = list(answers)
        self.calls: list[float] = []  # monotonic arrival times
        self.held: list[Future] = []
        self.starts: list[EpisodeEvent] = []
        # Reentrant: a call left unanswered (awaiting) must not hold the next one back.
        self.node.create_service(
            ResetEpisode, topics.SIM_RESET, self._serve, callback_group=ReentrantCallbackGroup()
        )
        self.node.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, self._on_event, RELIABLE_QOS)

    def _on_event(self, msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.START:
            self.starts.append(msg)

    async def _serve(
        self, request: ResetEpisode.Request, response: ResetEpisode.Response
    ) -> ResetEpisode.Response:
        self.calls.append(time.monotonic())
        answer = self.answers.pop(0) if self.answers else True
        if answer is None:
            held: Future = Future()
            self.held.append(held)
            await held
            answer = True
        response.success = bool(answer)
        response.message = "at the new scene" if answer else f"scene would not load (call {len(self.calls)})"
        response.task = request.task
        return response

    def release(self) -> None:
        for held in self.held:
            held.set_result(True)


def _manager(context: object, reset_timeout: float = 10.0) -> EpisodeManagerNode:
    return EpisodeManagerNode(
        context=context,
        parameter_overrides=[
            Parameter("required_nodes", Parameter.Type.STRING_ARRAY, ["/reset_peer"]),
            Parameter("tasks", Parameter.Type.STRING_ARRAY, ["reach-v3"]),
            Parameter("success_source", value="none"),
            Parameter("episode_timeout", value=60.0),
            Parameter("reset_timeout", value=reset_timeout),
        ],
    )


@pytest.fixture
def graph(ros_context):
    nodes: list[Node] = []
    executor = SingleThreadedExecutor(context=ros_context)

    def add(node: Node) -> Node:
        nodes.append(node)
        executor.add_node(node)
        return node

    yield executor, add
    executor.shutdown()
    for node in nodes:
        node.destroy_node()


def test_a_failing_reset_is_retried_after_a_doubling_back_off_then_the_episode_starts(
    ros_context, graph, spin
):
    executor, add = graph
    peer = ResetPeer(ros_context, [False, False, False, True])
    add(peer.node)
    manager = add(_manager(ros_context))
    assert spin(executor, lambda: peer.starts, timeout=30), (peer.calls, manager._reset_error)
    assert len(peer.calls) == 4 and len(peer.starts) == 1
    gaps = [b - a for a, b in zip(peer.calls, peer.calls[1:], strict=False)]
    for gap, wait in zip(
        gaps, (RESET_RETRY_FIRST, 2 * RESET_RETRY_FIRST, 4 * RESET_RETRY_FIRST), strict=True
    ):
        assert wait - 0.05 <= gap <= wait + 1.0, (
            gaps
        )  # the back-off, plus a tick and a loaded machine's slack
    assert manager._reset_error is None and manager._reset_retry_at is None  # a success clears the back-off


def test_an_unanswered_reset_is_abandoned_at_reset_timeout_and_its_late_answer_changes_nothing(
    ros_context, graph, spin
):
    executor, add = graph
    peer = ResetPeer(ros_context, [None, True])
    add(peer.node)
    manager = add(_manager(ros_context, reset_timeout=1.0))
    assert spin(executor, lambda: len(peer.calls) >= 1, timeout=20)
    assert spin(executor, lambda: manager._reset_error is not None, timeout=5)
    assert "no answer within reset_timeout (1 s)" in manager._reset_error
    assert spin(executor, lambda: peer.starts, timeout=10), peer.calls
    gap = peer.calls[1] - peer.calls[0]
    assert 1.0 + RESET_RETRY_FIRST - 0.05 <= gap <= 1.0 + RESET_RETRY_FIRST + 1.0, gap
    episode = manager.session.episode
    assert episode is not None
    peer.release()  # the first call answers now, long after it was abandoned
    spin(executor, lambda: False, timeout=1.0)
    assert len(peer.starts) == 1 and manager.session.episode is episode  # no second start, same episode


def test_the_operators_reset_request_skips_the_back_off(ros_context, graph, spin):
    executor, add = graph
    peer = ResetPeer(ros_context, [False, False, False, True])
    add(peer.node)
    manager = add(_manager(ros_context))
    # the third refusal received: the next try is 4 s away
    assert spin(executor, lambda: manager._reset_failures == 3 and manager._reset_call is None, timeout=20)
    reset = peer.node.create_client(Trigger, topics.RESET_EPISODE)
    assert reset.wait_for_service(timeout_sec=10.0)
    asked = time.monotonic()
    future = reset.call_async(Trigger.Request())
    assert spin(executor, lambda: future.done() and len(peer.calls) >= 4, timeout=10)
    assert future.result().success, future.result().message
    assert peer.calls[3] - asked < 1.0, peer.calls[3] - asked  # not at the end of the 4 s back-off
    assert spin(executor, lambda: peer.starts, timeout=10)
    assert manager._reset_error is None
