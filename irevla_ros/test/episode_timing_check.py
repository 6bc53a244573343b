"""An independent reader of stored episode files: the step timing a collection must have.

It decodes the MCAP with `mcap_ros2.reader` only (none of this project's store code), so a defect shared by
the writer and the project's own reader cannot hide here. For each episode file it checks:

- step stamps strictly increase, exactly one control period apart (`tolerance_ns` for wall-clock graphs): the
  step record carries no skip marker, so a gap is a defect;
- each image's capture stamp (its header.stamp) is no later than its step's stamp: no step observes the future;
- every step message has its images (tied by the MCAP sequence = step index) and the indices run 0..n-1.

The layout it reads is the one the file format documents (store/mcap_format.py): format 2, the live topics
(`/policy/episode_step`, whose `image_topics` name each camera's image topic, step log_time = step stamp), and
format 1 files written before issue 14 (`/irevla/episode/step`, `/irevla/episode/<camera>/image`).
"""

from __future__ import annotations

from pathlib import Path

from mcap_ros2.reader import read_ros2_messages

STEP_TOPICS = ("/policy/episode_step", "/irevla/episode/step")
V1_IMAGE_PREFIX = "/irevla/episode/"


def _ns(stamp: object) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)  # type: ignore[attr-defined]


def timing_problems(path: Path, period_ns: int, tolerance_ns: int = 0) -> list[str]:
    """Everything wrong with the step timing of episode file `path` (empty: none)."""
    steps: dict[int, int] = {}  # step index -> step stamp (ns)
    cameras: dict[int, list[str]] = {}
    images: dict[int, dict[str, int]] = {}  # step index -> camera -> capture stamp (ns)
    by_topic: dict[str, dict[int, int]] = {}  # topic -> sequence -> header stamp (ns)
    topics_of: dict[int, dict[str, str]] = {}  # step index -> camera -> its image topic (format 2)
    problems: list[str] = []
    for m in read_ros2_messages(str(path), log_time_order=False):
        topic = m.channel.topic
        if topic in STEP_TOPICS:
            index = int(m.ros_msg.step_index)
            stamp = _ns(m.ros_msg.header.stamp)
            if stamp != m.log_time_ns:
                problems.append(f"step {index}: header stamp {stamp} != log_time {m.log_time_ns}")
            steps[index] = stamp
            cameras[index] = list(m.ros_msg.camera_names)
            if hasattr(m.ros_msg, "image_topics"):
                topics_of[index] = dict(zip(m.ros_msg.camera_names, m.ros_msg.image_topics, strict=True))
        elif topic.startswith(V1_IMAGE_PREFIX) and topic.endswith("/image"):
            camera = topic[len(V1_IMAGE_PREFIX) : -len("/image")]
            images.setdefault(int(m.sequence_count), {})[camera] = _ns(m.ros_msg.header.stamp)
        elif m.schema.name == "sensor_msgs/msg/Image":
            by_topic.setdefault(topic, {})[int(m.sequence_count)] = _ns(m.ros_msg.header.stamp)
    for index, named in topics_of.items():
        for camera, topic in named.items():
            if index in by_topic.get(topic, {}):
                images.setdefault(index, {})[camera] = by_topic[topic][index]
    order = sorted(steps)
    if order != list(range(len(order))):
        problems.append(f"step indices are not 0..{len(order) - 1}: {order[:5]}...")
    for k, index in enumerate(order):
        stamp = steps[index]
        if k > 0:
            previous = steps[order[k - 1]]
            gap = stamp - previous
            if gap <= 0:
                problems.append(
                    f"step {index}: stamp {stamp * 1e-9:.3f} s not after step {order[k - 1]}'s "
                    f"{previous * 1e-9:.3f} s"
                )
            elif abs(gap - period_ns) > tolerance_ns:
                problems.append(
                    f"step {index}: {gap * 1e-9:.3f} s after step {order[k - 1]}, not one control period "
                    f"({period_ns * 1e-9:.3f} s)"
                )
        got = images.get(index, {})
        if set(got) != set(cameras[index]):
            problems.append(f"step {index}: cameras {cameras[index]} but images of {sorted(got)}")
        for camera, captured in sorted(got.items()):
            if captured > stamp:
                problems.append(
                    f"step {index} image {camera}: captured {captured * 1e-9:.3f} s, after the step's "
                    f"{stamp * 1e-9:.3f} s"
                )
    if not order:
        problems.append("no steps")
    return problems


def store_timing_problems(store_dir: Path, period_ns: int, tolerance_ns: int = 0) -> dict[str, list[str]]:
    """`timing_problems` of every episode file under `store_dir` (file name -> problems; every file listed)."""
    files = sorted(Path(store_dir).glob("episodes/*/*.mcap"))
    return {f.name: timing_problems(f, period_ns, tolerance_ns) for f in files}
