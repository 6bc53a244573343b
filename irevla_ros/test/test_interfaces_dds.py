"""Every custom message, service and action of irevla_interfaces crosses DDS between two processes intact."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from irevla_interfaces import msg
from irevla_interfaces.action import RunIteration
from irevla_interfaces.srv import ResetEpisode, SelectPolicyVersion
from irevla_ros.nodes.common import RELIABLE_QOS, image_to_msg, msg_to_image, to_time_msg

ECHO = Path(__file__).with_name("echo_interfaces.py")


def populated_messages() -> dict[str, object]:
    stamp = to_time_msg(12.345)
    image = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)
    step = msg.StepRecord(
        episode_id="ep-1",
        step_index=7,
        camera_names=["corner", "wrist"],
        images=[image_to_msg(image, stamp, "cam"), image_to_msg(image[::-1].copy(), stamp, "wrist")],
        image_stamps=[stamp, stamp],
        proprioception=[0.1, 0.2, 0.3, 1.0],
        proprioception_names=["x", "y", "z", "gripper"],
        instruction="press the button",
        action=[0.5, -0.5, 0.25, 1.0],
        has_log_prob=True,
        log_prob=-1.5,
        has_value=True,
        value=0.75,
        policy_version="v3",
        intervention=True,
        hold=False,
    )
    step.header.stamp = stamp
    return {
        "StepRecord": step,
        "EpisodeEvent": msg.EpisodeEvent(
            type=msg.EpisodeEvent.END,
            episode_id="ep-1",
            outcome=msg.EpisodeEvent.OUTCOME_SUCCESS,
            label_source=msg.EpisodeEvent.LABEL_SOURCE_OPERATOR,
            task="button-press-v3",
            instruction="press the button",
            policy_version="v3",
            source="policy",
            num_steps=42,
            note="pressed A",
        ),
        "EpisodeStored": msg.EpisodeStored(
            episode_id="ep-1",
            complete=True,
            num_steps=42,
            outcome=1,
            path="/data/ep-1.mcap",
            sha256="ab" * 32,
        ),
        "PolicyVersion": msg.PolicyVersion(
            version_id="v4",
            parent_version="v3",
            location="models/v4",
            sha256="cd" * 32,
            stage="stage2_sft",
            heads_only=False,
            metrics=[msg.Metric(name="success_rate", value=0.8)],
        ),
        "TrainerStatus": msg.TrainerStatus(
            state=msg.TrainerStatus.COLLECTING,
            iteration=2,
            stage="stage1_rl",
            progress=0.5,
            episodes_stored=10,
            episodes_incomplete=1,
            episodes_pending=2,
            active_version="v4",
            store_path="/data",
            metrics=[msg.Metric(name="loss", value=0.1)],
            message="ok",
        ),
        "SessionStatus": msg.SessionStatus(
            state=msg.SessionStatus.RUNNING,
            episode_id="ep-2",
            episode_index=3,
            step=5,
            episodes_done=2,
            successes=1,
            success_rate=0.5,
            task="drawer-open-v3",
            instruction="open the drawer",
            policy_version="v4",
            last_outcome=2,
            message="running",
        ),
        "Metric": msg.Metric(name="x", value=3.5),
    }


def test_every_custom_type_round_trips_between_processes(ros_context, child, spin):
    echo = child([sys.executable, str(ECHO)], name="echo")
    node = Node("interface_tester", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    sent = populated_messages()
    received: dict[str, object] = {}
    pubs = {}
    for name, message in sent.items():
        cls = type(message)
        pubs[name] = node.create_publisher(cls, f"/echo_in/{name}", RELIABLE_QOS)
        node.create_subscription(
            cls, f"/echo_out/{name}", lambda m, n=name: received.__setitem__(n, m), RELIABLE_QOS
        )

    def all_matched() -> bool:
        return all(p.get_subscription_count() > 0 for p in pubs.values()) and all(
            node.count_publishers(f"/echo_out/{n}") > 0 for n in sent
        )

    assert spin(executor, all_matched, timeout=30), echo.output()

    # Seeing the echo's publishers does not mean they have matched our subscriptions yet (discovery runs on both
    # sides, slower under load): a reply sent before that is lost by a volatile writer. So resend what has not
    # come back, once a second; every message is still compared field by field below.
    def all_back() -> bool:
        for name, message in sent.items():
            if name not in received:
                pubs[name].publish(message)
        return spin(executor, lambda: len(received) == len(sent), timeout=1.0)

    assert any(all_back() for _ in range(20)), (sorted(received), echo.output())
    for name, message in sent.items():
        assert received[name] == message, name
    image = msg_to_image(received["StepRecord"].images[1])
    assert (
        image.shape == (24, 32, 3)
        and image[0, 0, 0] == np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)[-1, 0, 0]
    )

    select = node.create_client(SelectPolicyVersion, "/echo/select_policy_version")
    reset = node.create_client(ResetEpisode, "/echo/reset_episode")
    assert spin(executor, lambda: select.service_is_ready() and reset.service_is_ready(), timeout=15)
    f1 = select.call_async(SelectPolicyVersion.Request(version_id="v9"))
    f2 = reset.call_async(ResetEpisode.Request(task="door-open-v3", seed=5))
    assert spin(executor, lambda: f1.done() and f2.done(), timeout=15)
    assert f1.result().success and f1.result().active_version == "v9"
    assert f2.result().task == "door-open-v3" and f2.result().instruction == "seed 5"

    action = ActionClient(node, RunIteration, "/echo/run_iteration")
    assert spin(executor, action.server_is_ready, timeout=15)
    feedback: list[float] = []
    goal_future = action.send_goal_async(
        RunIteration.Goal(reason="operator", announce=True),
        feedback_callback=lambda f: feedback.append(f.feedback.progress),
    )
    assert spin(executor, goal_future.done, timeout=15)
    result_future = goal_future.result().get_result_async()
    assert spin(executor, result_future.done, timeout=15)
    result = result_future.result().result
    assert result.success and result.new_version == "v-operator" and result.metrics[0].name == "loss"
    assert echo.stop() == 0, echo.output()
    node.destroy_node()
