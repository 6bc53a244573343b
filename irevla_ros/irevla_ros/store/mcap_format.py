"""Episode <-> rosbag2 MCAP (profile "ros2", ros2msg schemas, CDR messages) that `ros2 bag play` replays.

Layout of one episode file (format_version 2): the episode's messages on the topics the graph published them on,
so playing the file reproduces the live topics.
- `/<camera>/<camera>/color/image_raw` (sensor_msgs/msg/Image, rgb8, at policy resolution): one per step and
  camera; header.stamp is the capture stamp, header.frame_id the frame id the camera published (the camera name
  for steps that did not carry it); log_time = the capture stamp.
- `/joint_states` (sensor_msgs/msg/JointState) and `/tf` (tf2_msgs/msg/TFMessage): the arm's state as the
  trainer received it at each step (newest sample stamped no later than the step), when the step carries it.
- `/policy/action` (irevla_interfaces/msg/ArmCommand): the command the step's action was published as.
- `/policy/episode_step` (irevla_interfaces/msg/EpisodeStep): everything else in a step (StepRecord without the
  image data, which is on the camera topics; `image_topics` names them).
- log_time = publish_time = the step stamp except for images and the arm's state (their own stamps); every
  message has sequence = step_index, which ties a step's messages together (stamps may repeat, indices may not).
- Metadata record `irevla_episode`: the EpisodeMeta fields as strings (`scene_seed` empty when unknown, absent in
  files written before it was recorded: read as unknown); `irevla_assembly`: completeness.
Schemas are the types' installed .msg definitions with their dependencies, concatenated as rosbag2 embeds them
(`ros2msg_definition`), never hand-written. The file is immutable once written: later relabels live in the
catalogue only. Format 1 files (`/irevla/episode/...` topics, before issue 14) still read (`_decode_format1`).
"""

from __future__ import annotations

import functools
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from mcap.reader import make_reader
from mcap.writer import CompressionType
from mcap_ros2.decoder import DecoderFactory
from mcap_ros2.writer import Writer

from irevla_ros.store.records import (
    AssembledEpisode,
    EpisodeMeta,
    InvalidRecordError,
    JointStateSample,
    StepData,
    TransformSample,
    stamp_to_ns,
)

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
EPISODE_METADATA = "irevla_episode"
ASSEMBLY_METADATA = "irevla_assembly"
STEP_TOPIC = "/policy/episode_step"
ACTION_TOPIC = "/policy/action"
JOINT_STATES_TOPIC = "/joint_states"
TF_TOPIC = "/tf"
STEP_DATATYPE = "irevla_interfaces/msg/EpisodeStep"
ACTION_DATATYPE = "irevla_interfaces/msg/ArmCommand"
IMAGE_DATATYPE = "sensor_msgs/msg/Image"
JOINT_STATE_DATATYPE = "sensor_msgs/msg/JointState"
TF_DATATYPE = "tf2_msgs/msg/TFMessage"
ACTION_FRAME = "base"  # the frame the policy node stamps its ArmCommands with

# Format 1 (read only).
_V1_STEP_TOPIC = "/irevla/episode/step"

COMPRESSIONS = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}


class EpisodeFormatError(ValueError):
    """The bytes are not a readable irevla episode MCAP."""


class MessageDefinitionError(LookupError):
    """A message type's .msg definition is not installed (its package is not on AMENT_PREFIX_PATH)."""


def image_topic(camera: str) -> str:
    """The image topic of camera `camera` in the graph (realsense-ros naming, as bringup/graph.py wires it)."""
    return f"/{camera}/{camera}/color/image_raw"


# --- message definitions as rosbag2 embeds them -------------------------------------------------------------------
# rosbag2_cpp's LocalMessageDefinitionSource: the root type's .msg text, then for every dependency not yet seen
# (sorted, depth first) a line of 80 '=', "MSG: <type as written in the field>", and its text.
_SEPARATOR = "=" * 80
_FIELD_TYPE_RE = re.compile(r"(?:^|\n)\s*([a-zA-Z0-9_/]+)(?:\[[^\]]*\])?\s+")
_PRIMITIVES = frozenset(
    ["bool", "byte", "char", "float32", "float64", "string"]
    + [f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64)]
)
_ROS_NAME = r"[a-zA-Z][a-zA-Z0-9_]*"


