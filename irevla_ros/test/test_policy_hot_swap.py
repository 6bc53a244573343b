"""The VLA in the policy node: a 10 Hz loop keeps running through a hot swap (the version in the step records changes
at one tick, step indices stay consecutive, any tick a busy machine made late is counted and logged: that none is
missed is the policy-node benchmark's figure), corrupt versions are refused while the running one stays, rollback works, and
missing/stale camera frames, malformed images and a stale arm state turn ticks into holds. Heads-only versions (Stage 1 pushes)
swap the same way on the running encoder; a version whose own output is NaN on real observations makes every
tick a hold with the reason logged."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import torch
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.duration import Duration
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from safetensors.torch import load_file, save_file
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
    joint_pub = peer.create_publisher(JointState, topics.GRIPPER_STATE, 10)
    event_pub = peer.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
    version_pub = peer.create_publisher(PolicyVersion, topics.POLICY_VERSION, LATCHED_QOS)
    rollback = peer.create_client(Trigger, topics.ROLLBACK)
    state = {"camera": "ok", "x": 0.0}
    rng = np.random.default_rng(0)

    def publish_sensors() -> None:
        now = peer.get_clock().now()
        stamp = now.to_msg()
        if state["camera"] in ("ok", "stale_pose"):
            image_pub.publish(
                image_to_msg(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), stamp, "camera")
            )
        elif state["camera"] == "malformed":
            bad = image_to_msg(np.zeros((48, 64, 3), np.uint8), stamp, "camera")
            bad.data = bad.data[:-7]
            image_pub.publish(bad)
        pose = PoseStamped()
        pose.header.stamp = stamp
        if state["camera"] == "stale_pose":  # an arm state stream that stopped a second ago
            pose.header.stamp = (now - Duration(seconds=1.0)).to_msg()
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
    # No tick missed at 10 Hz on wall time is a speed target, measured by the policy-node benchmark
    # (policy_node.json: missed_ticks_during_swaps); on a slow shared CI machine one 0.177 s gap was seen here.
    # What must hold on any machine: every period the node skipped is counted on /policy/status, none hidden.
    gaps = np.diff(stamps)
    skipped = int(sum(round(g / 0.1) - 1 for g in gaps if g > 0.15))
    log_lines = policy.output().splitlines()
    late = [line for line in log_lines if "control tick" in line]
    assert wait(lambda: bool(missed) and missed[-1] >= skipped, timeout=5), (missed[-1:], skipped, late)
    assert len(late) >= min(skipped, 1), late  # and logged (throttled to one line a second)

    # rollback returns to v1 at the next tick
    assert wait(rollback.service_is_ready, timeout=10)
    future = rollback.call_async(Trigger.Request())
    assert wait(future.done, timeout=10) and future.result().success
    assert wait(lambda: versions()[-1] == v1, timeout=10)

    # holds: malformed image, missing camera (stale), old arm state; the loop keeps running
    for condition, cause in (
        ("malformed", "bytes"),
        ("missing", "camera 'camera' is stale"),
        ("stale_pose", "arm state is stale"),
    ):
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


class _Cell:
    """The cell and the trainer around a policy node process: sensors at 20 Hz, episode events, version
    announcements, and everything the node publishes."""

    def __init__(self, context) -> None:
        self.node = Node("cell", context=context)
        self.records: list[StepRecord] = []
        self.status: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.gripper = 1.0
        node = self.node
        node.create_subscription(StepRecord, topics.STEP_RECORDS, self._on_record, RELIABLE_QOS)
        node.create_subscription(DiagnosticArray, topics.POLICY_STATUS, self._on_status, 10)
        self.image_pub = node.create_publisher(Image, topics.CAMERA_IMAGE, SENSOR_QOS)
        self.pose_pub = node.create_publisher(PoseStamped, topics.EE_POSE, 10)
        self.joint_pub = node.create_publisher(JointState, topics.GRIPPER_STATE, 10)
        self.event_pub = node.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS)
        self.version_pub = node.create_publisher(PolicyVersion, topics.POLICY_VERSION, LATCHED_QOS)
        self.rollback = node.create_client(Trigger, topics.ROLLBACK)
        self._rng = np.random.default_rng(0)
        node.create_timer(0.05, self._publish_sensors)
        self.executor = SingleThreadedExecutor(context=context)  # the multi-threaded one busy-loops
        self.executor.add_node(node)
        threading.Thread(target=self.executor.spin, daemon=True).start()

    def _on_record(self, msg: StepRecord) -> None:
        with self.lock:
            self.records.append(msg)

    def _on_status(self, msg: DiagnosticArray) -> None:
        with self.lock:
            self.status.append({kv.key: kv.value for kv in msg.status[0].values})

    def _publish_sensors(self) -> None:
        stamp = self.node.get_clock().now().to_msg()
        self.image_pub.publish(
            image_to_msg(self._rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), stamp, "camera")
        )
        pose = PoseStamped()
        pose.header.stamp = stamp
        self.pose_pub.publish(pose)
        self.joint_pub.publish(JointState(name=["gripper_opening"], position=[self.gripper]))

    def snapshot(self) -> list[StepRecord]:
        with self.lock:
            return list(self.records)

    def acted(self) -> list[str]:
        return [r.policy_version for r in self.snapshot() if not r.hold]

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5)
        self.node.destroy_node()


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _heads_store(tmp_path) -> tuple[ModelStore, dict[str, str]]:
    """v1 full; h1 heads on v1, h2 heads on h1 (Stage 1 pushes); h_nan: NaN heads (resealed, so only the
    content check catches it); v_nan: a full version with finite weights that validates, but whose output is
    NaN on real proprioception (see test_nan_from_the_model...)."""
    from test_vla_store import _new_heads

    base = make_tiny_blip2(tmp_path / "blip2")
    cfg = VLAConfig(backbone="hf", hf_model_dir=str(base), latent_dim=64, head_hidden=(64,), lora_rank=4)
    store = ModelStore(tmp_path / "models")
    torch.manual_seed(1)
    m1 = _perturb(VLAModel(cfg), 1)
    v1 = store.save(m1, parent=None, stage="stage0_sft").version_id
    m2 = _new_heads(m1, 2)
    h1 = store.save_heads(m2, v1).version_id
    m3 = _new_heads(m2, 3)
    h2 = store.save_heads(m3, h1).version_id
    h_nan = store.save_heads(_new_heads(m3, 4), h2).version_id
    path = store.root / h_nan
    tensors = load_file(str(path / "heads.safetensors"))
    tensors["critic_head.0.weight"] = tensors["critic_head.0.weight"].clone().fill_(float("nan"))
    save_file(tensors, str(path / "heads.safetensors"), metadata={"format": "pt"})
    _reseal(path)
    v_nan = store.save(
        _overflowing_proprio(_perturb(VLAModel(cfg), 5)), parent=v1, stage="stage2_sft", export_onnx=False
    )
    return store, {"v1": v1, "h1": h1, "h2": h2, "h_nan": h_nan, "v_nan": v_nan.version_id}


def _overflowing_proprio(model: VLAModel) -> VLAModel:
    """Finite weights that overflow float32 only for a real arm state: the gripper-opening column of the
    proprioception projection is 3e38 (float32 max is 3.4e38). The validator's probe has zero proprioception
    (0 * 3e38 = 0: finite outputs, validation passes); an open gripper (1.0) plus any other positive term
    overflows to inf, which the language model's LayerNorm turns into NaN, and NaN reaches both the action
    (tanh(NaN) = NaN) and the value. Saved without ONNX (torch runtime): save's ONNX check runs random
    proprioception and refuses it, a version exported for a GPU machine or bf16 has no such check."""
    with torch.no_grad():
        model.backbone.proprio_proj.weight[:, 3] = 3e38
    return model


def test_heads_only_hot_swap_and_nan_from_the_model(ros_context, child, tmp_path):
    store, v = _heads_store(tmp_path)
    policy = child(
        [
            shutil.which("policy_node") or "policy_node",
            "--ros-args",
            "-p",
            "policy:=vla",
            "-p",
            f"model_store:={store.root}",
            "-p",
            f"version:={v['v1']}",
            "-p",
            "max_image_age:=0.5",
        ],
        name="policy",
    )
    cell = _Cell(ros_context)
    assert _wait(lambda: cell.node.count_subscribers(topics.EPISODE_EVENTS) > 0, 60), policy.output()
    cell.event_pub.publish(
        EpisodeEvent(type=EpisodeEvent.START, episode_id="ep-heads", instruction="press the button")
    )
    assert _wait(lambda: len(cell.acted()) >= 10, 30), policy.output()

    # Stage 1 pushes: heads on v1, then heads on those heads; each swaps in at a tick, the encoder is shared
    for name in ("h1", "h2"):
        cell.version_pub.publish(PolicyVersion(version_id=v[name], stage="stage1_rl", heads_only=True))
        assert _wait(lambda n=name: cell.acted()[-1] == v[n] and cell.acted().count(v[n]) >= 10, 60), (
            policy.output()
        )
        assert f"{v[name]} loaded and validated" in policy.output()
        assert (
            f"heads-only on {v['v1']} (encoder shared, heads validated in-process)"
            in policy.output().split(v[name] + " loaded")[1]
        )

    # refused: NaN heads; a full version announced as heads-only. h2 stays.
    for bad, heads_only, reason in (
        (v["h_nan"], True, "non-finite"),
        (v["v1"], True, "announced as heads-only"),
    ):
        cell.version_pub.publish(PolicyVersion(version_id=bad, stage="stage1_rl", heads_only=heads_only))
        assert _wait(
            lambda b=bad, r=reason: (
                f"version {b} refused, {v['h2']} stays" in policy.output()
                and r in policy.output().split(f"version {b} refused")[-1].splitlines()[0]
            ),
            60,
        ), policy.output()
    count = len(cell.snapshot())
    assert _wait(lambda: len(cell.snapshot()) > count + 10, 10)
    assert cell.acted()[-1] == v["h2"]

    # each version changed at exactly one tick, no tick missed, no hold
    records = cell.snapshot()
    seq = [r.policy_version for r in records]
    changes = [i for i in range(1, len(seq)) if seq[i] != seq[i - 1]]
    assert [seq[0]] + [seq[i] for i in changes] == [v["v1"], v["h1"], v["h2"]], changes
    assert not any(r.hold for r in records)
    assert [r.step_index for r in records] == list(range(len(records)))
    stamps = np.array([r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 for r in records])
    assert np.diff(stamps).max() < 0.15, f"largest gap between ticks {np.diff(stamps).max():.3f} s"
    assert _wait(lambda: bool(cell.status), 5)
    with cell.lock:
        last = cell.status[-1]
    assert last["missed_ticks"] == "0" and last["policy_version"] == v["h2"]
    assert last["encoder_version"] == v["v1"]

    # NaN from the model itself: v_nan passes validation, then gives NaN on the real arm state (gripper
    # open). Every tick is a hold with the reason logged; the node keeps running.
    cell.version_pub.publish(PolicyVersion(version_id=v["v_nan"], stage="stage2_sft"))
    assert _wait(lambda: f"{v['v_nan']} loaded and validated" in policy.output(), 60), policy.output()
    assert _wait(lambda: sum(r.hold and r.policy_version == v["v_nan"] for r in cell.snapshot()) >= 10, 20)
    assert f"hold: VLA {v['v_nan']} produced non-finite output: action mean [nan" in policy.output()
    nan_records = [r for r in cell.snapshot() if r.policy_version == v["v_nan"]]
    assert all(r.hold and list(r.action) == [0.0] * 4 and not r.has_value for r in nan_records)
    # the same version acts on an observation where nothing overflows (gripper closed)
    cell.gripper = 0.0
    assert _wait(lambda: cell.acted()[-1] == v["v_nan"], 10), policy.output()[-2000:]
    cell.gripper = 1.0
    assert _wait(lambda: cell.snapshot()[-1].hold, 10)
    # the operator rolls back; the node acts with h2 again
    assert _wait(cell.rollback.service_is_ready, 10)
    future = cell.rollback.call_async(Trigger.Request())
    assert _wait(future.done, 10) and future.result().success
    assert _wait(lambda: cell.acted()[-1] == v["h2"], 10)
    records = cell.snapshot()
    assert [r.step_index for r in records] == list(range(len(records)))

    assert policy.stop() == 0, policy.output()[-3000:]
    cell.close()
