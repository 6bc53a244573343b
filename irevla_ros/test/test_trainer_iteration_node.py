"""The trainer node's iteration half over real DDS: the RunIteration action (progress feedback, result, cancel),
the latched PolicyVersion announcement, and the trainer status; the trainer runs in its own process."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import torch
from iteration_helpers import TINY, write_episode
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from irevla_interfaces.action import RunIteration
from irevla_interfaces.msg import PolicyVersion, TrainerStatus
from irevla_ros import topics
from irevla_ros.nodes.common import LATCHED_QOS
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore


def _start_trainer(child, tmp_path: Path, version: str) -> object:
    params = {
        "store_path": str(tmp_path / "store"),
        "run_dir": str(tmp_path / "trainer"),
        "model_store": str(tmp_path / "models"),
        "initial_version": version,
        "stage1_enabled": False,
        "stage2.steps": 3,
        "stage2.batch_size": 4,
        "status_period": 0.2,
    }
    cmd = ["trainer_node", "--ros-args"]
    for key, value in params.items():
        cmd += ["-p", f"{key}:={str(value).lower() if isinstance(value, bool) else value}"]
    return child(cmd, name="trainer", env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_run_iteration_action_feedback_result_announcement_and_cancel(ros_context, child, spin, tmp_path):
    torch.manual_seed(0)
    models = ModelStore(tmp_path / "models")
    v1 = models.save(VLAModel(TINY), parent=None, stage="stage0_sft").version_id
    with EpisodeStore(tmp_path / "store") as store:
        for i in range(2):
            write_episode(store, f"expert-{i}", "expert", "success", "", seed=i)
        write_episode(store, "policy-0", "policy", "success", v1, seed=5)
    trainer = _start_trainer(child, tmp_path, v1)

    node = Node("iteration_operator", context=ros_context)
    versions: list[PolicyVersion] = []
    status: list[TrainerStatus] = []
    node.create_subscription(PolicyVersion, topics.POLICY_VERSION, versions.append, LATCHED_QOS)
    node.create_subscription(TrainerStatus, topics.TRAINER_STATUS, status.append, LATCHED_QOS)
    client = ActionClient(node, RunIteration, topics.RUN_ITERATION)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    assert spin(executor, lambda: client.server_is_ready(), timeout=120), trainer.output()

    # 1. A goal with a Stage 2 long enough to cancel: cancelled during Stage 2, nothing announced.
    feedback: list[RunIteration.Feedback] = []
    send = client.send_goal_async(
        RunIteration.Goal(reason="operator", max_supervised_steps=5000, announce=True),
        feedback_callback=lambda fb: feedback.append(fb.feedback),
    )
    assert spin(executor, send.done, timeout=30) and send.result().accepted
    goal = send.result()
    assert spin(
        executor, lambda: any(f.stage == "stage2" and f.progress > 0 for f in feedback), timeout=240
    ), (
        feedback,
        trainer.output(),
    )
    cancel = goal.cancel_goal_async()
    assert spin(executor, cancel.done, timeout=30)
    result = goal.get_result_async()
    assert spin(executor, result.done, timeout=120), trainer.output()
    cancelled = result.result()
    assert cancelled.status == 5, cancelled  # GoalStatus.STATUS_CANCELED
    assert not cancelled.result.promoted and "cancelled" in cancelled.result.message
    assert [v.stage for v in versions] == []

    # 2. A normal iteration: feedback through the stages, the promoted version in the result and announced.
    feedback.clear()
    send = client.send_goal_async(
        RunIteration.Goal(reason="operator", max_supervised_steps=3, announce=True),
        feedback_callback=lambda fb: feedback.append(fb.feedback),
    )
    assert spin(executor, send.done, timeout=30) and send.result().accepted
    result = send.result().get_result_async()
    assert spin(executor, result.done, timeout=300), trainer.output()
    done = result.result()
    assert done.status == 4 and done.result.promoted, (done, trainer.output())  # STATUS_SUCCEEDED
    new = done.result.new_version
    assert new.endswith("stage2_sft") and ModelStore(tmp_path / "models").get(new).parent == v1
    assert {"stage2", "validation"} <= {f.stage for f in feedback}
    assert spin(executor, lambda: any(v.version_id == new for v in versions), timeout=30)
    announced = next(v for v in versions if v.version_id == new)
    assert announced.stage == "stage2_sft" and not announced.heads_only and announced.parent_version == v1
    assert spin(executor, lambda: bool(status) and status[-1].active_version == new, timeout=30)
    assert (
        status[-1].state == TrainerStatus.COLLECTING and status[-1].iteration == 2
    )  # a cancel does not end the iteration

    # 3. A late joiner still gets the announcement (latched), as a restarted policy node would.
    late: list[PolicyVersion] = []
    event = threading.Event()
    node.create_subscription(
        PolicyVersion, topics.POLICY_VERSION, lambda m: (late.append(m), event.set()), LATCHED_QOS
    )
    assert spin(executor, event.is_set, timeout=30) and late[-1].version_id == new
    history = json.loads((tmp_path / "trainer" / "iteration.json").read_text())["history"]
    assert [h["promoted"] for h in history] == [True]  # the cancelled one ended in no verdict
    assert (tmp_path / "trainer" / "report" / "report.md").exists()
