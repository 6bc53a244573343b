"""Episode <-> rosbag2-compatible MCAP (profile "ros2", ros2msg schemas, CDR messages).

Layout of one episode file:
- `/irevla/episode/<camera>/image` (sensor_msgs/msg/Image, rgb8): one per step and camera; header.stamp is
  the capture stamp, header.frame_id the camera name.
- `/irevla/episode/step` (irevla_interfaces/msg/EpisodeStep, STEP_MSGDEF): everything else in a step.
- Every message has log_time = publish_time = the step stamp and sequence = step_index; the sequence ties
  a step's images to its step message (stamps may repeat, indices may not).
- Metadata record `irevla_episode`: the EpisodeMeta fields as strings; `irevla_assembly`: completeness.
The file is immutable once written: later relabels live in the catalogue only.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from mcap.reader import make_reader
from mcap.writer import CompressionType
from mcap_ros2.decoder import DecoderFactory
from mcap_ros2.writer import Writer

from irevla_ros.store.records import AssembledEpisode, EpisodeMeta, InvalidRecordError, StepData

FORMAT_VERSION = "1"
EPISODE_METADATA = "irevla_episode"
ASSEMBLY_METADATA = "irevla_assembly"
STEP_TOPIC = "/irevla/episode/step"
STEP_DATATYPE = "irevla_interfaces/msg/EpisodeStep"
IMAGE_DATATYPE = "sensor_msgs/msg/Image"

_SEPARATOR = "=" * 80
_HEADER_DEPS = f"""{_SEPARATOR}
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
{_SEPARATOR}
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""

IMAGE_MSGDEF = (
    """std_msgs/Header header
uint32 height
uint32 width
string encoding
uint8 is_bigendian
uint32 step
uint8[] data
"""
    + _HEADER_DEPS
)

# StepRecord without the images (they have their own channels so viewers can show them). log_prob and value
# are float64 so whatever float the producer handed over comes back unchanged.
STEP_MSGDEF = (
    """std_msgs/Header header
string episode_id
uint32 step_index
string[] camera_names
float32[] proprioception
string[] proprioception_names
string instruction
float32[] action
bool has_log_prob
float64 log_prob
bool has_value
float64 value
string policy_version
bool intervention
bool hold
"""
    + _HEADER_DEPS
)

COMPRESSIONS = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}


class EpisodeFormatError(ValueError):
    """The bytes are not a readable irevla episode MCAP."""


def image_topic(camera: str) -> str:
    return f"/irevla/episode/{camera}/image"


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


@dataclass
class DecodedEpisode:
    info: EpisodeFileInfo
    steps: list[StepData]


def _time(ns: int) -> dict[str, int]:
    sec, nanosec = divmod(int(ns), 1_000_000_000)
    return {"sec": sec, "nanosec": nanosec}


def _ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


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
    )


