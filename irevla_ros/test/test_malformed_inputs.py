"""Malformed input on every topic the `collect` graph subscribes to: each node logs a clear error, keeps
running (episodes are still stored afterwards), and the arm never leaves its workspace box (real graph, real
DDS, real MuJoCo, real files)."""

from __future__ import annotations

import math
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState, Joy

from irevla_interfaces.msg import ArmCommand, EpisodeEvent, EpisodeStored, StepRecord, TrainerStatus
from irevla_ros import topics
from irevla_ros.nodes.common import (
    LATCHED_QOS,
    RELIABLE_QOS,
    SENSOR_QOS,
    ImageFormatError,
    image_to_msg,
    msg_to_image,
    time_to_ns,
)
from irevla_ros.store.episode_store import EpisodeStore

EPISODE_TIMEOUT = 4.0  # simulated seconds: short episodes, so several are stored within the test
FAKE_FRAME = "malformed_input_test"
HAND_LAG = 0.02  # m: the hand may trail a target on the box boundary by this much


@dataclass
class Probe:
    """One malformed input, re-sent every `every` seconds until `expect` shows up in the receiver's log."""

    name: str
    send: Callable[[], None]
    log: str  # executable whose log must show the error
    expect: str
    channel: str = ""  # probes on one channel go one at a time (the receiver throttles that log line)
    every: float = 0.1
    last_sent: float = -math.inf
    seen: bool = False


@dataclass
class Watch:
    """What the test node hears from the graph."""

    clock_ns: int = 0
    poses: list[tuple[float, float, float]] = field(default_factory=list)
    acks: dict[str, EpisodeStored] = field(default_factory=dict)
    starts: list[tuple[float, str]] = field(default_factory=list)  # (wall time, episode id)
    overlays: list[Image] = field(default_factory=list)
    trainer_status: TrainerStatus | None = None


def read_log(log_dir: Path, executable: str) -> str:
    path = log_dir / f"{executable}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def all_logs(log_dir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(log_dir.glob("*.log"))
    )


def step_record(episode_id: str, index: int, **fields: object) -> StepRecord:
    """A well-formed record without images (a hold step), changed by `fields`."""
    msg = StepRecord(
        episode_id=episode_id,
        step_index=index,
        instruction="press the button",
        proprioception=[0.0, 0.6, 0.2, 1.0],
        proprioception_names=["ee_x", "ee_y", "ee_z", "gripper_opening"],
        action=[0.1, 0.0, -0.1, 1.0],
        policy_version="test",
        hold=False,
    )
    # One control period (0.1 s) apart: the store marks steps off the control grid incomplete.
    msg.header.stamp.sec, msg.header.stamp.nanosec = 1 + index // 10, (index % 10) * 100_000_000
    for key, value in fields.items():
        setattr(msg, key, value)
    return msg


def event(kind: int, episode_id: str, **fields: object) -> EpisodeEvent:
    msg = EpisodeEvent(type=kind, episode_id=episode_id, **fields)  # type: ignore[arg-type]
    return msg


