"""Durable episode storage: the one owner of episode files and the episode catalogue (schema: `catalog`;
assembly of episodes from steps: `assembler`, `collector`).

On disk (`root/`):
- `episodes/<YYYY-MM-DD>/<episode_id>.mcap`: one immutable rosbag2-compatible MCAP per episode (UTC date of
  `started_ns`), see `mcap_format`.
- `catalog.sqlite`: one row per episode plus the label history (WAL, synchronous=FULL).
- `.lock`: flock held by the single writing `EpisodeStore` of this root.

Write order (the acknowledgement point is the return of `EpisodeStore.write`): temp file in the final
directory -> fsync -> rename -> fsync directory (`durable`) -> catalogue commit. A crash leaves either an orphan
temp file (deleted on the next open) or a final file without a row (re-indexed from its own metadata on the next
open).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from irevla_ros import durable
from irevla_ros.store import catalog
from irevla_ros.store.errors import (
    CorruptEpisodeError,
    EpisodeConflictError,
    StoreLockedError,
    UnknownEpisodeError,
)
from irevla_ros.store.mcap_format import (
    COMPRESSIONS,
    EpisodeFormatError,
    decode_episode,
    read_episode_info,
    write_episode,
)
from irevla_ros.store.records import (
    LABEL_SOURCES,
    OUTCOMES,
    AssembledEpisode,
    EpisodeMeta,
    EpisodeRecord,
    InvalidRecordError,
    LabelEntry,
    RecoveryReport,
    StepData,
    StoredEpisode,
    StoreStats,
    check_episode_id,
    intervention_segments,
    label_wins,
)

__all__ = ["EpisodeStore"]

TEMP_SUFFIX = durable.TEMP_SUFFIX
EPISODES_DIR = "episodes"
CATALOG_NAME = "catalog.sqlite"


class _HashingWriter:
    """File wrapper for the MCAP writer that hashes exactly the bytes that go to disk."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _file_sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _intervention_counts(steps: list[StepData]) -> tuple[int, int]:
    """(takeovers, operator-commanded steps) of an episode's recorded steps."""
    flags = [bool(s.intervention) for s in steps]
    return len(intervention_segments(flags)), sum(flags)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidRecordError(f"{name} {value!r} is not one of {allowed}")


class _SimulatedCrash(BaseException):
    """Raised by test fault hooks: a BaseException so write()'s cleanup does not run, as in a real crash."""


