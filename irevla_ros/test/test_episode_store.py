"""Episode assembly, MCAP files and the SQLite catalogue, on real files (tmp_path) and real SQLite."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory

from irevla_ros.store import catalog
from irevla_ros.store import episode_store as es
from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.errors import (
    CorruptEpisodeError,
    EpisodeConflictError,
    EpisodeStateError,
    LateStepError,
    StoreLockedError,
    UnknownEpisodeError,
)
from irevla_ros.store.mcap_format import read_episode_info
from irevla_ros.store.records import AssembledEpisode, EpisodeMeta, InvalidRecordError, StepData

T0 = 1_700_000_000_000_000_000  # 2023-11-14 UTC
CAMERAS = ("front", "wrist")


def make_meta(eid: str, source: str = "policy") -> EpisodeMeta:
    return EpisodeMeta(
        episode_id=eid,
        task="button-press-v3",
        instruction="press the red button",
        policy_version="v7",
        source=source,
        started_ns=T0,
    )


def make_step(eid: str, index: int, seed: int = 0, size: int = 32) -> StepData:
    rng = np.random.default_rng([seed, index])
    stamp = T0 + index * 50_000_000
    return StepData(
        episode_id=eid,
        step_index=index,
        stamp_ns=stamp,
        images={c: rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for c in CAMERAS},
        image_stamps_ns={c: stamp - 3_000_000 - k for k, c in enumerate(CAMERAS)},
        proprioception=rng.standard_normal(9).astype(np.float32),
        proprioception_names=[f"joint{k}" for k in range(9)],
        instruction="press the red button",
        action=rng.standard_normal(4).astype(np.float32),
        log_prob=None if index % 3 == 0 else float(rng.standard_normal()),
        value=None if index % 4 == 0 else float(np.float32(rng.standard_normal())),
        policy_version="v7",
        intervention=index % 5 == 0,
        hold=index % 7 == 0,
    )


def assemble(
    eid: str,
    indices: list[int],
    num_steps: int | None,
    outcome: str = "success",
    label_source: str = "simulator",
    seed: int = 0,
    size: int = 32,
) -> AssembledEpisode:
    assembler = EpisodeAssembler()
    assembler.start(make_meta(eid))
    for i in indices:
        assembler.add_step(make_step(eid, i, seed, size))
    return assembler.end(eid, outcome, label_source, num_steps, T0 + 10**10)


@pytest.fixture
def store(tmp_path: Path):
    with EpisodeStore(tmp_path / "store") as s:
        yield s


# --- round trip --------------------------------------------------------------------------------------------


def test_write_read_round_trip_is_bitwise_and_catalogued(store: EpisodeStore):
    episode = assemble("ep-0001", list(range(12)), 12)
    stored = store.write(episode)

    assert stored.path == "episodes/2023-11-14/ep-0001.mcap"
    file_bytes = (store.root / stored.path).read_bytes()
    assert stored.sha256 == hashlib.sha256(file_bytes).hexdigest()
    assert stored.size_bytes == len(file_bytes)
    assert (stored.complete, stored.num_steps, stored.outcome, stored.label_source) == (
        True,
        12,
        "success",
        "simulator",
    )
    assert (stored.task, stored.source, stored.policy_version) == ("button-press-v3", "policy", "v7")
    assert stored.ended_ns == T0 + 10**10 and stored.started_ns == T0 and not stored.corrupt

    record = store.read("ep-0001")
    assert record.meta == episode.meta
    assert record.complete and record.reasons == []
    assert record.sha256 == stored.sha256 and record.path == store.root / stored.path
    assert len(record.steps) == 12
    for want, got in zip(episode.steps, record.steps, strict=True):
        assert got.same_as(want), f"step {want.step_index} differs"
        for c in CAMERAS:
            assert got.images[c].dtype == np.uint8 and got.images[c].shape == (32, 40, 3)
            assert got.images[c].tobytes() == want.images[c].tobytes()
        assert got.action.dtype == np.float32 and got.action.tobytes() == want.action.tobytes()
        assert got.proprioception.tobytes() == want.proprioception.tobytes()
        assert got.log_prob == want.log_prob and got.value == want.value
    assert record.steps[0].log_prob is None and record.steps[1].log_prob is not None

    # The catalogue row itself, read with a plain SQLite connection.
    conn = sqlite3.connect(store.root / "catalog.sqlite")
    row = conn.execute(
        "SELECT task, outcome, label_source, num_steps, complete, sha256, path FROM episodes "
        "WHERE episode_id = 'ep-0001'"
    ).fetchone()
    assert row == ("button-press-v3", "success", "simulator", 12, 1, stored.sha256, stored.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(catalog.SCHEMA_VERSION,)]
    conn.close()


def test_same_episode_twice_is_idempotent_and_different_content_conflicts(store: EpisodeStore):
    first = store.write(assemble("ep-a", list(range(5)), 5))
    again = store.write(assemble("ep-a", list(range(5)), 5))
    assert again == first
    with pytest.raises(EpisodeConflictError, match="ep-a"):
        store.write(assemble("ep-a", list(range(5)), 5, seed=1))
    assert store.get("ep-a").sha256 == first.sha256
    assert store.read("ep-a").sha256 == first.sha256
    assert not list((store.root / "episodes").glob("*/.*.tmp")), "failed write left a temp file"


# --- completeness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arrivals", "num_steps", "complete", "reason_parts"),
    [
        ([0, 1, 2, 3], 4, True, []),
        ([2, 0, 3, 1], 4, True, []),  # out of order, fills in
        ([0, 1, 1, 2], 3, True, []),  # identical repeat dropped
        ([0, 1, 3], 4, False, ["missing step indices 2 (1 of 4)", "received 3 distinct steps"]),
        ([0, 1, 2], 5, False, ["missing step indices 3-4", "producer reported 5"]),
        ([0, 1, 2, 3, 4], 3, False, ["received 5 distinct steps but the producer reported 3"]),
        ([0, 2, 4], None, False, ["missing step indices 1, 3"]),
        ([], 0, False, ["no steps received"]),
    ],
)
def test_assembler_judges_completeness(arrivals, num_steps, complete, reason_parts):
    episode = assemble("ep-x", arrivals, num_steps)
    assert episode.complete is complete
    joined = " | ".join(episode.reasons)
    for part in reason_parts:
        assert part in joined
    assert [s.step_index for s in episode.steps] == sorted(set(arrivals))
    assert episode.duplicates_dropped == len(arrivals) - len(set(arrivals))
    assert episode.meta.expected_steps == num_steps


def test_conflicting_duplicate_marks_incomplete_and_keeps_first():
    assembler = EpisodeAssembler()
    assembler.start(make_meta("ep-c"))
    for i in range(3):
        assembler.add_step(make_step("ep-c", i))
    assembler.add_step(make_step("ep-c", 1, seed=99))
    episode = assembler.end("ep-c", "failure", "simulator", 3, T0 + 1)
    assert not episode.complete
    assert episode.conflicting_duplicates == 1
    assert any("conflicting duplicates at step indices 1" in r for r in episode.reasons)
    assert episode.steps[1].same_as(make_step("ep-c", 1))


def test_assembler_rejects_unknown_and_late_steps_and_interleaves_episodes():
    assembler = EpisodeAssembler()
    with pytest.raises(UnknownEpisodeError, match="ep-none") as info:
        assembler.add_step(make_step("ep-none", 0))
    assert isinstance(info.value, ValueError)
    assembler.start(make_meta("ep-1"))
    assembler.start(make_meta("ep-2"))
    assembler.start(make_meta("ep-1"))  # identical re-sent START is harmless
    with pytest.raises(EpisodeStateError):
        assembler.start(make_meta("ep-1", source="expert"))
    for i in range(3):
        assembler.add_step(make_step("ep-2", i))
        assembler.add_step(make_step("ep-1", i))
    one = assembler.end("ep-1", "success", "operator", 3, T0 + 1)
    with pytest.raises(LateStepError, match="after its END"):
        assembler.add_step(make_step("ep-1", 3))
    with pytest.raises(EpisodeStateError):
        assembler.end("ep-1", "success", "operator", 3, T0 + 1)
    two = assembler.end("ep-2", "failure", "simulator", 3, T0 + 2)
    assert one.complete and two.complete
    assert (assembler.late_steps, assembler.unknown_steps) == (1, 1)
    assert assembler.open_episode_ids() == []
    with pytest.raises(InvalidRecordError, match="outcome"):
        assembler.start(make_meta("ep-3"))
        assembler.end("ep-3", "won", "operator", 0, T0)


def test_incomplete_episodes_are_stored_but_never_trainable(store: EpisodeStore):
    store.write(assemble("ok-1", [0, 1, 2], 3))
    store.write(assemble("ok-2", [0, 1, 2], 3, outcome="failure"))
    gap = store.write(assemble("gap", [0, 2], 3))
    short = store.write(assemble("short", [0, 1], 3))
    assert not gap.complete and not short.complete
    assert any("missing step indices 1" in r for r in gap.reasons)
    assert store.read("gap").steps[1].step_index == 2  # the data is kept
    assert {s.episode_id for s in store.trainable()} == {"ok-1", "ok-2"}
    assert {s.episode_id for s in store.trainable(outcome="success")} == {"ok-1"}
    assert {s.episode_id for s in store.list(complete=False)} == {"gap", "short"}
    assert {s.episode_id for s in store.list(task="button-press-v3", outcome="success")} == {
        "ok-1",
        "gap",
        "short",
    }
    assert store.list(policy_version="v0") == []
    stats = store.stats()
    assert (stats.total, stats.complete, stats.incomplete, stats.trainable) == (4, 2, 2, 2)
    assert stats.by_outcome == {"success": 3, "failure": 1}
    assert stats.trainable_by_outcome == {"success": 1, "failure": 1}


# --- labels ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operator_first", [True, False])
def test_operator_label_beats_automatic_regardless_of_order(store: EpisodeStore, operator_first: bool):
    store.write(assemble("ep-l", [0, 1], 2, outcome="success", label_source="simulator"))
    labels = [("failure", "operator", T0 + 1), ("success", "classifier", T0 + 2)]
    for outcome, source, stamp in labels if operator_first else reversed(labels):
        store.relabel("ep-l", outcome, source, stamp)
    stored = store.get("ep-l")
    assert (stored.outcome, stored.label_source) == ("failure", "operator")
    assert store.read("ep-l").meta.outcome == "failure"
    history = store.labels("ep-l")
    assert [(h.label_source, h.applied) for h in history] == [("simulator", True)] + (
        [("operator", True), ("classifier", False)]
        if operator_first
        else [("classifier", True), ("operator", True)]
    )
    # A later operator correction still wins over the earlier operator label.
    assert store.relabel("ep-l", "success", "operator", T0 + 3).outcome == "success"
    with pytest.raises(UnknownEpisodeError):
        store.relabel("nope", "success", "operator", T0)
    with pytest.raises(InvalidRecordError, match="label_source"):
        store.relabel("ep-l", "success", "robot", T0)


# --- crash safety ------------------------------------------------------------------------------------------


def _crash_at(stage: str):
    def hook(current: str) -> None:
        if current == stage:
            raise es._SimulatedCrash(stage)

    return hook


def test_crash_after_rename_is_reindexed_on_open(tmp_path: Path):
    root = tmp_path / "store"
    store = EpisodeStore(root)
    store._fault_hook = _crash_at("after_rename")
    for eid, indices in (("ep-full", [0, 1, 2]), ("ep-gappy", [0, 2])):
        with pytest.raises(es._SimulatedCrash):
            store.write(assemble(eid, indices, 3))
    assert store.list() == []
    store._fault_hook = None
    # A retry in the same session (e.g. the commit failed) completes the interrupted write.
    assert store.write(assemble("ep-full", [0, 1, 2], 3)).complete
    with pytest.raises(EpisodeConflictError, match="different content"):
        store.write(assemble("ep-gappy", [0, 2], 3, seed=5))
    store.close()

    with EpisodeStore(root) as reopened:
        assert reopened.last_recovery.reindexed == ["ep-gappy"]
        assert reopened.last_recovery.clean
        full, gappy = reopened.get("ep-full"), reopened.get("ep-gappy")
        assert full.complete and full.num_steps == 3 and full.outcome == "success"
        assert not gappy.complete and any("missing step indices 1" in r for r in gappy.reasons)
        assert [s.episode_id for s in reopened.trainable()] == ["ep-full"]
        record = reopened.read("ep-full")
        assert all(
            a.same_as(b) for a, b in zip(record.steps, assemble("ep-full", [0, 1, 2], 3).steps, strict=True)
        )
        assert reopened.labels("ep-full")[0].label_source == "simulator"
    with EpisodeStore(root) as again:
        assert again.last_recovery.reindexed == []


def test_crash_before_rename_leaves_only_an_orphan_temp_that_is_removed(tmp_path: Path):
    root = tmp_path / "store"
    store = EpisodeStore(root)
    store._fault_hook = _crash_at("after_temp_fsync")
    with pytest.raises(es._SimulatedCrash):
        store.write(assemble("ep-t", [0, 1], 2))
    store.close()
    temps = list((root / "episodes").glob("*/.*.tmp"))
    assert len(temps) == 1

    with EpisodeStore(root) as reopened:
        assert reopened.last_recovery.removed_temp_files == [temps[0].relative_to(root).as_posix()]
        assert not temps[0].exists()
        assert reopened.list() == []
        # The producer re-sends the unacknowledged episode: it is stored normally.
        assert reopened.write(assemble("ep-t", [0, 1], 2)).complete


def test_corrupt_and_missing_files_are_reported_and_never_deleted(tmp_path: Path):
    root = tmp_path / "store"
    with EpisodeStore(root) as store:
        good = store.write(assemble("ep-good", [0, 1, 2], 3))
        bad = store.write(assemble("ep-bad", [0, 1, 2], 3))
        gone = store.write(assemble("ep-gone", [0, 1, 2], 3))
    bad_path = root / bad.path
    original = bad_path.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0xFF
    bad_path.write_bytes(bytes(damaged))
    (root / gone.path).unlink()

    with EpisodeStore(root) as store:
        report = store.last_recovery
        assert (report.corrupt, report.missing, report.reindexed) == (["ep-bad"], ["ep-gone"], [])
        assert bad_path.read_bytes() == bytes(damaged), "recovery must not touch a corrupt file"
        assert store.get("ep-bad").corrupt and store.get("ep-bad").corrupt_reason == "checksum mismatch"
        assert store.get("ep-gone").corrupt_reason == "file missing"
        assert [s.episode_id for s in store.trainable()] == ["ep-good"]
        assert store.stats().corrupt == 2
        with pytest.raises(CorruptEpisodeError, match=str(bad_path)):
            store.read("ep-bad")
        with pytest.raises(CorruptEpisodeError, match="missing"):
            store.read("ep-gone")
        assert store.read("ep-good").sha256 == good.sha256
        # Re-sending the same episode repairs the missing file.
        repaired = store.write(assemble("ep-gone", [0, 1, 2], 3))
        assert not repaired.corrupt and repaired.sha256 == gone.sha256
        assert store.read("ep-gone").complete

    bad_path.write_bytes(original)  # e.g. restored from a backup
    with EpisodeStore(root) as store:
        assert store.last_recovery.restored == ["ep-bad"]
        assert {s.episode_id for s in store.trainable()} == {"ep-good", "ep-bad", "ep-gone"}


def test_read_detects_corruption_that_happens_while_open(store: EpisodeStore):
    stored = store.write(assemble("ep-r", [0, 1], 2))
    path = store.root / stored.path
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(CorruptEpisodeError, match=r"ep-r\.mcap"):
        store.read("ep-r")
    assert store.get("ep-r").corrupt
    assert store.trainable() == []


_CHILD = r"""
import sys
import numpy as np
from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import EpisodeMeta, StepData

