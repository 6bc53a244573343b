"""A model version's files and their integrity, without torch: names, the manifest of sha256 checksums, the
checks a reader runs before trusting a version folder, and the errors they raise. Used by the model store (which
writes versions), the runtimes (which load them, ONNX Runtime without torch) and validation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

WEIGHTS = "model.safetensors"
HEADS_WEIGHTS = "heads.safetensors"
HEADS_ONNX = "heads.onnx"
CONFIG = "config.json"
META = "meta.json"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1


class InvalidVersionError(ValueError):
    """A model version cannot be used; the message says why (bad checksum, non-finite weights, wrong shapes...)."""


class CorruptVersionError(InvalidVersionError):
    """A file of a model version does not match its recorded checksum (or is missing / unlisted)."""


class UnknownVersionError(InvalidVersionError):
    """No such version in the store."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_BASE_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_cached(path: Path) -> str:
    """Base-model files are large and read-only: hash each (path, size, mtime) once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _BASE_HASH_CACHE:
        _BASE_HASH_CACHE[key] = sha256_file(path)
    return _BASE_HASH_CACHE[key]


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_manifest(folder: Path) -> tuple[dict[str, Any], bytes]:
    """sha256 and size of every file in `folder` -> manifest.json; returns it and its bytes (meta pins their
    checksum)."""
    manifest = {
        "format": FORMAT,
        "files": {
            name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
            for name in files_under(folder)
        },
    }
    manifest_bytes = json_bytes(manifest)
    (folder / MANIFEST).write_bytes(manifest_bytes)
    return manifest, manifest_bytes


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def verify_version_dir(path: Path, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check manifest against meta and every file against the manifest; returns the manifest.

    Raises CorruptVersionError naming the first file that is missing, unlisted or does not match."""
    path = Path(path)
    if meta is None:
        meta = read_json(path / META)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptVersionError(f"{path.name}: {MANIFEST} is missing")
    if sha256_file(manifest_path) != meta.get("manifest_sha256"):
        raise CorruptVersionError(f"{path.name}: checksum mismatch for {MANIFEST} (recorded in {META})")
    manifest = read_json(manifest_path)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptVersionError(f"{path.name}: {MANIFEST} has no file list")
    present = set(files_under(path)) - {META, MANIFEST}
    for name in sorted(present - set(files)):
        raise CorruptVersionError(f"{path.name}: file {name} is not listed in {MANIFEST}")
    for name, entry in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CorruptVersionError(f"{path.name}: file {name} is missing")
        if file.stat().st_size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
            raise CorruptVersionError(f"{path.name}: checksum mismatch for {name}")
    for required in (HEADS_WEIGHTS if meta.get("heads_only") else WEIGHTS, CONFIG):
        if required not in files:
            raise CorruptVersionError(f"{path.name}: {required} is missing from {MANIFEST}")
    for name in (meta.get("onnx") or {}).get("files", {}).values():
        if name not in files:
            raise CorruptVersionError(f"{path.name}: {name} is missing from {MANIFEST}")
    return manifest


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CorruptVersionError(f"{path.parent.name}: {path.name} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptVersionError(f"{path.parent.name}: {path.name} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptVersionError(f"{path.parent.name}: {path.name} is not a JSON object")
    return data