def write_episode(stream: IO[bytes], episode: AssembledEpisode, compression: str = "zstd") -> None:
    """Write `episode` as MCAP to `stream` (needs write() and tell()); the caller owns flushing/closing.

    The output depends only on the episode (no wall-clock time), so equal episodes give equal bytes.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} is not one of {sorted(COMPRESSIONS)}")
    writer = Writer(stream, compression=COMPRESSIONS[compression])
    step_schema = writer.register_msgdef(STEP_DATATYPE, STEP_MSGDEF)
    image_schema = writer.register_msgdef(IMAGE_DATATYPE, IMAGE_MSGDEF)
    for step in episode.steps:
        if step.episode_id != episode.meta.episode_id:
            raise InvalidRecordError(
                f"step {step.step_index} belongs to episode {step.episode_id!r}, "
                f"not {episode.meta.episode_id!r}"
            )
        stamp = int(step.stamp_ns)
        for camera, image in step.images.items():
            height, width, _ = image.shape
            writer.write_message(
                image_topic(camera),
                image_schema,
                {
                    "header": {"stamp": _time(step.image_stamps_ns[camera]), "frame_id": camera},
                    "height": height,
                    "width": width,
                    "encoding": "rgb8",
                    "is_bigendian": 0,
                    "step": width * 3,
                    "data": np.ascontiguousarray(image).tobytes(),
                },
                log_time=stamp,
                publish_time=stamp,
                sequence=int(step.step_index),
            )
        writer.write_message(
            STEP_TOPIC,
            step_schema,
            {
                "header": {"stamp": _time(stamp), "frame_id": ""},
                "episode_id": step.episode_id,
                "step_index": int(step.step_index),
                "camera_names": list(step.images),
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
            sequence=int(step.step_index),
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


def _read_info(reader: Any) -> EpisodeFileInfo:
    records = {m.name: dict(m.metadata) for m in reader.iter_metadata()}
    if EPISODE_METADATA not in records or ASSEMBLY_METADATA not in records:
        raise EpisodeFormatError(
            f"missing metadata records {EPISODE_METADATA!r}/{ASSEMBLY_METADATA!r} (found {sorted(records)})"
        )
    meta_strings, assembly = records[EPISODE_METADATA], records[ASSEMBLY_METADATA]
    version = meta_strings.get("format_version")
    if version != FORMAT_VERSION:
        raise EpisodeFormatError(f"unsupported episode format_version {version!r}, expected {FORMAT_VERSION}")
    return EpisodeFileInfo(
        meta=_meta_from_strings(meta_strings),
        complete=assembly["complete"] == "true",
        reasons=list(json.loads(assembly["reasons"])),
        num_steps=int(assembly["num_steps"]),
        duplicates_dropped=int(assembly["duplicates_dropped"]),
        conflicting_duplicates=int(assembly["conflicting_duplicates"]),
        out_of_order=int(assembly["out_of_order"]),
        timing_errors=int(assembly.get("timing_errors", "0")),  # files from before the timing check: 0
    )


def read_episode_info(data: bytes) -> EpisodeFileInfo:
    """Metadata only (cheap): used to re-index a file that has no catalogue row."""
    try:
        return _read_info(make_reader(io.BytesIO(data)))
    except EpisodeFormatError:
        raise
    except Exception as exc:  # damaged bytes fail anywhere in the mcap/zstd/struct layers
        raise EpisodeFormatError(f"cannot read episode metadata: {exc!r}") from exc


def decode_episode(data: bytes) -> DecodedEpisode:
    """Decode a whole episode; arrays come back bitwise equal to what was written."""
    try:
        reader = make_reader(io.BytesIO(data), decoder_factories=[DecoderFactory()])
        info = _read_info(reader)
        images: dict[int, dict[str, tuple[np.ndarray, int]]] = {}
        step_msgs: dict[int, tuple[int, Any]] = {}
        for _schema, channel, message, decoded in reader.iter_decoded_messages(log_time_order=False):
            if channel.topic == STEP_TOPIC:
                step_msgs[message.sequence] = (message.log_time, decoded)
                continue
            if decoded.encoding != "rgb8":
                raise EpisodeFormatError(
                    f"{channel.topic}: image encoding {decoded.encoding!r}, expected rgb8"
                )
            pixels = np.frombuffer(decoded.data, dtype=np.uint8).reshape(decoded.height, decoded.width, 3)
            camera = decoded.header.frame_id
            images.setdefault(message.sequence, {})[camera] = (pixels.copy(), _ns(decoded.header.stamp))
        steps = []
        for index in sorted(step_msgs):
            log_time, msg = step_msgs[index]
            cams = images.get(index, {})
            if set(msg.camera_names) != set(cams):
                raise EpisodeFormatError(
                    f"step {index}: cameras {list(msg.camera_names)} but images for {sorted(cams)}"
                )
            steps.append(
                StepData(
                    episode_id=msg.episode_id,
                    step_index=int(msg.step_index),
                    stamp_ns=int(log_time),
                    images={c: cams[c][0] for c in msg.camera_names},
                    image_stamps_ns={c: cams[c][1] for c in msg.camera_names},
                    proprioception=np.array(msg.proprioception, dtype=np.float32),
                    proprioception_names=list(msg.proprioception_names),
                    instruction=msg.instruction,
                    action=np.array(msg.action, dtype=np.float32),
                    log_prob=float(msg.log_prob) if msg.has_log_prob else None,
                    value=float(msg.value) if msg.has_value else None,
                    policy_version=msg.policy_version,
                    intervention=bool(msg.intervention),
                    hold=bool(msg.hold),
                )
            )
    except EpisodeFormatError:
        raise
    except Exception as exc:  # damaged bytes fail anywhere in the mcap/zstd/struct/CDR layers
        raise EpisodeFormatError(f"cannot decode episode: {exc!r}") from exc
    if len(steps) != info.num_steps:
        raise EpisodeFormatError(f"file holds {len(steps)} steps, its metadata says {info.num_steps}")
    return DecodedEpisode(info=info, steps=steps)