root, prefix = sys.argv[1], sys.argv[2]
store = EpisodeStore(root)
assembler = EpisodeAssembler()
rng = np.random.default_rng(0)
# A pool of images keeps assembly cheap, so most of the child's time (and the kill) falls inside write().
pool = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(16)]
for n in range(10_000):
    eid = f"{prefix}-{n:05d}"
    assembler.start(EpisodeMeta(eid, "reach-v3", "reach", "v1", "policy", 1_700_000_000_000_000_000 + n))
    indices = [i for i in range(25) if not (n % 3 == 2 and i == 7)]  # every third episode has a gap
    for i in indices:
        imgs = {"front": pool[(n + i) % 16], "wrist": pool[(n * 3 + i) % 16]}
        assembler.add_step(StepData(
            eid, i, 1_700_000_000_000_000_000 + i, imgs, {c: i for c in imgs},
            rng.standard_normal(7).astype(np.float32), [], "reach", rng.standard_normal(4).astype(np.float32),
            -1.0, None, "v1", False, False))
    stored = store.write(assembler.end(eid, "success", "simulator", 25, 1_700_000_000_000_000_999))
    print(f"ACK {eid} {int(stored.complete)}", flush=True)
"""


def test_sigkill_during_writes_loses_no_acknowledged_episode(tmp_path: Path):
    root = tmp_path / "store"
    acked: dict[str, bool] = {}
    # Different delays after the last ack land the kill in different phases of the next write().
    for round_, (acks_before_kill, delay_s) in enumerate(((6, 0.0), (4, 0.004), (3, 0.012))):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root), f"r{round_}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,  # not the repo root, whose irevla_ros/ folder would shadow the installed package
        )
        try:
            seen = 0
            while seen < acks_before_kill:
                line = proc.stdout.readline()
                assert line, f"child exited early: {proc.stderr.read()}"
                _, eid, complete = line.split()
                acked[eid] = complete == "1"
                seen += 1
            time.sleep(delay_s)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

    assert sum(not c for c in acked.values()) >= 2, "the child should have stored some incomplete episodes"
    with EpisodeStore(root) as store:
        report = store.last_recovery
        assert report.missing == [] and report.corrupt == [] and report.unreadable_files == []
        rows = {s.episode_id: s for s in store.list()}
        for eid, complete in acked.items():
            assert eid in rows, f"acknowledged episode {eid} lost"
            assert rows[eid].complete is complete and not rows[eid].corrupt
        for eid, row in rows.items():
            record = store.read(eid)  # verifies the checksum
            contiguous = [s.step_index for s in record.steps] == list(range(25))
            assert row.complete == contiguous == record.complete, f"{eid}: completeness flag is wrong"


# --- MCAP layout -------------------------------------------------------------------------------------------


def test_mcap_file_is_a_ros2_bag_readable_by_the_plain_reader(store: EpisodeStore):
    episode = assemble("ep-m", list(range(4)), 4)
    stored = store.write(episode)
    with open(store.root / stored.path, "rb") as f:
        reader = make_reader(f)
        assert reader.get_header().profile == "ros2"
        summary = reader.get_summary()
        channels = {c.topic: c for c in summary.channels.values()}
        assert set(channels) == {
            "/front/front/color/image_raw",
            "/wrist/wrist/color/image_raw",
            "/policy/episode_step",
            "/policy/action",
        }
        assert {c.message_encoding for c in channels.values()} == {"cdr"}
        schemas = {summary.schemas[c.schema_id].name for c in channels.values()}
        assert schemas == {
            "sensor_msgs/msg/Image",
            "irevla_interfaces/msg/EpisodeStep",
            "irevla_interfaces/msg/ArmCommand",
        }
        assert {s.encoding for s in summary.schemas.values()} == {"ros2msg"}
        assert all(summary.statistics.channel_message_counts[c.id] == 4 for c in channels.values())
        metadata = {m.name: m.metadata for m in reader.iter_metadata()}
        assert metadata["irevla_episode"]["episode_id"] == "ep-m"
        assert metadata["irevla_episode"]["outcome"] == "success"
        assert metadata["irevla_assembly"]["complete"] == "true"
    with open(store.root / stored.path, "rb") as f:
        reader = make_reader(f, decoder_factories=[DecoderFactory()])
        wrist = "/wrist/wrist/color/image_raw"
        for _, _channel, message, msg in reader.iter_decoded_messages(topics=[wrist]):
            step = episode.steps[message.sequence]
            assert message.log_time == step.image_stamps_ns["wrist"]  # published when captured
            assert (msg.encoding, msg.height, msg.width, msg.step) == ("rgb8", 32, 40, 120)
            assert msg.header.frame_id == "wrist"  # these steps carry no frame id: the camera name
            assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == step.image_stamps_ns["wrist"]
            assert bytes(msg.data) == step.images["wrist"].tobytes()


# --- store mechanics ---------------------------------------------------------------------------------------


def test_single_writer_lock_and_read_only_access(tmp_path: Path):
    root = tmp_path / "store"
    with EpisodeStore(root) as store:
        store.write(assemble("ep-1", [0, 1], 2))
        with pytest.raises(StoreLockedError):
            EpisodeStore(root)
        reader = EpisodeStore(root, read_only=True)
        assert reader.read("ep-1").complete
        with pytest.raises(RuntimeError, match="read-only"):
            reader.write(assemble("ep-2", [0], 1))
        reader.close()
    with EpisodeStore(root) as store:  # the lock is released on close
        assert "ep-1" in store


def test_concurrent_writes_from_threads(store: EpisodeStore):
    episodes = [assemble(f"ep-{k}", list(range(6)), 6, seed=k) for k in range(8)]
    errors: list[BaseException] = []

    def write(chunk: list[AssembledEpisode]) -> None:
        try:
            for episode in chunk:
                store.write(episode)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(episodes[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.trainable()) == 8
    for episode in episodes:
        assert store.read(episode.meta.episode_id).steps[5].same_as(episode.steps[5])


def test_schema_migration_hook_and_newer_schema_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "store"
    with EpisodeStore(root) as store:
        store.write(assemble("ep-1", [0], 1))

    def add_notes(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE episodes ADD COLUMN notes TEXT NOT NULL DEFAULT ''")

    latest = catalog.SCHEMA_VERSION
    monkeypatch.setattr(catalog, "MIGRATIONS", {**catalog.MIGRATIONS, latest + 1: add_notes})
    monkeypatch.setattr(catalog, "SCHEMA_VERSION", latest + 1)
    with EpisodeStore(root) as store:
        assert store.get("ep-1").complete
        columns = [r[1] for r in store._conn.execute("PRAGMA table_info(episodes)")]
        assert "notes" in columns
    monkeypatch.setattr(catalog, "SCHEMA_VERSION", latest)
    with pytest.raises(RuntimeError, match=f"schema version {latest + 1}"):
        EpisodeStore(root)
    EpisodeStore(root.parent / "other").close()  # a failed open released its lock


def test_bad_records_raise_clear_errors():
    step = make_step("ep-1", 0)
    with pytest.raises(InvalidRecordError, match="action"):
        StepData(**{**step.__dict__, "action": step.action.astype(np.float64)})
    with pytest.raises(InvalidRecordError, match="image 'front'"):
        StepData(**{**step.__dict__, "images": {**step.images, "front": step.images["front"][..., :1]}})
    with pytest.raises(InvalidRecordError, match="image_stamps_ns"):
        StepData(**{**step.__dict__, "image_stamps_ns": {"front": 1}})
    with pytest.raises(InvalidRecordError, match="camera name"):
        StepData(**{**step.__dict__, "images": {"front/cam": step.images["front"]}, "image_stamps_ns": {}})
    with pytest.raises(InvalidRecordError, match="episode_id"):
        make_meta("../escape")
    with pytest.raises(InvalidRecordError, match="source"):
        make_meta("ep-1", source="robot")


def test_write_throughput_two_128px_cameras(store: EpisodeStore):
    episodes = [assemble(f"ep-{k}", list(range(100)), 100, seed=k, size=128) for k in range(3)]
    start = time.perf_counter()
    for episode in episodes:
        store.write(episode)
    per_episode = (time.perf_counter() - start) / len(episodes)
    print(f"write: {per_episode * 1e3:.0f} ms per 100-step episode ({100 / per_episode:.0f} steps/s)")
    # Control runs at ~10-20 Hz: storing must stay far faster than real time even on 2 cores.
    assert per_episode < 2.0


def test_catalogue_names_the_version_the_step_records_name(store: EpisodeStore):
    """The episode manager's START does not know the policy's version; the step records do."""
    assembler = EpisodeAssembler()
    assembler.start(dataclasses.replace(make_meta("swap"), policy_version=""))
    for i in range(4):  # a Stage 1 head update swapped in between ticks 1 and 2
        assembler.add_step(dataclasses.replace(make_step("swap", i), policy_version="v8" if i < 2 else "v9"))
    stored = store.write(assembler.end("swap", "success", "simulator", 4, T0 + 10**10))
    assert stored.policy_version == "v8" and store.list(policy_version="v8")[0].episode_id == "swap"
    assert [s.policy_version for s in store.read("swap").steps] == ["v8", "v8", "v9", "v9"]


# --- step timing: stamps on the control grid, no observation from the future -------------------------------

PERIOD = 50_000_000  # make_step's spacing


def _assemble_with(eid: str, change: dict[int, dict[str, object]], period: int | None = PERIOD):
    assembler = EpisodeAssembler(control_period_ns=period)
    assembler.start(make_meta(eid))
    for i in range(6):
        step = make_step(eid, i)
        assembler.add_step(dataclasses.replace(step, **change.get(i, {})))
    return assembler.end(eid, "success", "simulator", 6, T0 + 10**10)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {3: {"stamp_ns": T0 + 2 * PERIOD}},
            "1 step(s) not stamped after the previous step (first: step 3, +0.0 ms)",
        ),
        (
            {3: {"stamp_ns": T0 + PERIOD}},
            "1 step(s) not stamped after the previous step (first: step 3, -50.0 ms)",
        ),
        (
            {3: {"stamp_ns": T0 + 5 * PERIOD}},
            "not one control period (50 ms) after the previous one (first: step 3",
        ),
        (
            {2: {"image_stamps_ns": {"front": T0 + 2 * PERIOD + 1, "wrist": T0 + 2 * PERIOD}}},
            "1 image(s) captured after the step that acted on them (first: step 2, camera 'front', +0.0 ms)",
        ),
    ],
    ids=["equal-stamps", "stamp-backwards", "off-grid", "image-from-the-future"],
)
def test_steps_breaking_time_are_stored_incomplete_with_the_reason(store: EpisodeStore, change, reason):
    episode = _assemble_with("ep-t", change)
    assert not episode.complete and episode.timing_errors >= 1
    assert any(r.startswith("timing: ") and reason in r for r in episode.reasons), episode.reasons
    stored = store.write(episode)
    assert not stored.complete and stored.timing_errors == episode.timing_errors
    assert store.trainable() == []
    row = (
        sqlite3.connect(store.root / "catalog.sqlite")
        .execute("SELECT timing_errors FROM episodes")
        .fetchone()
    )
    assert row == (episode.timing_errors,)
    # Re-indexed from its own file (catalogue lost), the count comes back.
    with sqlite3.connect(store.root / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM labels")
        conn.execute("DELETE FROM episodes")
    assert store.recover().reindexed == ["ep-t"]
    assert store.get("ep-t").timing_errors == episode.timing_errors


def test_steps_on_the_grid_within_jitter_are_complete():
    jitter = {
        i: {"stamp_ns": T0 + i * PERIOD + (i % 2) * PERIOD // 5} for i in range(6)
    }  # +10 ms every other
    episode = _assemble_with("ep-ok", jitter)
    assert episode.complete and episode.timing_errors == 0, episode.reasons
    # A missing step is reported as missing, not as a timing error of the step after it.
    assembler = EpisodeAssembler(control_period_ns=PERIOD)
    assembler.start(make_meta("ep-gap"))
    for i in (0, 1, 3):
        assembler.add_step(make_step("ep-gap", i))
    gap = assembler.end("ep-gap", "success", "simulator", 4, T0)
    assert gap.timing_errors == 0 and not any(r.startswith("timing") for r in gap.reasons), gap.reasons
    # Without a known period only the order and the observation ages are checked.
    assert _assemble_with("ep-np", {5: {"stamp_ns": T0 + 9 * PERIOD}}, period=None).complete


def test_v1_catalogue_migrates_to_timing_errors(tmp_path: Path):
    root = tmp_path / "store"
    root.mkdir()
    conn = sqlite3.connect(root / "catalog.sqlite")  # a catalogue as the code before the timing check left it
    catalog.MIGRATIONS[1](conn)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    conn.execute(
        "INSERT INTO episodes (episode_id, task, instruction, outcome, label_source, policy_version, source, "
        "num_steps, complete, reasons, sha256, path, size_bytes, started_ns, ended_ns, stored_ns) "
        "VALUES ('ep-old', 't', 'i', 'success', 'simulator', 'v1', 'policy', 3, 1, '[]', 'x', 'p.mcap', 1, 0, 1, 2)"
    )
    conn.commit()
    conn.close()
    with EpisodeStore(root, verify_on_open=False) as store:
        assert (
            store._conn.execute("SELECT version FROM schema_version").fetchone()[0]
            == catalog.SCHEMA_VERSION
            == 4
        )
        stored = store.get("ep-old")
        assert stored.timing_errors == 0 and stored.complete and stored.num_steps == 3


# --- the scene seed (schema v4) ----------------------------------------------------------------------------

FORMAT1_FIXTURE = Path(__file__).parent / "data" / "episode_format1.mcap"


def test_scene_seed_is_kept_in_the_file_and_the_catalogue_and_comes_back_on_reindexing(store: EpisodeStore):
    seed = 2**40 + 3  # beyond 32 bits: int64 all the way
    seeded = assemble("ep-seeded", list(range(4)), 4)
    seeded = dataclasses.replace(seeded, meta=dataclasses.replace(seeded.meta, scene_seed=seed))
    assert store.write(seeded).scene_seed == seed
    assert store.write(assemble("ep-robot", list(range(4)), 4)).scene_seed is None  # none known
    assert store.get("ep-seeded").scene_seed == seed and store.read("ep-seeded").meta.scene_seed == seed
    assert store.read("ep-robot").meta.scene_seed is None
    with sqlite3.connect(store.root / "catalog.sqlite") as conn:
        rows = dict(conn.execute("SELECT episode_id, scene_seed FROM episodes").fetchall())
    assert rows == {"ep-seeded": seed, "ep-robot": None}
    for eid, text in (("ep-seeded", str(seed)), ("ep-robot", "")):
        with open(store.absolute_path(store.get(eid)), "rb") as f:
            metadata = {m.name: m.metadata for m in make_reader(f).iter_metadata()}
        assert metadata["irevla_episode"]["scene_seed"] == text
    # The catalogue lost: re-indexed from the files' own metadata, the seeds come back.
    with sqlite3.connect(store.root / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM labels")
        conn.execute("DELETE FROM episodes")
    assert sorted(store.recover().reindexed) == ["ep-robot", "ep-seeded"]
    assert store.get("ep-seeded").scene_seed == seed and store.get("ep-robot").scene_seed is None


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, True, "7"])
def test_a_scene_seed_outside_int64_is_refused(bad: object):
    with pytest.raises(InvalidRecordError, match="scene_seed"):
        dataclasses.replace(make_meta("ep-1"), scene_seed=bad)


def test_v3_catalogue_migrates_keeping_its_rows_with_the_scene_seed_unknown(tmp_path: Path):
    """A store as the code before the scene seed left it: a v3 catalogue and a file without the seed (the format 1
    fixture, whose metadata has no scene_seed either)."""
    root = tmp_path / "store"
    rel = "episodes/2023-11-14/legacy-v1-0001.mcap"
    (root / rel).parent.mkdir(parents=True)
    data = FORMAT1_FIXTURE.read_bytes()
    (root / rel).write_bytes(data)
    meta = read_episode_info(data).meta
    conn = sqlite3.connect(root / "catalog.sqlite")
    for version in (1, 2, 3):
        catalog.MIGRATIONS[version](conn)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version (version) VALUES (3)")
    conn.execute(
        "INSERT INTO episodes (episode_id, task, instruction, outcome, label_source, policy_version, source, "
        "num_steps, complete, reasons, sha256, path, size_bytes, started_ns, ended_ns, stored_ns, timing_errors, "
        "interventions, intervention_steps) VALUES (?, ?, ?, ?, ?, ?, ?, 3, 1, '[]', ?, ?, ?, ?, ?, 5, 0, 1, 1)",
        (
            meta.episode_id,
            meta.task,
            meta.instruction,
            meta.outcome,
            meta.label_source,
            meta.policy_version,
            meta.source,
            hashlib.sha256(data).hexdigest(),
            rel,
            len(data),
            meta.started_ns,
            meta.ended_ns,
        ),
    )
    conn.execute(
        "INSERT INTO labels (episode_id, outcome, label_source, stamp_ns, applied) VALUES (?, ?, ?, 4, 1)",
        (meta.episode_id, meta.outcome, meta.label_source),
    )
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="needs migration"):
        EpisodeStore(root, read_only=True)  # a reader never migrates
    with EpisodeStore(root) as store:
        assert store._conn.execute("SELECT version FROM schema_version").fetchone()[0] == 4
        assert store.last_recovery.clean and store.last_recovery.reindexed == []
        [old] = store.list()
        assert (old.episode_id, old.num_steps, old.interventions, old.stored_ns) == (meta.episode_id, 3, 1, 5)
        assert old.scene_seed is None and old.trainable and old.sha256 == hashlib.sha256(data).hexdigest()
        assert [entry.stamp_ns for entry in store.labels(meta.episode_id)] == [4]
        record = store.read(meta.episode_id)  # the old file still reads, checksum verified
        assert len(record.steps) == 3 and record.meta.scene_seed is None
        # New episodes in the migrated store carry their seed.
        fresh = assemble("ep-new", list(range(3)), 3)
        fresh = dataclasses.replace(fresh, meta=dataclasses.replace(fresh.meta, scene_seed=11))
        assert store.write(fresh).scene_seed == 11
    with EpisodeStore(root, read_only=True) as reader:
        assert {r.episode_id: r.scene_seed for r in reader.list()} == {meta.episode_id: None, "ep-new": 11}
