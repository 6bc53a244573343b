"""`irevla export lerobot` and `irevla import lerobot`: argparse wiring over lerobot_dataset.py."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from irevla_ros.store.records import OUTCOMES, SOURCES


def _cmd_export(args: argparse.Namespace) -> int:
    from irevla_ros.interop import lerobot_dataset as lr
    from irevla_ros.store.episode_store import EpisodeStore

    try:
        store = EpisodeStore(args.store, read_only=True)
        try:
            result = lr.export_lerobot(
                store,
                args.out,
                repo_id=args.repo_id,
                source=args.source,
                outcome=args.outcome,
                task=args.task,
                version=args.version,
                progress=lr.stderr_progress,
            )
        finally:
            store.close()
    except (lr.LeRobotUnavailableError, lr.LeRobotInteropError, FileNotFoundError) as exc:
        print(f"irevla export lerobot: {exc}", file=sys.stderr)
        return 1
    print(f"{result.out}: {result.episodes} episodes, {result.frames} frames at {result.fps} fps")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from irevla_ros.interop import lerobot_dataset as lr
    from irevla_ros.store.episode_store import EpisodeStore

    try:
        store = EpisodeStore(args.store)
        try:
            result = lr.import_lerobot(
                args.dataset, store, repo_id=args.repo_id, task=args.task, progress=lr.stderr_progress
            )
        finally:
            store.close()
    except (lr.LeRobotUnavailableError, lr.LeRobotInteropError, FileNotFoundError) as exc:
        print(f"irevla import lerobot: {exc}", file=sys.stderr)
        return 1
    print(f"{len(result.episode_ids)} demonstrations ({result.frames} steps) stored in {args.store}")
    return 0


def add_verbs(sub: Any, verbs: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register `export` and `import`, each with the format as its first word (only `lerobot` today)."""
    p = sub.add_parser("export", help="export stored episodes to another format (lerobot: LeRobotDataset v3)")
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    e = fmt.add_parser("lerobot", help="write trainable episodes to a new local LeRobotDataset v3 folder")
    e.add_argument("--store", required=True, help="episode store root")
    e.add_argument("--out", required=True, help="new dataset folder (must not exist)")
    e.add_argument("--repo-id", default="irevla/episodes", help="repo id written into the dataset (no push)")
    e.add_argument("--source", choices=SOURCES)
    e.add_argument("--outcome", choices=OUTCOMES)
    e.add_argument("--task")
    e.add_argument("--version", help="policy version the episodes were recorded with")
    verbs["export"] = _cmd_export
    p = sub.add_parser("import", help="import episodes from another format as demonstrations (D_e)")
    fmt = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    i = fmt.add_parser("lerobot", help="store every episode of a local LeRobotDataset as source 'expert'")
    i.add_argument("dataset", help="local LeRobotDataset folder (with meta/info.json)")
    i.add_argument("--store", required=True, help="episode store root (created if missing)")
    i.add_argument("--repo-id", default="irevla/episodes", help="the dataset's repo id, kept as lineage")
    i.add_argument("--task", help="store task name (default: the episode's LeRobot task)")
    verbs["import"] = _cmd_import
