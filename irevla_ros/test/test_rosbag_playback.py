"""Stored episodes as rosbag2 files that `ros2 bag play` replays: the live topics, types and frame ids, decoded by
independent readers (rosbags, mcap_ros2) with the schemas embedded in the file; and files of the old layout
still load."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ament_index_python.packages import get_package_share_directory
from mcap.reader import make_reader
from rosbags.highlevel import AnyReader

from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.collector import EpisodeCollector
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.mcap_format import decode_episode
from irevla_ros.store.records import EpisodeMeta, JointStateSample, StepData, TransformSample

sys.path.insert(0, str(Path(__file__).parent))
from episode_timing_check import timing_problems

PERIOD = 100_000_000
T0 = 50 * 1_000_000_000
FRAMES = {"camera": "camera_color_optical_frame", "wrist_camera": "wrist_camera_color_optical_frame"}
TOPICS = {c: f"/{c}/{c}/color/image_raw" for c in FRAMES}
JOINTS = ("fr3_joint1", "fr3_joint2", "fr3_joint3", "fr3_joint4", "fr3_joint5", "fr3_joint6", "fr3_joint7")
N = 6
INTERVENTION = {2, 3}
FIXTURE = Path(__file__).parent / "data" / "episode_format1.mcap"


def _step(index: int) -> StepData:
    rng = np.random.default_rng(index)
    stamp = T0 + index * PERIOD
    return StepData(
        episode_id="ep-bag",
        step_index=index,
        stamp_ns=stamp,
        images={
            "camera": rng.integers(0, 256, (12, 16, 3), dtype=np.uint8),
            "wrist_camera": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        },
        image_stamps_ns={"camera": stamp - 3_000_000, "wrist_camera": stamp - 4_000_000},
        proprioception=np.array([0.01 * index, 0.6, 0.2, 0.04], dtype=np.float32),
        proprioception_names=["ee_x", "ee_y", "ee_z", "gripper_opening"],
        instruction="press the button",
        action=np.array([0.5, -0.25, 0.125, 1.0], dtype=np.float32),
        log_prob=None if index in INTERVENTION else -1.25,
        value=0.5,
        policy_version="v0001-stage0_sft",
        intervention=index in INTERVENTION,
        hold=index == N - 1,
        image_frame_ids=dict(FRAMES),
    )


def _joint(stamp: int) -> JointStateSample:
    q = tuple(0.1 * k + stamp * 1e-12 for k in range(7))
    return JointStateSample(stamp, (*JOINTS, "gripper_opening"), (*q, 0.04), (0.0,) * 8)


def _tf(stamp: int) -> TransformSample:
    return TransformSample(stamp, "base", "ee", (stamp * 1e-12, 0.6, 0.2), (1.0, 0.0, 0.0, 0.0))


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, list[StepData]]:
    """An episode closed by the real collector (arm state at 4x the control rate, operator label) and stored."""
    now = [0.0]
    collector = EpisodeCollector(EpisodeAssembler(control_period_ns=PERIOD), clock=lambda: now[0])
    collector.start(EpisodeMeta("ep-bag", "button-press-v3", "press the button", "", "policy", T0))
    for k in range(-2, 4 * N):  # states from before the first step on, the last one after the last step
        stamp = (
            T0 + k * PERIOD // 4 + 1_000_000
        )  # 1 ms after the grid: step i gets the sample of tick i - 1/4
        collector.add_joint_state(_joint(stamp))
        collector.add_transforms([_tf(stamp)])
    steps = [_step(i) for i in range(N)]
    for step in reversed(steps):
        collector.add_step(step)
    collector.end("ep-bag", "success", "operator")
    collector.steps_done("ep-bag", N)
    (episode,) = collector.poll()
    assert episode.complete, episode.reasons
    with EpisodeStore(tmp_path / "store") as store:
        row = store.write(episode)
        return store.root / row.path, steps


def test_every_message_decodes_with_the_embedded_schemas_on_the_live_topics(stored):
    path, steps = stored
    per_topic: dict[str, list[tuple[int, object]]] = {}
    with AnyReader([path]) as reader:  # rosbags: types built from the file's own schemas
        types = {c.topic: c.msgtype for c in reader.connections}
        for connection, log_time, raw in reader.messages():
            per_topic.setdefault(connection.topic, []).append(
                (log_time, reader.deserialize(raw, connection.msgtype))
            )
    assert types == {
        TOPICS["camera"]: "sensor_msgs/msg/Image",
        TOPICS["wrist_camera"]: "sensor_msgs/msg/Image",
        "/joint_states": "sensor_msgs/msg/JointState",
        "/tf": "tf2_msgs/msg/TFMessage",
        "/policy/action": "irevla_interfaces/msg/ArmCommand",
        "/policy/episode_step": "irevla_interfaces/msg/EpisodeStep",
    }
    assert {t: len(m) for t, m in per_topic.items()} == dict.fromkeys(types, N)

    def ns(stamp: object) -> int:
        return stamp.sec * 1_000_000_000 + stamp.nanosec  # type: ignore[attr-defined]

    for camera, topic in TOPICS.items():
        for (log_time, msg), step in zip(per_topic[topic], steps, strict=True):
            assert msg.header.frame_id == FRAMES[camera]
            assert ns(msg.header.stamp) == log_time == step.image_stamps_ns[camera]
            pixels = np.asarray(msg.data, dtype=np.uint8).reshape(msg.height, msg.width, 3)
            assert msg.encoding == "rgb8" and np.array_equal(pixels, step.images[camera])
    for (log_time, msg), step in zip(per_topic["/joint_states"], steps, strict=True):
        expected = T0 + step.step_index * PERIOD - PERIOD // 4 + 1_000_000
        assert ns(msg.header.stamp) == log_time == expected
        assert list(msg.name) == [*JOINTS, "gripper_opening"]
        assert np.allclose(msg.position, _joint(expected).position)
    for (_, msg), step in zip(per_topic["/tf"], steps, strict=True):
        (t,) = msg.transforms
        assert (t.header.frame_id, t.child_frame_id) == ("base", "ee")
        assert ns(t.header.stamp) == T0 + step.step_index * PERIOD - PERIOD // 4 + 1_000_000
        assert t.transform.rotation.x == 1.0
    for (log_time, msg), step in zip(per_topic["/policy/action"], steps, strict=True):
        assert log_time == ns(msg.header.stamp) == step.stamp_ns and msg.header.frame_id == "base"
        assert list(msg.ee_delta) == [0.5, -0.25, 0.125] and msg.gripper == 1.0
        assert msg.hold == step.hold and msg.step_index == step.step_index
    for (log_time, msg), step in zip(per_topic["/policy/episode_step"], steps, strict=True):
        assert log_time == step.stamp_ns and msg.step_index == step.step_index
        assert list(msg.camera_names) == list(TOPICS) and list(msg.image_topics) == list(TOPICS.values())
        assert msg.intervention == (step.step_index in INTERVENTION)
        assert msg.has_log_prob == (step.log_prob is not None)
    # The project's own reader gets the same back, and the operator's label is the file's outcome.
    decoded = decode_episode(path.read_bytes())
    assert (decoded.info.meta.outcome, decoded.info.meta.label_source) == ("success", "operator")
    for back, step in zip(decoded.steps, steps, strict=True):
        assert back.same_as(step) and back.image_frame_ids == FRAMES
        assert back.joint_state is not None and back.joint_state.names[:7] == JOINTS
        assert [t.child_frame for t in back.transforms] == ["ee"]
    assert timing_problems(path, PERIOD) == []


def test_schemas_are_the_installed_msg_files_concatenated_as_rosbag2_does(stored):
    path, _ = stored

    def msg_text(type_name: str) -> str:
        package, *_, name = type_name.split("/")
        return (Path(get_package_share_directory(package)) / "msg" / f"{name}.msg").read_text()

    with path.open("rb") as f:
        summary = make_reader(f).get_summary()
    assert summary is not None
    for schema in summary.schemas.values():
        assert schema.encoding == "ros2msg"
        sections = schema.data.decode().split("\n" + "=" * 80 + "\n")
        assert sections[0] == msg_text(schema.name)
        names = []
        for section in sections[1:]:
            header, text = section.split("\n", 1)
            assert header.startswith("MSG: ")
            names.append(header[5:])
            assert text == msg_text(header[5:])
        assert len(names) == len(set(names)), f"{schema.name}: a dependency twice"
    step_schema = next(s for s in summary.schemas.values() if s.name == "irevla_interfaces/msg/EpisodeStep")
    assert "MSG: std_msgs/Header" in step_schema.data.decode()


def test_a_file_of_the_old_layout_still_loads():
    """test/data/episode_format1.mcap was written by the format 1 writer (before issue 14)."""
    decoded = decode_episode(FIXTURE.read_bytes())
    assert decoded.info.format_version == "1" and decoded.info.meta.episode_id == "legacy-v1-0001"
    assert decoded.info.meta.scene_seed is None  # written before the scene seed was recorded: unknown
    assert [s.step_index for s in decoded.steps] == [0, 1, 2]
    assert [s.intervention for s in decoded.steps] == [False, True, False]
    assert [s.log_prob for s in decoded.steps] == [-1.5, None, -1.5]
    assert decoded.steps[0].images["camera"].shape == (6, 8, 3)
    assert decoded.steps[0].images["wrist_camera"].shape == (4, 4, 3)
    assert decoded.steps[2].joint_state is None and decoded.steps[2].image_frame_ids == {}
    assert timing_problems(FIXTURE, PERIOD) == []


def test_an_old_file_is_reindexed_by_the_store(tmp_path: Path):
    root = tmp_path / "store"
    EpisodeStore(root).close()
    target = root / "episodes" / "legacy" / FIXTURE.name
    target.parent.mkdir(parents=True)
    target.write_bytes(FIXTURE.read_bytes())
    with EpisodeStore(root) as store:
        assert "legacy-v1-0001" in store.last_recovery.reindexed
        record = store.read("legacy-v1-0001")
        assert len(record.steps) == 3 and record.meta.label_source == "operator"
        assert record.meta.scene_seed is None and store.get("legacy-v1-0001").scene_seed is None
