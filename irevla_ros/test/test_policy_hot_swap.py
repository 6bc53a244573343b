"""The VLA in the policy node: a 10 Hz loop keeps running through a hot swap (the version in the step records changes
at one tick, no tick is missed), corrupt versions are refused while the running one stays, rollback works, and
missing/stale camera frames and malformed images turn ticks into holds."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_srvs.srv import Trigger
from test_vla_store import _perturb, _reseal, _rewrite_tensor

from irevla_interfaces.msg import EpisodeEvent, PolicyVersion, StepRecord
from irevla_ros import topics
from irevla_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, SENSOR_QOS, image_to_msg
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore
from irevla_ros.vla.tiny_models import make_tiny_blip2


def _store(tmp_path) -> tuple[ModelStore, list[str]]:
    base = make_tiny_blip2(tmp_path / "blip2")
    cfg = VLAConfig(backbone="hf", hf_model_dir=str(base), latent_dim=64, head_hidden=(64,), lora_rank=4)
    store = ModelStore(tmp_path / "models")
    ids = []
    for seed, stage in (
        (1, "stage0_sft"),
        (2, "stage2_sft"),
        (3, "stage2_sft"),
        (4, "stage2_sft"),
        (5, "stage2_sft"),
    ):
        torch.manual_seed(seed)
        ids.append(store.save(_perturb(VLAModel(cfg), seed), parent=None, stage=stage).version_id)
    # v3: a flipped byte (bad checksum); v4: NaN weights (resealed); v5: a tensor of the wrong shape (resealed)
    data = bytearray((store.root / ids[2] / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (store.root / ids[2] / "model.safetensors").write_bytes(bytes(data))
    _rewrite_tensor(store.root / ids[3], "action_head.0.weight", lambda t: t.fill_(float("nan")))
    _reseal(store.root / ids[3])
    _rewrite_tensor(
        store.root / ids[4], "action_head.0.weight", lambda t: torch.zeros(t.shape[0] + 1, t.shape[1])
    )
    _reseal(store.root / ids[4])
    return store, ids


def test_hot_swap_at_10hz_refusals_rollback_and_holds(ros_context, child, tmp_path):
    store, (v1, v2, v_checksum, v_nan, v_shape) = _store(tmp_path)
    # The policy node runs in its own process, as deployed; this test is the cell and the trainer around it.
    policy = child(
        [
            shutil.which("policy_node") or "policy_node",
            "--ros-args",
            "-p",
            "policy:=vla",
            "-p",
            f"model_store:={store.root}",
            "-p",
            f"version:={v1}",
            "-p",
            "max_image_age:=0.5",
        ],
        name="policy",
    )
    peer = Node("cell", context=ros_context)
    records: list[StepRecord] = []
    missed: list[int] = []
    lock = threading.Lock()

    def on_record(msg: StepRecord) -> None:
        with lock:
            records.append(msg)

    def on_status(msg: DiagnosticArray) -> None:
        for kv in msg.status[0].values:
            if kv.key == "missed_ticks":
                missed.append(int(kv.value))

    peer.create_subscription(StepRecord, topics.STEP_RECORDS, on_record, RELIABLE_QOS)
    peer.create_subscription(DiagnosticArray, topics.POLICY_STATUS, on_status, 10)
    image_pub = peer.create_publisher(Image, topics.CAMERA_IMAGE, SENSOR_QOS)
    pose_pub = peer.create_publisher(PoseStamped, topics.EE_POSE, 10)
    joint_pub = peer.create_publisher(JointState, topics.JOINT_STATES, 10)
    event_pub = peer.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
    version_pub = peer.create_publisher(PolicyVersion, topics.POLICY_VERSION, LATCHED_QOS)
    rollback = peer.create_client(Trigger, topics.ROLLBACK)
    state = {"camera": "ok", "x": 0.0}
    rng = np.random.default_rng(0)

    def publish_sensors() -> None:
        stamp = peer.get_clock().now().to_msg()
        if state["camera"] == "ok":
            image_pub.publish(
                image_to_msg(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), stamp, "camera")
            )
        elif state["camera"] == "malformed":
            bad = image_to_msg(np.zeros((48, 64, 3), np.uint8), stamp, "camera")
            bad.data = bad.data[:-7]
            image_pub.publish(bad)
        pose = PoseStamped()
        pose.header.stamp = stamp
        pose.pose.position.x = state["x"]
        pose_pub.publish(pose)
        joint_pub.publish(JointState(name=["gripper_opening"], position=[1.0]))

    peer.create_timer(0.05, publish_sensors)
    executor = MultiThreadedExecutor(context=ros_context)
    executor.add_node(peer)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    def wait(predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def versions() -> list[str]:
        with lock:
            return [r.policy_version for r in records if not r.hold]

    assert wait(lambda: peer.count_subscribers(topics.EPISODE_EVENTS) > 0, timeout=60), policy.output()
    event_pub.publish(
        EpisodeEvent(type=EpisodeEvent.START, episode_id="ep-swap", instruction="press the button")
    )
    assert wait(lambda: len(versions()) >= 10, timeout=30), policy.output()
    assert set(versions()) == {v1}
    version_pub.publish(PolicyVersion(version_id=v2, stage="stage2_sft"))
    assert wait(lambda: v2 in versions() and versions()[-1] == v2 and len(versions()) > 40, timeout=60), (
        policy.output()
    )

    # refused versions: the running one stays, each with its reason in the log
    for bad, reason in ((v_checksum, "checksum mismatch"), (v_nan, "non-finite"), (v_shape, "shape")):
        version_pub.publish(PolicyVersion(version_id=bad, stage="stage2_sft"))
        assert wait(
            lambda b=bad, r=reason: (
                f"version {b} refused, {v2} stays" in policy.output()
                and r in policy.output().split(f"version {b} refused")[1].splitlines()[0]
            ),
            60,
        ), policy.output()
    with lock:
        count = len(records)
    assert wait(lambda: len(records) > count + 10, timeout=10)
    assert versions()[-1] == v2

    # the swap happened at one tick, with no tick missed: consecutive indices, stamps 0.1 s apart
    with lock:
        acted = [r for r in records if not r.hold]
        indices = [r.step_index for r in records]
        stamps = np.array([r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 for r in records])
    seq = [r.policy_version for r in acted]
    switch = seq.index(v2)
    assert all(v == v1 for v in seq[:switch]) and all(v == v2 for v in seq[switch:])
    assert indices == list(range(len(indices)))
    assert wait(lambda: bool(missed), timeout=5) and missed[-1] == 0, missed
    assert np.diff(stamps).max() < 0.15, f"largest gap between ticks {np.diff(stamps).max():.3f} s"

    # rollback returns to v1 at the next tick
    assert wait(rollback.service_is_ready, timeout=10)
    future = rollback.call_async(Trigger.Request())
    assert wait(future.done, timeout=10) and future.result().success
    assert wait(lambda: versions()[-1] == v1, timeout=10)

    # holds: malformed image, missing camera (stale); the loop keeps running
    for condition, cause in (("malformed", "bytes"), ("missing", "stale")):
        state["camera"] = condition
        with lock:
            start = len(records)
        assert wait(lambda s=start: any(r.hold for r in records[s:]), timeout=10), (
            condition,
            policy.output()[-1500:],
        )
        assert wait(lambda c=cause: "hold: " in policy.output() and c in policy.output(), 5), (
            condition,
            policy.output()[-2000:],
        )
    state["camera"], state["x"] = "ok", 0.0
    with lock:
        start = len(records)
    assert wait(lambda: any(not r.hold for r in records[start:]), timeout=10)

    assert policy.stop() == 0, policy.output()[-3000:]
    executor.shutdown(timeout_sec=5)
    peer.destroy_node()