class EpisodeStore:
    """Durable episode files + SQLite catalogue. Thread-safe; one writing instance per root (flock).

    `read_only=True` opens without the lock and without recovery (e.g. a dataset loader next to the writer).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        read_only: bool = False,
        compression: str = "zstd",
        verify_on_open: bool = True,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r} is not one of {sorted(COMPRESSIONS)}")
        self.root = Path(root)
        self.read_only = read_only
        self.compression = compression
        self._lock = threading.RLock()
        self._inflight_temps: set[Path] = set()
        # Test-only: called with a stage name during write(); raising _SimulatedCrash there mimics a crash.
        self._fault_hook: Callable[[str], None] | None = None
        self._lock_fd: int | None = None
        if read_only:
            if not (self.root / CATALOG_NAME).exists():
                raise FileNotFoundError(f"no episode catalogue at {self.root / CATALOG_NAME}")
        else:
            (self.root / EPISODES_DIR).mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                os.close(self._lock_fd)
                self._lock_fd = None
                raise StoreLockedError(f"episode store {self.root} is already open for writing") from exc
        self._conn: sqlite3.Connection | None = None
        try:
            self._conn = sqlite3.connect(
                self.root / CATALOG_NAME, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._conn.row_factory = sqlite3.Row
            if not read_only:
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            if not read_only:
                durable.fsync_dir(
                    self.root
                )  # a freshly created catalogue's directory entry must be durable too
                self._count_interventions()
            self.last_recovery = (
                RecoveryReport() if read_only else self.recover(verify_checksums=verify_on_open)
            )
        except BaseException:
            self.close()
            raise

    # -- lifecycle --------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> EpisodeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return catalog.transaction(self._conn)

    def _migrate(self) -> None:
        with self._lock:
            catalog.migrate(self._conn, read_only=self.read_only, where=str(self.root / CATALOG_NAME))

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError(f"episode store {self.root} was opened read-only")
        if self._conn is None:
            raise RuntimeError(f"episode store {self.root} is closed")

    # -- paths ------------------------------------------------------------------------------------------

    def relative_path(self, meta: EpisodeMeta) -> str:
        day = datetime.fromtimestamp(meta.started_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d")
        return f"{EPISODES_DIR}/{day}/{meta.episode_id}.mcap"

    def absolute_path(self, stored: StoredEpisode) -> Path:
        return self.root / stored.path

    # -- write ------------------------------------------------------------------------------------------

    def write(self, episode: AssembledEpisode) -> StoredEpisode:
        """Store an assembled episode durably; returns once file and catalogue row are on disk.

        Writing the same id again with identical content returns the stored row (and repairs a missing or
        corrupt file); different content raises EpisodeConflictError.
        """
        self._check_writable()
        self._check_assembled(episode)
        rel = self.relative_path(episode.meta)
        final = self.root / rel
        self._ensure_dir(final.parent)
        # Encoding is the slow part, so it runs outside the store lock into a private temp file.
        temp, sha, size = self._write_temp(episode, final)
        try:
            with self._lock:
                self._check_writable()
                existing = self._row(episode.meta.episode_id)
                if existing is not None:
                    return self._rewrite_existing(existing, episode, temp, sha)
                if final.exists():
                    # An earlier write of this episode got past the rename but not the commit.
                    if _file_sha256(final)[0] != sha:
                        raise EpisodeConflictError(
                            f"{final} exists, is not in the catalogue and holds different content; "
                            f"move it away before storing episode {episode.meta.episode_id!r} again"
                        )
                    temp.unlink()
                else:
                    self._publish(temp, final)
                stored = self._insert(
                    episode.meta,
                    episode.complete,
                    episode.reasons,
                    len(episode.steps),
                    sha,
                    rel,
                    size,
                    episode.timing_errors,
                    _intervention_counts(episode.steps),
                )
                self._hook("after_commit")
                return stored
        except Exception:
            temp.unlink(missing_ok=True)
            raise
        finally:
            self._inflight_temps.discard(temp)

    def _check_assembled(self, episode: AssembledEpisode) -> None:
        check_episode_id(episode.meta.episode_id)
        previous = -1
        for step in episode.steps:
            if step.episode_id != episode.meta.episode_id:
                raise InvalidRecordError(
                    f"step {step.step_index} belongs to {step.episode_id!r}, not {episode.meta.episode_id!r}"
                )
            if step.step_index <= previous:
                raise InvalidRecordError(
                    f"episode {episode.meta.episode_id!r}: steps must be sorted with unique indices "
                    f"({step.step_index} after {previous})"
                )
            previous = step.step_index
        if episode.complete and episode.reasons:
            raise InvalidRecordError(f"episode {episode.meta.episode_id!r} is complete but has reasons")

    def _hook(self, stage: str) -> None:
        if self._fault_hook is not None:
            self._fault_hook(stage)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        directory.mkdir(parents=True, exist_ok=True)
        # The new directory entry itself must be durable, not only the files in it.
        durable.fsync_dir(directory.parent)
        durable.fsync_dir(self.root)

    def _write_temp(self, episode: AssembledEpisode, final: Path) -> tuple[Path, str, int]:
        temp = durable.temp_path(final)
        self._inflight_temps.add(temp)
        try:
            with durable.synced_file(temp) as f:
                hashing = _HashingWriter(f)
                write_episode(hashing, episode, self.compression)
        except Exception:
            self._inflight_temps.discard(temp)
            raise
        self._hook("after_temp_fsync")
        return temp, hashing.hexdigest(), hashing.size

    def _publish(self, temp: Path, final: Path) -> None:
        durable.publish(temp, final, hook=self._hook)
        self._hook("after_dir_fsync")

    def _insert(
        self,
        meta: EpisodeMeta,
        complete: bool,
        reasons: list[str],
        num_steps: int,
        sha: str,
        rel: str,
        size: int,
        timing_errors: int,
        interventions: tuple[int, int],
    ) -> StoredEpisode:
        stored_ns = time.time_ns()
        with self._transaction() as conn:
            conn.execute(
                catalog.INSERT_EPISODE,
                (
                    meta.episode_id,
                    meta.task,
                    meta.instruction,
                    meta.outcome,
                    meta.label_source,
                    meta.policy_version,
                    meta.source,
                    num_steps,
                    int(complete),
                    json.dumps(reasons),
                    sha,
                    rel,
                    size,
                    meta.started_ns,
                    meta.ended_ns,
                    stored_ns,
                    timing_errors,
                    *interventions,
                    None if meta.scene_seed is None else int(meta.scene_seed),
                ),
            )
            conn.execute(
                catalog.INSERT_LABEL,
                (meta.episode_id, meta.outcome, meta.label_source, meta.ended_ns or stored_ns, 1),
            )
        stored = self._row(meta.episode_id)
        assert stored is not None
        return stored

    def _rewrite_existing(
        self, existing: StoredEpisode, episode: AssembledEpisode, temp: Path, sha: str
    ) -> StoredEpisode:
        if sha != existing.sha256:
            raise EpisodeConflictError(
                f"episode {existing.episode_id!r} is already stored ({existing.path}, sha256 "
                f"{existing.sha256[:12]}...) with different content (sha256 {sha[:12]}...)"
            )
        final = self.root / existing.path
        if final.exists() and _file_sha256(final)[0] == sha:
            temp.unlink()
            return existing
        # Same content as catalogued but the file is gone or damaged: the re-sent episode repairs it.
        self._ensure_dir(final.parent)
        self._publish(temp, final)
        with self._transaction() as conn:
            conn.execute(
                "UPDATE episodes SET corrupt = 0, corrupt_reason = '' WHERE episode_id = ?",
                (existing.episode_id,),
            )
        restored = self._row(existing.episode_id)
        assert restored is not None
        return restored

    # -- queries ----------------------------------------------------------------------------------------

    def _row(self, episode_id: str) -> StoredEpisode | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM episodes WHERE episode_id = ?", (episode_id,)).fetchone()
        return None if row is None else catalog.to_stored(row)

    def get(self, episode_id: str) -> StoredEpisode:
        stored = self._row(episode_id)
        if stored is None:
            raise UnknownEpisodeError(
                f"episode {episode_id!r} is not in the catalogue {self.root / CATALOG_NAME}"
            )
        return stored

    def __contains__(self, episode_id: str) -> bool:
        return self._row(episode_id) is not None

    def list(
        self,
        *,
        task: str | None = None,
        outcome: str | None = None,
        source: str | None = None,
        complete: bool | None = None,
        policy_version: str | None = None,
        label_source: str | None = None,
        corrupt: bool | None = None,
    ) -> list[StoredEpisode]:
        """Catalogue rows matching every given filter, oldest first."""
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("task", task),
            ("outcome", outcome),
            ("source", source),
            ("policy_version", policy_version),
            ("label_source", label_source),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        for column, flag in (("complete", complete), ("corrupt", corrupt)):
            if flag is not None:
                clauses.append(f"{column} = ?")
                params.append(int(flag))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._lock:
            rows = self._conn.execute(
                f"SELECT * FROM episodes {where} ORDER BY started_ns, episode_id", params
            ).fetchall()
        return [catalog.to_stored(r) for r in rows]

    def trainable(
        self,
        *,
        task: str | None = None,
        outcome: str | None = None,
        source: str | None = None,
        policy_version: str | None = None,
    ) -> list[StoredEpisode]:
        """Episodes fit for training: complete and not corrupt. Incomplete episodes never appear here."""
        return self.list(
            task=task,
            outcome=outcome,
            source=source,
            policy_version=policy_version,
            complete=True,
            corrupt=False,
        )

    def stats(self) -> StoreStats:
        with self._lock:
            rows = self._conn.execute(
                "SELECT outcome, complete, corrupt, COUNT(*) AS n FROM episodes "
                "GROUP BY outcome, complete, corrupt"
            ).fetchall()
        stats = StoreStats(0, 0, 0, 0, 0, {}, {})
        for row in rows:
            n = row["n"]
            stats.total += n
            stats.by_outcome[row["outcome"]] = stats.by_outcome.get(row["outcome"], 0) + n
            stats.complete += n if row["complete"] else 0
            stats.incomplete += 0 if row["complete"] else n
            stats.corrupt += n if row["corrupt"] else 0
            if row["complete"] and not row["corrupt"]:
                stats.trainable += n
                stats.trainable_by_outcome[row["outcome"]] = (
                    stats.trainable_by_outcome.get(row["outcome"], 0) + n
                )
        return stats

    def labels(self, episode_id: str) -> list[LabelEntry]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM labels WHERE episode_id = ? ORDER BY id", (episode_id,)
            ).fetchall()
        return [
            LabelEntry(r["episode_id"], r["outcome"], r["label_source"], r["stamp_ns"], bool(r["applied"]))
            for r in rows
        ]

    # -- read -------------------------------------------------------------------------------------------

    def read(self, episode_id: str) -> EpisodeRecord:
        """Decode an episode after verifying its checksum. `meta` carries the current catalogue label."""
        stored = self.get(episode_id)
        path = self.root / stored.path
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            self._mark_corrupt(stored, "file missing")
            raise CorruptEpisodeError(f"episode {episode_id!r}: file {path} is missing") from exc
        sha = hashlib.sha256(data).hexdigest()
        if sha != stored.sha256:
            self._mark_corrupt(stored, "checksum mismatch")
            raise CorruptEpisodeError(
                f"episode {episode_id!r}: file {path} has sha256 {sha}, catalogue says {stored.sha256}"
            )
        try:
            decoded = decode_episode(data)
        except EpisodeFormatError as exc:
            raise CorruptEpisodeError(
                f"episode {episode_id!r}: file {path} cannot be decoded: {exc}"
            ) from exc
        if decoded.info.meta.episode_id != episode_id:
            raise CorruptEpisodeError(
                f"file {path} holds episode {decoded.info.meta.episode_id!r}, expected {episode_id!r}"
            )
        meta = dataclasses.replace(
            decoded.info.meta, outcome=stored.outcome, label_source=stored.label_source
        )
        return EpisodeRecord(
            meta=meta,
            steps=decoded.steps,
            complete=decoded.info.complete,
            reasons=decoded.info.reasons,
            sha256=sha,
            path=path,
        )

    def _mark_corrupt(self, stored: StoredEpisode, reason: str) -> None:
        if self.read_only or (stored.corrupt and stored.corrupt_reason == reason):
            return
        with self._lock, self._transaction() as conn:
            conn.execute(
                "UPDATE episodes SET corrupt = 1, corrupt_reason = ? WHERE episode_id = ?",
                (reason, stored.episode_id),
            )

    # -- labels -----------------------------------------------------------------------------------------

    def relabel(self, episode_id: str, outcome: str, label_source: str, stamp_ns: int) -> StoredEpisode:
        """Record a label; it becomes the episode's outcome unless an operator label already decided it.

        Among labels of equal priority the latest call wins. Every label is kept in the history.
        """
        self._check_writable()
        _check_choice("outcome", outcome, OUTCOMES)
        _check_choice("label_source", label_source, LABEL_SOURCES)
        with self._lock:
            stored = self.get(episode_id)
            applied = label_wins(label_source, stored.label_source)
            with self._transaction() as conn:
                conn.execute(
                    catalog.INSERT_LABEL,
                    (episode_id, outcome, label_source, stamp_ns, int(applied)),
                )
                if applied:
                    conn.execute(
                        "UPDATE episodes SET outcome = ?, label_source = ? WHERE episode_id = ?",
                        (outcome, label_source, episode_id),
                    )
            return self.get(episode_id)

    # -- recovery ---------------------------------------------------------------------------------------

    def _count_interventions(self) -> None:
        """Fill the takeover counts of rows catalogued before schema v3 from their files (once per row); a row
        whose file cannot be read keeps NULL (reported as 0) until a later open finds it readable."""
        with self._lock:
            rows = self._conn.execute(catalog.SELECT_UNCOUNTED).fetchall()
            for row in rows:
                try:
                    data = (self.root / row["path"]).read_bytes()
                    if hashlib.sha256(data).hexdigest() != row["sha256"]:
                        continue  # recover() marks it corrupt; counting a damaged file would be a guess
                    counts = _intervention_counts(decode_episode(data).steps)
                except (OSError, EpisodeFormatError):
                    continue
                with self._transaction() as conn:
                    conn.execute(catalog.UPDATE_INTERVENTIONS, (*counts, row["episode_id"]))

    def recover(self, verify_checksums: bool = True) -> RecoveryReport:
        """Bring catalogue and files back in line after a crash; never deletes episode data.

        Removes orphan temp files, re-indexes final files without a row from their own metadata, and marks
        rows whose file is missing or fails its checksum as corrupt (or clears the mark when it matches
        again). Without `verify_checksums` only file sizes are compared.
        """
        self._check_writable()
        report = RecoveryReport()
        episodes_dir = self.root / EPISODES_DIR
        with self._lock:
            for temp in sorted(episodes_dir.glob(f"*/.*{TEMP_SUFFIX}")):
                if temp not in self._inflight_temps:
                    temp.unlink(missing_ok=True)
                    report.removed_temp_files.append(temp.relative_to(self.root).as_posix())
            catalogued = {s.path: s for s in self.list()}
            for path in sorted(episodes_dir.glob("*/*.mcap")):
                rel = path.relative_to(self.root).as_posix()
                if rel not in catalogued:
                    self._reindex(path, rel, report)
            for stored in catalogued.values():
                self._verify(stored, verify_checksums, report)
        return report

    def _reindex(self, path: Path, rel: str, report: RecoveryReport) -> None:
        data = path.read_bytes()
        try:
            info = read_episode_info(data)
        except EpisodeFormatError:
            report.unreadable_files.append(rel)
            return
        if self._row(info.meta.episode_id) is not None:
            # A second file for a catalogued id: keep both files, index neither twice.
            report.unreadable_files.append(rel)
            return
        sha = hashlib.sha256(data).hexdigest()
        # The file's metadata does not hold the takeover counts: they come from its steps.
        try:
            counts = _intervention_counts(decode_episode(data).steps)
        except EpisodeFormatError:
            report.unreadable_files.append(rel)
            return
        self._insert(
            info.meta,
            info.complete,
            info.reasons,
            info.num_steps,
            sha,
            rel,
            len(data),
            info.timing_errors,
            counts,
        )
        report.reindexed.append(info.meta.episode_id)

    def _verify(self, stored: StoredEpisode, verify_checksums: bool, report: RecoveryReport) -> None:
        path = self.root / stored.path
        if not path.exists():
            self._mark_corrupt(stored, "file missing")
            report.missing.append(stored.episode_id)
            return
        if verify_checksums:
            sha, size = _file_sha256(path)
            ok = sha == stored.sha256 and size == stored.size_bytes
        else:
            ok = path.stat().st_size == stored.size_bytes
        if not ok:
            self._mark_corrupt(stored, "checksum mismatch" if verify_checksums else "size mismatch")
            report.corrupt.append(stored.episode_id)
        elif stored.corrupt and verify_checksums:
            with self._transaction() as conn:
                conn.execute(
                    "UPDATE episodes SET corrupt = 0, corrupt_reason = '' WHERE episode_id = ?",
                    (stored.episode_id,),
                )
            report.restored.append(stored.episode_id)
