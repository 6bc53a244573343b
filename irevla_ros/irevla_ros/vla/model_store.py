"""Versioned model store: one folder per model version, written atomically, verified on every load.

    <root>/v0003-stage2_sft/
        model.safetensors   weights (never pickle). hf backbone: only what is not the base model
                            (LoRA, new layers, token learner, heads); the base is referenced by checksum.
        config.json         the resolved VLAConfig
        tokenizer/          the instruction tokenizer, so inference needs nothing from outside the folder
        text.onnx, encoder.onnx, heads.onnx   the split inference graph (see onnx_export.py)
        manifest.json       sha256 and size of every file above
        meta.json           parent version, stage, data seen, metrics, ONNX check, and the manifest's sha256

A version is built in a hidden temp folder next to the versions and renamed into place under a lock, so a
reader never sees half a version and two writers never take the same number. `load` checks the manifest
against meta, every file against the manifest, refuses unlisted files, non-finite weights and wrong shapes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from irevla_ros.vla.config import VLAConfig, VLAConfigError
from irevla_ros.vla.model import VLAModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
META = "meta.json"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = 1

_VERSION_RE = re.compile(r"v(\d{4,})-([a-z0-9_]{1,40})")
_STAGE_RE = re.compile(r"[a-z0-9_]{1,40}")
_LOG = logging.getLogger(__name__)


class InvalidVersionError(ValueError):
    """A model version cannot be used; the message says why (bad checksum, non-finite weights, wrong shapes...)."""


class CorruptVersionError(InvalidVersionError):
    """A file of a model version does not match its recorded checksum (or is missing / unlisted)."""


class UnknownVersionError(InvalidVersionError):
    """No such version in the store."""


@dataclass(frozen=True)
class VersionInfo:
    version_id: str
    path: Path
    parent: str | None
    stage: str
    data: Any
    metrics: dict[str, Any]
    created: str
    backbone: str
    manifest_sha256: str
    onnx: dict[str, Any] | None
    meta: dict[str, Any] = field(repr=False)

    @property
    def number(self) -> int:
        return int(_VERSION_RE.fullmatch(self.version_id).group(1))  # type: ignore[union-attr]

    @classmethod
    def from_meta(cls, path: Path, meta: Mapping[str, Any]) -> VersionInfo:
        try:
            return cls(
                version_id=str(meta["version_id"]),
                path=path,
                parent=meta["parent"],
                stage=str(meta["stage"]),
                data=meta["data"],
                metrics=dict(meta["metrics"]),
                created=str(meta["created"]),
                backbone=str(meta["backbone"]),
                manifest_sha256=str(meta["manifest_sha256"]),
                onnx=meta.get("onnx"),
                meta=dict(meta),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptVersionError(f"{path / META}: missing or malformed field ({exc})") from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_BASE_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256_cached(path: Path) -> str:
    """Base-model files are large and read-only: hash each (path, size, mtime) once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _BASE_HASH_CACHE:
        _BASE_HASH_CACHE[key] = sha256_file(path)
    return _BASE_HASH_CACHE[key]


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _software() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft", "onnx", "onnxruntime", "safetensors"):
        with contextlib.suppress(Exception):
            out[name] = __import__(name).__version__
    return out


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidVersionError(f"{name} must be JSON-serialisable with finite numbers: {exc}") from exc


def stored_state_dict(model: VLAModel) -> dict[str, torch.Tensor]:
    """The tensors a version stores: everything, minus an external base model's weights (hf backbone)."""
    base = model.backbone.base_state_keys() or set()
    base = {f"backbone.{k}" for k in base}
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in base}


