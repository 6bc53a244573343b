"""The episode manager node over DDS: resets through the cell's service, simulator and operator outcomes (Trigger
services and the gamepad), operator labels overriding automatic ones, and the RViz overlay."""

from __future__ import annotations

import numpy as np
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, Joy
from std_msgs.msg import Bool
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from irevla_interfaces.msg import EpisodeEvent, SessionStatus
from irevla_interfaces.srv import ResetEpisode
from irevla_ros import topics
from irevla_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS, image_to_msg, msg_to_image
from irevla_ros.nodes.episode_manager_node import EpisodeManagerNode


def test_session_over_ros(ros_context, spin):
    manager = EpisodeManagerNode(
        context=ros_context,
        parameter_overrides=[
            Parameter("tasks", value=["button-press-v3", "door-open-v3"]),
            Parameter("episode_timeout", value=30.0),
            Parameter(
                "required_nodes", Parameter.Type.STRING_ARRAY, ["/cell_and_operator"]
            ),  # this test is the whole rest of the graph
        ],
    )
    peer = Node("cell_and_operator", context=ros_context)
    resets: list[str] = []
    requested_seeds: list[int] = []

    def reset(request: ResetEpisode.Request, response: ResetEpisode.Response) -> ResetEpisode.Response:
        resets.append(request.task)
        requested_seeds.append(request.seed)
        response.success, response.task, response.instruction = (
            True,
            request.task,
            f"instruction {len(resets)}",
        )
        response.seed = 2**40 + len(resets)  # the layout seed the cell says it reset with
        return response

    peer.create_service(ResetEpisode, topics.SIM_RESET, reset)
    events: list[EpisodeEvent] = []
    statuses: list[SessionStatus] = []
    markers: list[MarkerArray] = []
    overlays: list[Image] = []
    peer.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, events.append, RELIABLE_QOS)
    peer.create_subscription(SessionStatus, topics.SESSION_STATUS, statuses.append, LATCHED_QOS)
    peer.create_subscription(MarkerArray, topics.OVERLAY_MARKERS, markers.append, 10)
    peer.create_subscription(Image, topics.OVERLAY_IMAGE, overlays.append, SENSOR_QOS)
    success_pub = peer.create_publisher(Bool, topics.SIM_SUCCESS, 10)
    joy_pub = peer.create_publisher(Joy, topics.JOY, 10)
    image_pub = peer.create_publisher(Image, topics.CAMERA_IMAGE, SENSOR_QOS)
    label_success = peer.create_client(Trigger, topics.LABEL_SUCCESS)
    executor = MultiThreadedExecutor(context=ros_context)
    executor.add_node(manager)
    executor.add_node(peer)

    def starts() -> list[EpisodeEvent]:
        return [e for e in events if e.type == EpisodeEvent.START]

    def ends() -> list[EpisodeEvent]:
        return [e for e in events if e.type == EpisodeEvent.END]

    assert spin(executor, lambda: len(starts()) == 1, timeout=20)
    first = starts()[0]
    assert resets == ["button-press-v3"] and first.instruction == "instruction 1"
    assert requested_seeds == [-1]  # the manager lets the cell choose the layout...
    assert first.scene_seed == 2**40 + 1  # ...and START passes on the seed it chose, for the store to record

    # Teleop: the failure button (1) ends the running episode with an operator label.
    joy_pub.publish(Joy(buttons=[0, 1, 0, 0]))
    assert spin(executor, lambda: len(ends()) == 1, timeout=10)
    end = ends()[0]
    assert end.episode_id == first.episode_id
    assert (end.outcome, end.label_source) == (
        EpisodeEvent.OUTCOME_FAILURE,
        EpisodeEvent.LABEL_SOURCE_OPERATOR,
    )
    assert spin(executor, lambda: len(starts()) == 2, timeout=10)
    assert resets[-1] == "door-open-v3"
    assert starts()[1].scene_seed == 2**40 + 2 and ends()[0].scene_seed == -1  # each START its own reset's

    # The simulator's success signal ends the second one automatically...
    success_pub.publish(Bool(data=True))
    assert spin(executor, lambda: len(ends()) == 2, timeout=10)
    assert (ends()[1].outcome, ends()[1].label_source) == (
        EpisodeEvent.OUTCOME_SUCCESS,
        EpisodeEvent.LABEL_SOURCE_SIMULATOR,
    )
    # An operator label given afterwards (the service) replaces the automatic label of the last episode.
    assert spin(executor, label_success.service_is_ready, timeout=10)
    future = label_success.call_async(Trigger.Request())
    assert spin(executor, future.done, timeout=10) and future.result().success
    assert spin(executor, lambda: any(e.type == EpisodeEvent.LABEL for e in events), timeout=10)
    labels = [e for e in events if e.type == EpisodeEvent.LABEL]
    assert labels and labels[-1].episode_id == ends()[1].episode_id
    assert labels[-1].label_source == EpisodeEvent.LABEL_SOURCE_OPERATOR

    # A malformed gamepad message (no buttons) changes nothing and the node keeps going.
    n_events = len(events)
    joy_pub.publish(Joy(buttons=[]))
    assert spin(executor, lambda: len(statuses) > 5, timeout=10)
    assert all(e.type != EpisodeEvent.END for e in events[n_events:])

    # RViz overlay: text marker with the running success rate, and an annotated camera image.
    assert spin(executor, lambda: any("success 1/2" in m.markers[0].text for m in markers), timeout=10)
    frame = np.full((96, 128, 3), 40, np.uint8)
    assert spin(executor, lambda: manager.count_subscribers(topics.OVERLAY_IMAGE) > 0, timeout=5)

    def overlay_seen() -> bool:
        image_pub.publish(image_to_msg(frame, peer.get_clock().now().to_msg(), "camera"))
        return bool(overlays)

    assert spin(executor, overlay_seen, timeout=10, period=0.1)
    annotated = msg_to_image(overlays[-1])
    assert annotated.shape == frame.shape and not np.array_equal(annotated, frame)
    assert statuses[-1].episodes_done == 2 and statuses[-1].successes == 1
    manager.destroy_node()
    peer.destroy_node()