def _msg_file(type_name: str) -> tuple[str, Path]:
    match = re.fullmatch(rf"({_ROS_NAME})/(?:({_ROS_NAME})/)?({_ROS_NAME})", type_name)
    if match is None:
        raise MessageDefinitionError(
            f"message type {type_name!r} is not 'package/Type' or 'package/msg/Type'"
        )
    package, namespace, name = match.group(1), match.group(2) or "msg", match.group(3)
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        share = Path(get_package_share_directory(package))
    except PackageNotFoundError as exc:
        raise MessageDefinitionError(
            f"package {package!r} of {type_name} is not installed (AMENT_PREFIX_PATH)"
        ) from exc
    return package, share / namespace / f"{name}.msg"


def _dependencies(text: str, package: str) -> list[str]:
    deps = set()
    for match in _FIELD_TYPE_RE.finditer(text):
        field_type = match.group(1)
        if field_type in _PRIMITIVES:
            continue
        deps.add(field_type if "/" in field_type else f"{package}/{field_type}")
    return sorted(deps)


@functools.cache
def ros2msg_definition(type_name: str) -> str:
    """The complete `ros2msg` definition of `type_name` (e.g. 'sensor_msgs/msg/Image') from the installed .msg
    files, byte for byte what rosbag2 writes into a bag's schema. Raises MessageDefinitionError."""
    seen: set[str] = set()

    def text_of(name: str, depth: int) -> str:
        if depth <= 0:
            raise MessageDefinitionError(f"definition of {type_name} nests too deep")
        package, path = _msg_file(name)
        try:
            result = path.read_text()
        except OSError as exc:
            raise MessageDefinitionError(f"no .msg definition for {name} ({path})") from exc
        for dep in _dependencies(result, package):
            if dep not in seen:
                seen.add(dep)
                result += f"\n{_SEPARATOR}\nMSG: {dep}\n" + text_of(dep, depth - 1)
        return result

    return text_of(type_name, 50)


# --- records --------------------------------------------------------------------------------------------------------


@dataclass
class EpisodeFileInfo:
    """What the file's metadata records say, without decoding any message."""

    meta: EpisodeMeta
    complete: bool
    reasons: list[str]
    num_steps: int
    duplicates_dropped: int
    conflicting_duplicates: int
    out_of_order: int
    timing_errors: int = 0
    format_version: str = FORMAT_VERSION


@dataclass
class DecodedEpisode:
    info: EpisodeFileInfo
    steps: list[StepData]


def _time(ns: int) -> dict[str, int]:
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return {"sec": sec, "nanosec": nanosec}


def _opt(value: int | None) -> str:
    return "" if value is None else str(value)


def _meta_to_strings(meta: EpisodeMeta) -> dict[str, str]:
    return {
        "format_version": FORMAT_VERSION,
        "episode_id": meta.episode_id,
        "task": meta.task,
        "instruction": meta.instruction,
        "policy_version": meta.policy_version,
        "source": meta.source,
        "started_ns": str(meta.started_ns),
        "ended_ns": _opt(meta.ended_ns),
        "outcome": meta.outcome,
        "label_source": meta.label_source,
        "expected_steps": _opt(meta.expected_steps),
        "scene_seed": _opt(meta.scene_seed),
    }


def _meta_from_strings(data: dict[str, str]) -> EpisodeMeta:
    def opt_int(key: str) -> int | None:
        return int(data[key]) if data[key] != "" else None

    return EpisodeMeta(
        episode_id=data["episode_id"],
        task=data["task"],
        instruction=data["instruction"],
        policy_version=data["policy_version"],
        source=data["source"],
        started_ns=int(data["started_ns"]),
        ended_ns=opt_int("ended_ns"),
        outcome=data["outcome"],
        label_source=data["label_source"],
        expected_steps=opt_int("expected_steps"),
        # Absent from files written before the seed was recorded (format 1 and early format 2): unknown.
        scene_seed=opt_int("scene_seed") if "scene_seed" in data else None,
    )


