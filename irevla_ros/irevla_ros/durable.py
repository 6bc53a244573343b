"""Durable writes: a file or folder either keeps its old content or has the complete new one, after a crash or
a power cut at any moment. The only module that renames written data into place.

Order for a file: write a hidden temp file in the same directory -> flush -> fsync the file -> rename it over the
final name -> fsync the directory. Without the last step the rename itself may be lost on power failure (the
directory entry is not yet on disk), so a caller could acknowledge data that is gone after the reboot.

A folder (a model version, a Stage 2 job) is built in a hidden temp folder, every file and sub-folder in it is
fsync'd (libraries such as safetensors or a tokenizer's save_pretrained write without fsync), then it is renamed
into place and its parent directory fsync'd.

    durable.write_json(run_dir / "iteration.json", record)
    with durable.atomic_path(out / "adapter.safetensors") as tmp:   # for writers that need a path
        save_file(tensors, str(tmp))
    with durable.atomic_file(cache / "x.npz") as f:                  # for writers that take a file object
        np.savez(f, ...)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".tmp"

# Called with a stage name ("after_rename") between the rename and the directory fsync (tests, fault injection).
Hook = Callable[[str], None]


def temp_path(final: Path | str, *, suffix: str = TEMP_SUFFIX) -> Path:
    """A hidden name next to `final`, unique across processes and threads (same directory: rename is atomic)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{suffix}")


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path | str) -> None:
    """fsync a file some other code wrote and closed (opened read-only: fsync needs no write access)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path | str, final: Path | str, *, hook: Hook | None = None) -> None:
    """Rename an fsync'd temp file over `final` and make the rename durable."""
    final = Path(final)
    os.replace(temp, final)
    if hook is not None:
        hook("after_rename")
    fsync_dir(final.parent)


@contextlib.contextmanager
def synced_file(path: Path | str, mode: str = "xb") -> Iterator[IO[Any]]:
    """Open `path` for writing; at a normal exit flush and fsync it. On an exception the file is removed."""
    path = Path(path)
    try:
        with open(path, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_file(final: Path | str, mode: str = "xb", *, hook: Hook | None = None) -> Iterator[IO[Any]]:
    """A file object whose content replaces `final` durably when the block ends without an exception."""
    final = Path(final)
    temp = temp_path(final)
    with synced_file(temp, mode) as f:
        yield f
    try:
        publish(temp, final, hook=hook)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(final: Path | str, *, suffix: str = TEMP_SUFFIX, hook: Hook | None = None) -> Iterator[Path]:
    """A temp path for a writer that only takes a path; when the block ends normally the file it wrote is
    fsync'd and replaces `final` durably. On an exception the temp file is removed and `final` is untouched."""
    final = Path(final)
    temp = temp_path(final, suffix=suffix)
    try:
        yield temp
        fsync_file(temp)
        publish(temp, final, hook=hook)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes(final: Path | str, data: bytes, *, hook: Hook | None = None) -> None:
    with atomic_file(final, "xb", hook=hook) as f:
        f.write(data)


def write_text(final: Path | str, text: str, *, hook: Hook | None = None) -> None:
    write_bytes(final, text.encode("utf-8"), hook=hook)


def write_json(final: Path | str, obj: Any, *, hook: Hook | None = None, **dumps: Any) -> None:
    """`obj` as JSON (keyword arguments go to json.dumps), with a trailing newline."""
    write_text(final, json.dumps(obj, **dumps) + "\n", hook=hook)


def sync_tree(root: Path | str) -> None:
    """fsync every file and directory under `root` (directories after their content), `root` last."""
    root = Path(root)
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(directory) / name)
        fsync_dir(directory)


def temp_dir(parent: Path | str) -> Path:
    """A fresh hidden folder in `parent` to build a folder in before `publish_dir`."""
    path = Path(parent) / f".tmp-{uuid.uuid4().hex}"
    path.mkdir()
    return path


def publish_dir(temp: Path | str, final: Path | str, *, hook: Hook | None = None) -> None:
    """Make everything in the folder `temp` durable, rename it to `final` and make the rename durable. A folder
    is never replaced, so a reader never sees a mix: the rename raises OSError when `final` exists with content
    (then `temp` is left for the caller)."""
    final = Path(final)
    sync_tree(temp)
    os.rename(temp, final)
    if hook is not None:
        hook("after_rename")
    fsync_dir(final.parent)


@contextlib.contextmanager
def building_dir(parent: Path | str) -> Iterator[Path]:
    """A temp folder in `parent` that is removed when the block raises (publish it with `publish_dir`)."""
    temp = temp_dir(parent)
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