def test_the_overlay_shows_the_operators_takeovers_of_a_policy_episode(ros_context, spin):
    manager = EpisodeManagerNode(
        context=ros_context,
        parameter_overrides=[
            Parameter("tasks", value=["button-press-v3"]),
            Parameter("episode_timeout", value=60.0),
            Parameter("source", value="policy"),
            Parameter("success_source", value="none"),
            Parameter("required_nodes", Parameter.Type.STRING_ARRAY, ["/cell_and_operator"]),
        ],
    )
    peer = Node("cell_and_operator", context=ros_context)

    def reset(request: ResetEpisode.Request, response: ResetEpisode.Response) -> ResetEpisode.Response:
        response.success, response.task, response.seed = True, request.task, 7
        return response

    peer.create_service(ResetEpisode, topics.SIM_RESET, reset)
    events: list[EpisodeEvent] = []
    markers: list[MarkerArray] = []
    peer.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, events.append, RELIABLE_QOS)
    peer.create_subscription(MarkerArray, topics.OVERLAY_MARKERS, markers.append, 10)
    engaged = peer.create_publisher(Bool, topics.TELEOP_ENGAGED, LATCHED_QOS)  # what teleop_node publishes
    executor = MultiThreadedExecutor(context=ros_context)
    executor.add_node(manager)
    executor.add_node(peer)

    def text() -> str:
        return markers[-1].markers[0].text if markers else ""

    def press(held: bool) -> None:
        engaged.publish(Bool(data=held))

    try:
        assert spin(executor, lambda: any(e.type == EpisodeEvent.START for e in events), timeout=20)
        assert "TAKEOVER" not in text() and "takeovers" not in text()
        press(True)
        assert spin(executor, lambda: text().startswith("OPERATOR TAKEOVER") and "takeovers 1" in text(), 10)
        (marker,) = markers[-1].markers
        np.testing.assert_allclose(
            [marker.color.r, marker.color.g, marker.color.b], [0.2, 0.5, 1.0], rtol=1e-6
        )
        press(False)  # handed back: the count stays for the episode, the banner goes
        assert spin(executor, lambda: "takeovers 1" in text() and "OPERATOR" not in text(), 10)
        press(True)
        assert spin(executor, lambda: text().startswith("OPERATOR TAKEOVER") and "takeovers 2" in text(), 10)
    finally:
        executor.shutdown()
        manager.destroy_node()
        peer.destroy_node()