def verify_version_dir(path: Path, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check manifest against meta and every file against the manifest; returns the manifest.

    Raises CorruptVersionError naming the first file that is missing, unlisted or does not match."""
    path = Path(path)
    if meta is None:
        meta = _read_json(path / META)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptVersionError(f"{path.name}: {MANIFEST} is missing")
    if sha256_file(manifest_path) != meta.get("manifest_sha256"):
        raise CorruptVersionError(f"{path.name}: checksum mismatch for {MANIFEST} (recorded in {META})")
    manifest = _read_json(manifest_path)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptVersionError(f"{path.name}: {MANIFEST} has no file list")
    present = set(_files_under(path)) - {META, MANIFEST}
    for name in sorted(present - set(files)):
        raise CorruptVersionError(f"{path.name}: file {name} is not listed in {MANIFEST}")
    for name, entry in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CorruptVersionError(f"{path.name}: file {name} is missing")
        if file.stat().st_size != entry.get("bytes") or sha256_file(file) != entry.get("sha256"):
            raise CorruptVersionError(f"{path.name}: checksum mismatch for {name}")
    for required in (WEIGHTS, CONFIG):
        if required not in files:
            raise CorruptVersionError(f"{path.name}: {required} is missing from {MANIFEST}")
    for name in (meta.get("onnx") or {}).get("files", {}).values():
        if name not in files:
            raise CorruptVersionError(f"{path.name}: {name} is missing from {MANIFEST}")
    return manifest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CorruptVersionError(f"{path.parent.name}: {path.name} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptVersionError(f"{path.parent.name}: {path.name} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptVersionError(f"{path.parent.name}: {path.name} is not a JSON object")
    return data


def check_tensors(tensors: Mapping[str, torch.Tensor], model: VLAModel, where: str) -> None:
    """Stored tensors against the model built from the config: same keys, same shapes, all finite."""
    expected = stored_state_dict_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InvalidVersionError(
            f"{where}: weights do not match the config's model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != expected[name]:
            raise InvalidVersionError(
                f"{where}: wrong shape for tensor {name}: stored {tuple(tensor.shape)}, model expects {expected[name]}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise InvalidVersionError(f"{where}: non-finite values (NaN/inf) in weights tensor {name}")


def stored_state_dict_shapes(model: VLAModel) -> dict[str, tuple[int, ...]]:
    base = {f"backbone.{k}" for k in (model.backbone.base_state_keys() or set())}
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in base}


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- listing ----
    def _version_dirs(self) -> list[Path]:
        dirs = [p for p in self.root.iterdir() if p.is_dir() and _VERSION_RE.fullmatch(p.name)]
        return sorted(dirs, key=lambda p: int(_VERSION_RE.fullmatch(p.name).group(1)))  # type: ignore[union-attr]

    def versions(self) -> list[VersionInfo]:
        """All readable versions, oldest first (a folder with unreadable meta is logged and left out)."""
        out = []
        for path in self._version_dirs():
            try:
                out.append(self.get(path.name))
            except InvalidVersionError as exc:
                _LOG.warning("model store: skipping %s: %s", path.name, exc)
        return out

    def latest(self, stage: str | None = None) -> VersionInfo | None:
        versions = [v for v in self.versions() if stage is None or v.stage == stage]
        return versions[-1] if versions else None

    def get(self, version_id: str) -> VersionInfo:
        if not isinstance(version_id, str) or not _VERSION_RE.fullmatch(version_id):
            raise UnknownVersionError(f"{version_id!r} is not a version id (like v0003-stage0_sft)")
        path = self.root / version_id
        if not path.is_dir():
            raise UnknownVersionError(f"no version {version_id} in {self.root}")
        info = VersionInfo.from_meta(path, _read_json(path / META))
        if info.version_id != version_id:
            raise CorruptVersionError(f"{version_id}: {META} names another version ({info.version_id})")
        return info

    # ---- saving ----
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def save(
        self,
        model: VLAModel,
        config: VLAConfig | None = None,
        *,
        parent: str | None,
        stage: str,
        data: Any = None,
        metrics: Mapping[str, Any] | None = None,
        export_onnx: bool | None = None,
    ) -> VersionInfo:
        """Write a new version; returns its info. `export_onnx=None`: export unless the hf backbone is loaded in
        reduced precision or quantised (those graphs are for GPU machines; use the torch runtime there)."""
        from safetensors.torch import save_file

        from irevla_ros.vla import onnx_export

        cfg = model.config
        if config is not None:
            given = config.resolved().to_dict()
            if {k: v for k, v in given.items() if k != "extra"} != {
                k: v for k, v in cfg.to_dict().items() if k != "extra"
            }:
                diff = sorted(k for k in given if k != "extra" and given[k] != cfg.to_dict()[k])
                raise InvalidVersionError(f"config does not match the model's config (differs in {diff})")
            cfg = cfg.replace(extra=dict(config.extra))
        if not isinstance(stage, str) or not _STAGE_RE.fullmatch(stage):
            raise InvalidVersionError(
                f"stage {stage!r} must be 1-40 characters from [a-z0-9_] (e.g. stage0_sft)"
            )
        if parent is not None:
            self.get(parent)  # raises UnknownVersionError
        metrics = dict(metrics or {})
        _check_json("data", data)
        _check_json("metrics", metrics)
        bad = list(model.finite_check())
        if bad:
            raise InvalidVersionError(f"refusing to save: non-finite values in {bad[:5]}")
        if export_onnx is None:
            export_onnx = cfg.backbone == "compact" or (
                cfg.hf_dtype == "float32" and cfg.hf_quantization == "none"
            )

        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            save_file(stored_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
            _fsync_write(tmp / CONFIG, cfg.to_json().encode() + b"\n")
            model.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))  # type: ignore[attr-defined]
            onnx_meta = None
            if export_onnx:
                files = onnx_export.export_onnx(model, tmp)
                errors = onnx_export.verify_onnx(model, tmp)
                onnx_meta = {
                    "files": files,
                    "opset": onnx_export.OPSET,
                    "atol": onnx_export.ATOL,
                    "rtol": onnx_export.RTOL,
                    "max_abs_error": errors,
                }
            hf_base = None
            if cfg.backbone == "hf":
                files_b = model.backbone.base_weight_files()  # type: ignore[attr-defined]
                hf_base = {
                    "dir": str(cfg.hf_model_dir),
                    "files": {p.name: _sha256_cached(p) for p in files_b},
                }
            manifest = {
                "format": FORMAT,
                "files": {
                    name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                    for name in _files_under(tmp)
                },
            }
            manifest_bytes = _json_bytes(manifest)
            _fsync_write(tmp / MANIFEST, manifest_bytes)
            groups = model.named_parameter_groups()
            meta_base = {
                "format": FORMAT,
                "parent": parent,
                "stage": stage,
                "data": data,
                "metrics": metrics,
                "backbone": cfg.backbone,
                "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "onnx": onnx_meta,
                "hf_base": hf_base,
                "parameters": {g: sum(p.numel() for _, p in ps) for g, ps in groups.items()},
                "bytes": {name: e["bytes"] for name, e in manifest["files"].items()},
                "software": _software(),
            }
            with self._lock():
                numbers = [int(_VERSION_RE.fullmatch(p.name).group(1)) for p in self._version_dirs()]  # type: ignore[union-attr]
                version_id = f"v{(max(numbers, default=0) + 1):04d}-{stage}"
                meta = {
                    **meta_base,
                    "version_id": version_id,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
                _fsync_write(tmp / META, _json_bytes(meta))
                os.rename(tmp, self.root / version_id)
                dir_fd = os.open(self.root, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(version_id)

    # ---- loading ----
    def verify(self, version_id: str) -> VersionInfo:
        """Checksums only (manifest against meta, files against manifest, the hf base model's files)."""
        info = self.get(version_id)
        verify_version_dir(info.path, info.meta)
        hf_base = info.meta.get("hf_base")
        if hf_base:
            base_dir = Path(hf_base["dir"])
            for name, digest in hf_base["files"].items():
                file = base_dir / name
                if not file.is_file():
                    raise CorruptVersionError(f"{version_id}: base model file {file} is missing")
                if _sha256_cached(file) != digest:
                    raise CorruptVersionError(f"{version_id}: checksum mismatch for base model file {file}")
        return info

    def read_config(self, version_id: str) -> VLAConfig:
        info = self.get(version_id)
        try:
            return VLAConfig.from_json((info.path / CONFIG).read_text())
        except VLAConfigError as exc:
            raise InvalidVersionError(f"{version_id}: {CONFIG}: {exc}") from exc

    def load(
        self, version_id: str, *, device: str | torch.device = "cpu"
    ) -> tuple[VLAModel, VLAConfig, VersionInfo]:
        """Verified load: checksums, then weights (safetensors only) against the config's model."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        info = self.verify(version_id)
        config = self.read_config(version_id)
        try:
            tensors = load_file(str(info.path / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidVersionError(f"{version_id}: {WEIGHTS} cannot be read: {exc}") from exc
        model = VLAModel(config, load_pretrained=False, tokenizer_dir=info.path / TOKENIZER_DIR)
        check_tensors(tensors, model, version_id)
        result = model.load_state_dict(tensors, strict=False)
        base = {f"backbone.{k}" for k in (model.backbone.base_state_keys() or set())}
        if result.unexpected_keys or set(result.missing_keys) - base:
            raise InvalidVersionError(f"{version_id}: weights do not fit the model ({result})")
        model.to(device).eval()
        return model, config, info

    def validate(self, version_id: str) -> dict[str, Any]:
        """Everything `load` checks, plus a probe observation through torch and (if exported) ONNX Runtime:
        right shapes, finite outputs, ONNX within tolerance of torch. Raises InvalidVersionError with the reason;
        returns a report."""
        from irevla_ros.vla import onnx_export
        from irevla_ros.vla.runtime import OnnxPolicyRuntime, TorchPolicyRuntime

        model, config, info = self.load(version_id)
        probe = probe_observation(config)
        report: dict[str, Any] = {"version_id": version_id, "checksums": "ok", "weights": "ok"}
        torch_rt = TorchPolicyRuntime(model)
        mean, value, latent = torch_rt.act(*probe)
        _check_outputs(version_id, "torch", config, mean, value, latent)
        report["probe_torch"] = {"action_mean": mean.tolist(), "value": value}
        if info.onnx:
            try:
                ort_rt = OnnxPolicyRuntime(info.path, verify=False)
                o_mean, o_value, o_latent = ort_rt.act(*probe)
            except InvalidVersionError:
                raise
            except Exception as exc:  # onnxruntime's own errors: a broken or mismatched graph
                raise InvalidVersionError(f"{version_id}: ONNX graph fails on the probe: {exc}") from exc
            _check_outputs(version_id, "onnx", config, o_mean, o_value, o_latent)
            try:
                report["onnx_max_abs_error"] = {
                    "latent": onnx_export.compare("latent", o_latent, latent),
                    "action_mean": onnx_export.compare("action_mean", o_mean, mean),
                    "value": onnx_export.compare("value", np.float32(o_value), np.float32(value)),
                }
            except onnx_export.OnnxMismatchError as exc:
                raise InvalidVersionError(f"{version_id}: ONNX does not match torch: {exc}") from exc
        return report


def probe_observation(config: VLAConfig) -> tuple[dict[str, np.ndarray], str, np.ndarray | None]:
    """A fixed, plausible observation: a gradient image per camera, an instruction, zero proprioception."""
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    image = np.stack(
        [np.tile(ramp, (48, 1)), np.tile(ramp[:48, None], (1, 64)), np.full((48, 64), 128.0)], -1
    )
    images = {c: image.astype(np.uint8) for c in config.cameras}
    proprio = np.zeros(config.proprio_dim, dtype=np.float32) if config.proprio_dim else None
    return images, "press the button", proprio


def _check_outputs(
    version_id: str, where: str, config: VLAConfig, mean: np.ndarray, value: float, latent: np.ndarray
) -> None:
    if mean.shape != (config.action_dim,):
        raise InvalidVersionError(
            f"{version_id}: {where} action has wrong shape {mean.shape}, expected ({config.action_dim},)"
        )
    if latent.shape != (config.latent_dim,):
        raise InvalidVersionError(
            f"{version_id}: {where} latent has wrong shape {latent.shape}, expected ({config.latent_dim},)"
        )
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(latent)) and math.isfinite(value)):
        raise InvalidVersionError(f"{version_id}: {where} outputs are not finite on the probe observation")