# --- writing --------------------------------------------------------------------------------------------------------


def _joint_state_msg(sample: JointStateSample) -> dict[str, Any]:
    return {
        "header": {"stamp": _time(sample.stamp_ns), "frame_id": ""},
        "name": list(sample.names),
        "position": [float(x) for x in sample.position],
        "velocity": [float(x) for x in sample.velocity],
        "effort": [float(x) for x in sample.effort],
    }


def _tf_msg(transforms: tuple[TransformSample, ...]) -> dict[str, Any]:
    return {
        "transforms": [
            {
                "header": {"stamp": _time(t.stamp_ns), "frame_id": t.parent_frame},
                "child_frame_id": t.child_frame,
                "transform": {
                    "translation": dict(zip("xyz", map(float, t.translation), strict=True)),
                    "rotation": dict(zip("xyzw", map(float, t.rotation), strict=True)),
                },
            }
            for t in transforms
        ]
    }


def write_episode(stream: IO[bytes], episode: AssembledEpisode, compression: str = "zstd") -> None:
    """Write `episode` as MCAP to `stream` (needs write() and tell()); the caller owns flushing/closing.

    The output depends only on the episode (no wall-clock time), so equal episodes give equal bytes.
    Raises MessageDefinitionError when a message type's definition is not installed.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {sorted(COMPRESSIONS)}")
    writer = Writer(stream, compression=COMPRESSIONS[compression])
    schemas: dict[str, Any] = {}

    def schema(datatype: str) -> Any:
        if datatype not in schemas:
            schemas[datatype] = writer.register_msgdef(datatype, ros2msg_definition(datatype))
        return schemas[datatype]

    for step in episode.steps:
        if step.episode_id != episode.meta.episode_id:
            raise InvalidRecordError(
                f"step {step.step_index} belongs to episode {step.episode_id!r}, "
                f"not {episode.meta.episode_id!r}"
            )
        stamp, index = int(step.stamp_ns), int(step.step_index)
        for camera, image in step.images.items():
            height, width, _ = image.shape
            captured = int(step.image_stamps_ns[camera])
            writer.write_message(
                image_topic(camera),
                schema(IMAGE_DATATYPE),
                {
                    "header": {
                        "stamp": _time(captured),
                        "frame_id": step.image_frame_ids.get(camera, camera),
                    },
                    "height": height,
                    "width": width,
                    "encoding": "rgb8",
                    "is_bigendian": 0,
                    "step": width * 3,
                    "data": np.ascontiguousarray(image).tobytes(),
                },
                log_time=captured,
                publish_time=captured,
                sequence=index,
            )
        if step.joint_state is not None:
            writer.write_message(
                JOINT_STATES_TOPIC,
                schema(JOINT_STATE_DATATYPE),
                _joint_state_msg(step.joint_state),
                log_time=step.joint_state.stamp_ns,
                publish_time=step.joint_state.stamp_ns,
                sequence=index,
            )
        if step.transforms:
            tf_stamp = max(t.stamp_ns for t in step.transforms)
            writer.write_message(
                TF_TOPIC,
                schema(TF_DATATYPE),
                _tf_msg(step.transforms),
                log_time=tf_stamp,
                publish_time=tf_stamp,
                sequence=index,
            )
        if len(step.action) == 4:  # the arm's action layout (ee delta + gripper); others have no ArmCommand
            writer.write_message(
                ACTION_TOPIC,
                schema(ACTION_DATATYPE),
                {
                    "header": {"stamp": _time(stamp), "frame_id": ACTION_FRAME},
                    "ee_delta": [float(x) for x in step.action[:3]],
                    "gripper": float(step.action[3]),
                    "hold": bool(step.hold),
                    "episode_id": step.episode_id,
                    "step_index": index,
                    "policy_version": step.policy_version,
                },
                log_time=stamp,
                publish_time=stamp,
                sequence=index,
            )
        writer.write_message(
            STEP_TOPIC,
            schema(STEP_DATATYPE),
            {
                "header": {"stamp": _time(stamp), "frame_id": ""},
                "episode_id": step.episode_id,
                "step_index": index,
                "camera_names": list(step.images),
                "image_topics": [image_topic(c) for c in step.images],
                "image_stamps": [_time(step.image_stamps_ns[c]) for c in step.images],
                "proprioception": step.proprioception.tolist(),
                "proprioception_names": list(step.proprioception_names),
                "instruction": step.instruction,
                "action": step.action.tolist(),
                "has_log_prob": step.log_prob is not None,
                "log_prob": 0.0 if step.log_prob is None else float(step.log_prob),
                "has_value": step.value is not None,
                "value": 0.0 if step.value is None else float(step.value),
                "policy_version": step.policy_version,
                "intervention": bool(step.intervention),
                "hold": bool(step.hold),
            },
            log_time=stamp,
            publish_time=stamp,
            sequence=index,
        )
    writer.add_metadata(EPISODE_METADATA, _meta_to_strings(episode.meta))
    writer.add_metadata(
        ASSEMBLY_METADATA,
        {
            "format_version": FORMAT_VERSION,
            "complete": "true" if episode.complete else "false",
            "reasons": json.dumps(episode.reasons),
            "num_steps": str(len(episode.steps)),
            "duplicates_dropped": str(episode.duplicates_dropped),
            "conflicting_duplicates": str(episode.conflicting_duplicates),
            "out_of_order": str(episode.out_of_order),
            "timing_errors": str(episode.timing_errors),
        },
    )
    writer.finish()


def encode_episode(episode: AssembledEpisode, compression: str = "zstd") -> bytes:
    buffer = io.BytesIO()
    write_episode(buffer, episode, compression)
    return buffer.getvalue()


# --- reading --------------------------------------------------------------------------------------------------------


def _read_info(reader: Any) -> EpisodeFileInfo:
    records = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
    if EPISODE_METADATA not in records or ASSEMBLY_METADATA not in records:
        raise EpisodeFormatError(
            f"missing metadata records {EPISODE_METADATA!r}/{ASSEMBLY_METADATA!r} (found {sorted(records)})"
        )
    meta_strings, assembly = records[EPISODE_METADATA], records[ASSEMBLY_METADATA]
    version = meta_strings.get("format_version")
    if version not in READABLE_VERSIONS:
        raise EpisodeFormatError(
            f"unsupported episode format_version {version!r}, expected one of {READABLE_VERSIONS}"
        )
    return EpisodeFileInfo(
        meta=_meta_from_strings(meta_strings),
        complete=assembly["complete"] == "true",
        reasons=list(json.loads(assembly["reasons"])),
        num_steps=int(assembly["num_steps"]),
        duplicates_dropped=int(assembly["duplicates_dropped"]),
        conflicting_duplicates=int(assembly["conflicting_duplicates"]),
        out_of_order=int(assembly["out_of_order"]),
        timing_errors=int(assembly.get("timing_errors", "0")),  # files from before the timing check: 0
        format_version=str(version),
    )


def read_episode_info(data: bytes) -> EpisodeFileInfo:
    """Metadata only (cheap): used to re-index a file that has no catalogue row."""
    try:
        return _read_info(make_reader(io.BytesIO(data)))
    except EpisodeFormatError:
        raise
    except Exception as exc:  # damaged bytes fail anywhere in the mcap/zstd/struct layers
        raise EpisodeFormatError(f"cannot read episode metadata: {exc!r}") from exc


def _pixels(topic: str, msg: Any) -> np.ndarray:
    if msg.encoding != "rgb8":
        raise EpisodeFormatError(f"{topic}: image encoding {msg.encoding!r}, expected rgb8")
    return np.frombuffer(msg.data, dtype=np.uint8).reshape(msg.height, msg.width, 3).copy()


def _step_data(msg: Any, log_time: int, images: dict[str, tuple[np.ndarray, int]], **extra: Any) -> StepData:
    return StepData(
        episode_id=msg.episode_id,
        step_index=int(msg.step_index),
        stamp_ns=int(log_time),
        images={c: images[c][0] for c in msg.camera_names},
        image_stamps_ns={c: images[c][1] for c in msg.camera_names},
        proprioception=np.array(msg.proprioception, dtype=np.float32),
        proprioception_names=list(msg.proprioception_names),
        instruction=msg.instruction,
        action=np.array(msg.action, dtype=np.float32),
        log_prob=float(msg.log_prob) if msg.has_log_prob else None,
        value=float(msg.value) if msg.has_value else None,
        policy_version=msg.policy_version,
        intervention=bool(msg.intervention),
        hold=bool(msg.hold),
        **extra,
    )


def _check_cameras(index: int, names: list[str], got: dict[str, Any]) -> None:
    if set(names) != set(got):
        raise EpisodeFormatError(f"step {index}: cameras {names} but images for {sorted(got)}")


def _decode_format2(reader: Any) -> list[StepData]:
    step_msgs: dict[int, tuple[int, Any]] = {}
    by_topic: dict[str, dict[int, Any]] = {}  # topic -> step index -> decoded message
    for _schema, channel, message, decoded in reader.iter_decoded_messages(log_time_order=False):
        if channel.topic == STEP_TOPIC:
            step_msgs[message.sequence] = (message.log_time, decoded)
        else:
            by_topic.setdefault(channel.topic, {})[message.sequence] = decoded
    steps = []
    for index in sorted(step_msgs):
        log_time, msg = step_msgs[index]
        images: dict[str, tuple[np.ndarray, int]] = {}
        frames: dict[str, str] = {}
        for camera, topic in zip(msg.camera_names, msg.image_topics, strict=True):
            image = by_topic.get(topic, {}).get(index)
            if image is not None:
                images[camera] = (_pixels(topic, image), stamp_to_ns(image.header.stamp))
                frames[camera] = image.header.frame_id
        _check_cameras(index, list(msg.camera_names), images)
        joints = by_topic.get(JOINT_STATES_TOPIC, {}).get(index)
        tf = by_topic.get(TF_TOPIC, {}).get(index)
        steps.append(
            _step_data(
                msg,
                log_time,
                images,
                image_frame_ids=frames,
                joint_state=None if joints is None else JointStateSample.from_message(joints),
                transforms=() if tf is None else TransformSample.from_tf_message(tf),
            )
        )
    return steps


def _decode_format1(reader: Any) -> list[StepData]:
    """Files written before issue 14: `/irevla/episode/step` and `/irevla/episode/<camera>/image`, the camera
    name in each image's frame_id, no arm state. Read only: nothing writes this layout any more."""
    images: dict[int, dict[str, tuple[np.ndarray, int]]] = {}
    step_msgs: dict[int, tuple[int, Any]] = {}
    for _schema, channel, message, decoded in reader.iter_decoded_messages(log_time_order=False):
        if channel.topic == _V1_STEP_TOPIC:
            step_msgs[message.sequence] = (message.log_time, decoded)
            continue
        camera = decoded.header.frame_id
        images.setdefault(message.sequence, {})[camera] = (
            _pixels(channel.topic, decoded),
            stamp_to_ns(decoded.header.stamp),
        )
    steps = []
    for index in sorted(step_msgs):
        log_time, msg = step_msgs[index]
        cams = images.get(index, {})
        _check_cameras(index, list(msg.camera_names), cams)
        steps.append(_step_data(msg, log_time, cams))
    return steps


def decode_episode(data: bytes) -> DecodedEpisode:
    """Decode a whole episode (either format); arrays come back bitwise equal to what was written."""
    try:
        reader = make_reader(io.BytesIO(data), decoder_factories=[DecoderFactory()])
        info = _read_info(reader)
        steps = _decode_format1(reader) if info.format_version == "1" else _decode_format2(reader)
    except EpisodeFormatError:
        raise
    except Exception as exc:  # damaged bytes fail anywhere in the mcap/zstd/struct/CDR layers
        raise EpisodeFormatError(f"cannot decode episode: {exc!r}") from exc
    if len(steps) != info.num_steps:
        raise EpisodeFormatError(f"file holds {len(steps)} steps, its metadata says {info.num_steps}")
    return DecodedEpisode(info=info, steps=steps)