def test_malformed_inputs_are_logged_and_the_graph_keeps_working(ros_context, sim_graph, spin, tmp_path):
    runner = sim_graph(f"/episode_manager.episode_timeout={EPISODE_TIMEOUT}")
    log_dir = tmp_path / "logs"
    arm = runner.effective_parameters["/arm_controller"]
    low = np.array(arm["workspace_low"]) - HAND_LAG
    high = np.array(arm["workspace_high"]) + HAND_LAG
    tag = uuid.uuid4().hex[:8]

    node = Node("malformed_input_tester", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    w = Watch()

    def on_pose(msg: PoseStamped) -> None:
        if msg.header.frame_id != FAKE_FRAME:  # the arm controller's, not the test's own malformed ones
            p = msg.pose.position
            w.poses.append((p.x, p.y, p.z))

    def on_event(msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.START:
            w.starts.append((time.monotonic(), msg.episode_id))

    node.create_subscription(Clock, "/clock", lambda m: setattr(w, "clock_ns", time_to_ns(m.clock)), 10)
    node.create_subscription(PoseStamped, topics.EE_POSE, on_pose, 100)
    node.create_subscription(
        EpisodeStored, topics.EPISODE_STORED, lambda m: w.acks.__setitem__(m.episode_id, m), RELIABLE_QOS
    )
    node.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, on_event, RELIABLE_QOS)
    # Subscribing to the overlay makes the episode manager decode camera frames too.
    node.create_subscription(Image, topics.OVERLAY_IMAGE, w.overlays.append, SENSOR_QOS)
    node.create_subscription(
        TrainerStatus, topics.TRAINER_STATUS, lambda m: setattr(w, "trainer_status", m), LATCHED_QOS
    )
    pubs = {
        "camera": node.create_publisher(Image, topics.CAMERA_IMAGE, SENSOR_QOS),
        "steps": node.create_publisher(StepRecord, topics.STEP_RECORDS, RELIABLE_QOS),
        "action": node.create_publisher(ArmCommand, topics.ACTION, 10),
        "joints": node.create_publisher(JointState, topics.GRIPPER_STATE, 10),
        "joy": node.create_publisher(Joy, topics.JOY, 10),
        "expert": node.create_publisher(ArmCommand, topics.SIM_EXPERT_ACTION, 10),
        "pose": node.create_publisher(PoseStamped, topics.EE_POSE, 10),
        "events": node.create_publisher(EpisodeEvent, topics.EPISODE_EVENTS, RELIABLE_QOS),
    }

    # The graph is up and storing before anything malformed arrives.
    assert spin(executor, lambda: len(w.acks) >= 1, timeout=120), all_logs(log_dir)
    assert spin(executor, lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), timeout=30), {
        k: p.get_subscription_count() for k, p in pubs.items()
    }

    def now_stamp() -> Time:
        sec, nanosec = divmod(w.clock_ns, 1_000_000_000)
        return Time(sec=sec, nanosec=nanosec)

    def camera(**fields: object) -> Callable[[], None]:
        def send() -> None:
            msg = Image(height=128, width=128, encoding="rgb8", step=384, data=bytes(128 * 384))
            for key, value in fields.items():
                setattr(msg, key, value)
            msg.header.stamp = now_stamp()  # current, so the policy decodes it instead of calling it stale
            msg.header.frame_id = "camera_color_optical_frame"
            pubs["camera"].publish(msg)

        return send

    def command(delta: list[float], gripper: float = 0.0) -> Callable[[], None]:
        return lambda: pubs["action"].publish(ArmCommand(ee_delta=delta, gripper=gripper, episode_id="test"))

    def nan_expert() -> None:
        msg = ArmCommand(ee_delta=[0.5, math.nan, 0.0], gripper=0.5)
        msg.header.stamp = now_stamp()  # current, so the policy's tick uses it
        pubs["expert"].publish(msg)

    def nan_pose() -> None:
        msg = PoseStamped()
        msg.header.stamp = now_stamp()  # current, so the policy reads it instead of calling it stale
        msg.header.frame_id = FAKE_FRAME
        msg.pose.position.x = math.nan
        pubs["pose"].publish(msg)

    def stale_pose() -> None:
        msg = PoseStamped()  # stamped 0: an arm state from the start of time
        msg.header.frame_id = FAKE_FRAME
        msg.pose.position.y = 0.6
        pubs["pose"].publish(msg)

    good_image = image_to_msg(np.zeros((4, 4, 3), np.uint8), now_stamp(), "camera")
    unknown = f"test-unknown-{tag}"
    steps_pub = pubs["steps"].publish
    events_pub = pubs["events"].publish
    probes = [
        # Camera frames: the policy holds the tick and says why; the overlay says it cannot draw on them.
        Probe("image data length", camera(data=bytes(100)), "policy_node", "data has 100 bytes, expected"),
        Probe(
            "empty image",
            camera(height=0, width=0, step=0, data=b""),
            "policy_node",
            "empty image (0 pixels)",
        ),
        Probe(
            "unknown encoding",
            camera(encoding="yuv_mystery"),
            "policy_node",
            "unsupported encoding 'yuv_mystery'",
        ),
        Probe(
            "mono image",
            camera(encoding="mono8", step=128, data=bytes(128 * 128)),
            "policy_node",
            "expected a colour image",
        ),
        Probe("overlay", camera(data=bytes(7)), "episode_manager_node", "overlay: bad camera image"),
        # Arm commands: rejected by the safety layer, the arm holds.
        Probe("NaN action", command([math.nan, 0.0, 0.0]), "sim_cell_node", "action is not finite: [nan"),
        Probe(
            "inf action", command([0.0, math.inf, 0.0]), "sim_cell_node", "action is not finite: [0.0, inf"
        ),
        Probe("NaN gripper", command([0.0, 0.0, 0.0], math.nan), "sim_cell_node", "0.0, 0.0, nan]"),
        Probe("huge action", command([1e30, 0.0, -1e30]), "sim_cell_node", "> max_abs_action"),
        # Robot state and the simulator's expert.
        Probe("NaN pose", nan_pose, "policy_node", "non-finite arm state [nan"),
        Probe("stale pose", stale_pose, "policy_node", "arm state is stale: newest ~/ee_pose is"),
        Probe(
            "joint state lengths",
            lambda: pubs["joints"].publish(JointState(name=["j0", "gripper_opening"], position=[0.1])),
            "policy_node",
            "malformed /arm_controller/gripper_state",
        ),
        Probe(
            "NaN expert action",
            nan_expert,
            "policy_node",
            "malformed expert action",
        ),
        Probe(
            "joy without buttons",
            lambda: pubs["joy"].publish(Joy()),
            "episode_manager_node",
            "malformed /joy: 0 buttons",
        ),
        # Step records: the trainer rejects them (it throttles that log line: one kind at a time).
        Probe(
            "images vs camera names",
            lambda: steps_pub(
                step_record(
                    unknown,
                    0,
                    images=[good_image],
                    camera_names=["a", "b"],
                    image_stamps=[good_image.header.stamp],
                )
            ),
            "trainer_node",
            "1 images, 2 camera names, 1 stamps",
            channel="steps",
            every=0.5,
        ),
        Probe(
            "proprioception vs names",
            lambda: steps_pub(step_record(unknown, 0, proprioception_names=["x"])),
            "trainer_node",
            "proprioception and its names differ in length",
            channel="steps",
            every=0.5,
        ),
        Probe(
            "bad image in record",
            lambda: steps_pub(
                step_record(
                    unknown,
                    0,
                    images=[Image(height=4, width=4, encoding="rgb8", step=12, data=bytes(5))],
                    camera_names=["camera"],
                    image_stamps=[good_image.header.stamp],
                )
            ),
            "trainer_node",
            "bad image: data has 5 bytes",
            channel="steps",
            every=0.5,
        ),
        Probe(
            "invalid episode id",
            lambda: steps_pub(step_record("../../etc/passwd", 0)),
            "trainer_node",
            "episode_id '../../etc/passwd' is not valid",
            channel="steps",
            every=0.5,
        ),
        Probe(
            "never started episode",
            lambda: steps_pub(step_record(unknown, 5)),
            "trainer_node",
            f"step(s) for episode {unknown!r} rejected: it was never started",
            every=5.0,
        ),
        # Episode events for episodes nobody started.
        Probe(
            "END unknown",
            lambda: events_pub(event(EpisodeEvent.END, f"{unknown}-end", outcome=1)),
            "trainer_node",
            f"END for unknown episode '{unknown}-end' ignored",
            every=2.0,
        ),
        Probe(
            "LABEL unknown",
            lambda: events_pub(event(EpisodeEvent.LABEL, f"{unknown}-label", outcome=1, label_source=1)),
            "trainer_node",
            f"episode event 2 for '{unknown}-label' rejected",
            every=2.0,
        ),
        Probe(
            "STEPS_DONE unknown",
            lambda: events_pub(event(EpisodeEvent.STEPS_DONE, f"{unknown}-done", num_steps=3)),
            "trainer_node",
            f"STEPS_DONE for unknown or already stored episode '{unknown}-done'",
            every=5.0,
        ),
    ]

    def drive() -> bool:
        logs = {exe: read_log(log_dir, exe) for exe in {p.log for p in probes}}
        busy: set[str] = set()
        now = time.monotonic()
        for probe in probes:
            probe.seen = probe.seen or probe.expect in logs[probe.log]
            if probe.seen or (probe.channel and probe.channel in busy):
                continue
            if probe.channel:
                busy.add(probe.channel)
            if now - probe.last_sent >= probe.every:
                probe.send()
                probe.last_sent = now
        return all(p.seen for p in probes)

    assert spin(executor, drive, timeout=60, period=0.03), (
        [p.name for p in probes if not p.seen],
        all_logs(log_dir),
    )

    # A flood of out-of-range but finite actions toward a corner: clipped, rate-limited, never out of the box.
    push_until = time.monotonic() + 1.0
    push = command([9.5, 9.5, 9.5], -1.0)
    spin(executor, lambda: push() or time.monotonic() > push_until, timeout=5, period=0.03)

    # Out-of-order and duplicate steps of a started episode. The policy node follows every START it hears, so
    # it is paused (SIGSTOP) while the test plays episode manager, and these episodes stay the test's own.
    dup, conflict, invalid = f"test-dup-{tag}", f"test-conflict-{tag}", f"bad id/{tag}"
    policy = next(c for c in runner.children if c.executable == "policy_node")
    policy.popen.send_signal(signal.SIGSTOP)
    try:
        start = {"task": "button-press-v3", "instruction": "press the button", "source": "expert"}
        events_pub(event(EpisodeEvent.START, invalid, **start))
        events_pub(event(EpisodeEvent.START, dup, **start))
        repeated = step_record(dup, 1)
        for record in (step_record(dup, 0), step_record(dup, 2), repeated, repeated):
            steps_pub(record)
        events_pub(event(EpisodeEvent.STEPS_DONE, dup, num_steps=3))
        events_pub(
            event(
                EpisodeEvent.END,
                dup,
                outcome=EpisodeEvent.OUTCOME_FAILURE,
                label_source=EpisodeEvent.LABEL_SOURCE_OPERATOR,
            )
        )
        events_pub(event(EpisodeEvent.START, conflict, **start))
        for record in (
            step_record(conflict, 0),
            step_record(conflict, 1),
            step_record(conflict, 1, action=[0.9, 0.9, 0.9, 0.9]),
            step_record(conflict, 2),
        ):
            steps_pub(record)
        events_pub(event(EpisodeEvent.STEPS_DONE, conflict, num_steps=3))
        events_pub(
            event(
                EpisodeEvent.END,
                conflict,
                outcome=EpisodeEvent.OUTCOME_FAILURE,
                label_source=EpisodeEvent.LABEL_SOURCE_OPERATOR,
            )
        )
        assert spin(executor, lambda: dup in w.acks and conflict in w.acks, timeout=30), all_logs(log_dir)
    finally:
        policy.popen.send_signal(signal.SIGCONT)
    assert f"episode event 0 for '{invalid}' rejected" in read_log(log_dir, "trainer_node")
    assert w.acks[dup].complete and w.acks[dup].num_steps == 3
    assert not w.acks[conflict].complete and w.acks[conflict].num_steps == 3

    # Every process is still up and the whole chain still works: episodes started from now on get stored.
    injected_until = time.monotonic()

    def fresh_acks() -> list[EpisodeStored]:
        return [w.acks[e] for t, e in w.starts if t > injected_until and e in w.acks]

    assert spin(executor, lambda: len(fresh_acks()) >= 2, timeout=120), all_logs(log_dir)
    assert runner.poll() is None, all_logs(log_dir)
    rejected = {m.name: m.value for m in w.trainer_status.metrics}["rejected_steps"]
    poses = np.array(w.poses)
    overlays = list(w.overlays)
    codes = runner.stop()
    node.destroy_node()
    # A clean exit, or the launcher's escalation when a loaded machine makes shutdown slow; never a crash.
    assert all(code in (0, -signal.SIGTERM, -signal.SIGKILL) for code in codes.values()), (
        codes,
        all_logs(log_dir),
    )

    # The arm never left its box (plus the hand's lag behind a target on the boundary).
    assert len(poses) > 100 and np.all(np.isfinite(poses))
    outside = poses[np.any((poses < low) | (poses > high), axis=1)]
    assert len(outside) == 0, (outside[:5], low, high)
    # The overlay never passed a malformed frame on.
    for overlay in overlays:
        try:
            assert msg_to_image(overlay).shape[2] == 3
        except ImageFormatError as exc:  # pragma: no cover - the assertion message is the point
            raise AssertionError(f"overlay published a malformed image: {exc}") from exc
    assert rejected >= 4

    with EpisodeStore(tmp_path / "store", read_only=True) as store:
        ids = {row.episode_id for row in store.list()}
        assert not any(e.startswith(f"test-unknown-{tag}") or e.startswith("bad id") for e in ids), ids
        record = store.read(dup)  # checksum verified, decodable
        assert record.complete and [s.step_index for s in record.steps] == [0, 1, 2]
        assert store.get(dup).complete and store.get(dup).num_steps == 3
        clash = store.read(conflict)
        assert not clash.complete and any(
            "conflicting duplicates at step indices 1" in r for r in clash.reasons
        )
        assert [s.step_index for s in clash.steps] == [0, 1, 2]
        first_arrival = step_record(conflict, 1).action.tolist()
        assert clash.steps[1].action.tolist() == first_arrival
        for ack in fresh_acks():
            fresh = store.read(ack.episode_id)
            assert fresh.complete and len(fresh.steps) == ack.num_steps > 0, fresh.reasons
