"""The episode catalogue's SQLite schema: its migrations and the mapping of a row to a StoredEpisode.

Version N is reached by running MIGRATIONS[N] on a catalogue at version N-1, each in its own transaction; a
catalogue newer than this code is refused, and a read-only opener never migrates.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator

from irevla_ros.store.records import StoredEpisode

Migration = Callable[[sqlite3.Connection], None]


def _migrate_to_v1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE episodes (
            episode_id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            instruction TEXT NOT NULL,
            outcome TEXT NOT NULL,
            label_source TEXT NOT NULL,
            policy_version TEXT NOT NULL,
            source TEXT NOT NULL,
            num_steps INTEGER NOT NULL,
            complete INTEGER NOT NULL CHECK (complete IN (0, 1)),
            reasons TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            path TEXT NOT NULL UNIQUE,
            size_bytes INTEGER NOT NULL,
            started_ns INTEGER NOT NULL,
            ended_ns INTEGER,
            stored_ns INTEGER NOT NULL,
            corrupt INTEGER NOT NULL DEFAULT 0 CHECK (corrupt IN (0, 1)),
            corrupt_reason TEXT NOT NULL DEFAULT ''
        )"""
    )
    conn.execute("CREATE INDEX episodes_by_task ON episodes (task, outcome, complete)")
    conn.execute(
        """CREATE TABLE labels (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            episode_id TEXT NOT NULL REFERENCES episodes (episode_id),
            outcome TEXT NOT NULL,
            label_source TEXT NOT NULL,
            stamp_ns INTEGER NOT NULL,
            applied INTEGER NOT NULL CHECK (applied IN (0, 1))
        )"""
    )
    conn.execute("CREATE INDEX labels_by_episode ON labels (episode_id)")


def _migrate_to_v2(conn: sqlite3.Connection) -> None:
    # Rows stored before the assembler checked step timing were not checked: 0, as their files say nothing.
    conn.execute("ALTER TABLE episodes ADD COLUMN timing_errors INTEGER NOT NULL DEFAULT 0")


def _migrate_to_v3(conn: sqlite3.Connection) -> None:
    # NULL = not counted yet: SQL cannot read the episode files, so EpisodeStore counts these rows' takeovers
    # from their files when it next opens the store writable (EpisodeStore._count_interventions).
    conn.execute("ALTER TABLE episodes ADD COLUMN interventions INTEGER")
    conn.execute("ALTER TABLE episodes ADD COLUMN intervention_steps INTEGER")


def _migrate_to_v4(conn: sqlite3.Connection) -> None:
    # NULL = unknown, and stays so: files written before the scene seed was recorded do not hold it either.
    conn.execute("ALTER TABLE episodes ADD COLUMN scene_seed INTEGER")


MIGRATIONS: dict[int, Migration] = {
    1: _migrate_to_v1,
    2: _migrate_to_v2,
    3: _migrate_to_v3,
    4: _migrate_to_v4,
}
SCHEMA_VERSION = max(MIGRATIONS)

INSERT_EPISODE = """INSERT INTO episodes (episode_id, task, instruction, outcome, label_source, policy_version,
    source, num_steps, complete, reasons, sha256, path, size_bytes, started_ns, ended_ns, stored_ns, timing_errors,
    interventions, intervention_steps, scene_seed)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
SELECT_UNCOUNTED = "SELECT * FROM episodes WHERE interventions IS NULL OR intervention_steps IS NULL"
UPDATE_INTERVENTIONS = "UPDATE episodes SET interventions = ?, intervention_steps = ? WHERE episode_id = ?"
INSERT_LABEL = (
    "INSERT INTO labels (episode_id, outcome, label_source, stamp_ns, applied) VALUES (?, ?, ?, ?, ?)"
)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, *, read_only: bool, where: str) -> None:
    """Bring the catalogue at `where` to SCHEMA_VERSION (MIGRATIONS and SCHEMA_VERSION are read at call time)."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    current = row[0] or 0
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"catalogue {where} has schema version {current}, this code knows up to {SCHEMA_VERSION}"
        )
    if current < SCHEMA_VERSION and read_only:
        raise RuntimeError(f"catalogue schema {current} needs migration; open it writable first")
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with transaction(conn):
            MIGRATIONS[version](conn)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


def to_stored(row: sqlite3.Row) -> StoredEpisode:
    return StoredEpisode(
        episode_id=row["episode_id"],
        task=row["task"],
        instruction=row["instruction"],
        outcome=row["outcome"],
        label_source=row["label_source"],
        policy_version=row["policy_version"],
        source=row["source"],
        num_steps=row["num_steps"],
        complete=bool(row["complete"]),
        reasons=json.loads(row["reasons"]),
        sha256=row["sha256"],
        path=row["path"],
        size_bytes=row["size_bytes"],
        started_ns=row["started_ns"],
        ended_ns=row["ended_ns"],
        stored_ns=row["stored_ns"],
        corrupt=bool(row["corrupt"]),
        corrupt_reason=row["corrupt_reason"],
        timing_errors=row["timing_errors"],
        # NULL only while a migrated row's file could not be read to count them (see _migrate_to_v3)
        interventions=row["interventions"] or 0,
        intervention_steps=row["intervention_steps"] or 0,
        scene_seed=row["scene_seed"],
    )
