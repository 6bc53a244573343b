"""Versioned model store: one folder per model version, written atomically, verified on every load.

    <root>/v0003-stage2_sft/
        model.safetensors   weights (never pickle). hf backbone: only what is not the base model
                            (LoRA, new layers, token learner, heads); the base is referenced by checksum.
        config.json         the resolved VLAConfig
        tokenizer/          the instruction tokenizer, so inference needs nothing from outside the folder
        text.onnx, encoder.onnx, heads.onnx   the split inference graph (see onnx_export.py)
        manifest.json       sha256 and size of every file above
        meta.json           parent version, stage, data seen, metrics, ONNX check, and the manifest's sha256

A heads-only version (Stage 1: online RL trains only the action head, the critic head and log_std, the
backbone frozen) holds just those tensors and their graph: ~2 MB per push for the compact VLA, not ~224 MB:

    <root>/v0004-stage1_rl/
        heads.safetensors   action_head.*, critic_head.*, log_std
        config.json         the base version's config, byte for byte
        heads.onnx          latent -> action_mean, value, log_std
        manifest.json, meta.json   as above; meta: heads_only true, base_version (the full version whose
                            backbone and token learner it runs on, pinned by its manifest's sha256), parent

Heads of heads resolve to the same base. `load` of a heads-only version returns the full model (base + heads).

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
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from irevla_ros import durable
from irevla_ros.vla.config import VLAConfig, VLAConfigError
from irevla_ros.vla.integrity import (
    CONFIG,
    FORMAT,
    HEADS_ONNX,
    HEADS_WEIGHTS,
    META,
    TOKENIZER_DIR,
    WEIGHTS,
    CorruptVersionError,
    InvalidVersionError,
    UnknownVersionError,
    json_bytes,
    read_json,
    sha256_cached,
    verify_version_dir,
    write_manifest,
)
from irevla_ros.vla.model import HEAD_GROUPS, VLAModel, with_residual_defaults

# Top-level modules / parameters of VLAModel that a heads-only (Stage 1) version replaces.
HEAD_MODULES = HEAD_GROUPS

_VERSION_RE = re.compile(r"v(\d{4,})-([a-z0-9_]{1,40})")
_STAGE_RE = re.compile(r"[a-z0-9_]{1,40}")
_LOG = logging.getLogger(__name__)


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
    def heads_only(self) -> bool:
        return bool(self.meta.get("heads_only", False))

    @property
    def base_version(self) -> str:
        """The full version whose backbone and token learner this version runs on (itself for a full one)."""
        return str(self.meta["base_version"]) if self.heads_only else self.version_id

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


def is_head_key(key: str) -> bool:
    """A state-dict key that a heads-only version stores (and replaces)."""
    return key.split(".", 1)[0] in HEAD_MODULES


def heads_state_dict(model: VLAModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in stored_state_dict(model).items() if is_head_key(k)}


def check_tensors(
    tensors: Mapping[str, torch.Tensor], model: VLAModel, where: str, *, heads_only: bool = False
) -> None:
    """Stored tensors against the model built from the config: same keys, same shapes, all finite."""
    check_shapes(tensors, stored_state_dict_shapes(model, heads_only=heads_only), where)


def check_shapes(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
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


def stored_state_dict_shapes(model: VLAModel, *, heads_only: bool = False) -> dict[str, tuple[int, ...]]:
    base = {f"backbone.{k}" for k in (model.backbone.base_state_keys() or set())}
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k not in base and (not heads_only or is_head_key(k))
    }


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
        info = VersionInfo.from_meta(path, read_json(path / META))
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

        with durable.building_dir(self.root) as tmp:
            save_file(stored_state_dict(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / CONFIG).write_bytes(cfg.to_json().encode() + b"\n")
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
                    "files": {p.name: sha256_cached(p) for p in files_b},
                }
            manifest, manifest_bytes = write_manifest(tmp)
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
            version_id = self._commit(tmp, meta_base, stage)
        return self.get(version_id)

    def _commit(self, tmp: Path, meta_base: Mapping[str, Any], stage: str) -> str:
        """Number the version, write its meta and rename the temp folder into place (under the lock)."""
        durable.sync_tree(tmp)  # the slow part of publish_dir, outside the lock (it finds little left to do)
        with self._lock():
            numbers = [int(_VERSION_RE.fullmatch(p.name).group(1)) for p in self._version_dirs()]  # type: ignore[union-attr]
            version_id = f"v{(max(numbers, default=0) + 1):04d}-{stage}"
            meta = {
                **meta_base,
                "version_id": version_id,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            (tmp / META).write_bytes(json_bytes(meta))
            durable.publish_dir(tmp, self.root / version_id)
        return version_id

    def base_of(self, version_id: str) -> VersionInfo:
        """The full version whose backbone a version runs on: itself, or the base of a heads-only version."""
        info = self.get(version_id)
        if not info.heads_only:
            return info
        base = self.get(info.base_version)
        if base.heads_only:
            raise CorruptVersionError(
                f"{version_id}: its base {base.version_id} is itself heads-only (a base must be a full version)"
            )
        return base

    def save_heads(
        self,
        model: VLAModel,
        parent: str,
        stage: str = "stage1_rl",
        *,
        data: Any = None,
        metrics: Mapping[str, Any] | None = None,
        check_frozen: bool = True,
    ) -> VersionInfo:
        """Write a heads-only version: the action head, critic head and log_std of `model` on the backbone of
        `parent` (a full version, or a heads-only one: then its base). The base must have the model's config;
        `check_frozen` compares every other stored tensor with the base's, so a model whose backbone moved is
        refused (save it as a full version). Exports heads.onnx when the base has an ONNX export."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        from irevla_ros.vla import onnx_export

        if not isinstance(stage, str) or not _STAGE_RE.fullmatch(stage):
            raise InvalidVersionError(
                f"stage {stage!r} must be 1-40 characters from [a-z0-9_] (e.g. stage1_rl)"
            )
        if not isinstance(parent, str) or not parent:
            raise InvalidVersionError("a heads-only version needs a parent version (its backbone's source)")
        base = self.base_of(parent)  # raises UnknownVersionError
        base_config = self.read_config(base.version_id)
        ours = {k: v for k, v in model.config.to_dict().items() if k != "extra"}
        theirs = {k: v for k, v in base_config.to_dict().items() if k != "extra"}
        if ours != theirs:
            diff = sorted(k for k in ours if ours[k] != theirs.get(k))
            raise InvalidVersionError(
                f"the model's config differs from its base {base.version_id} in {diff}: heads-only versions "
                "need the base's architecture"
            )
        metrics = dict(metrics or {})
        _check_json("data", data)
        _check_json("metrics", metrics)
        heads = heads_state_dict(model)
        bad = [k for k, t in heads.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise InvalidVersionError(f"refusing to save: non-finite values in {bad[:5]}")
        if check_frozen:
            self._check_frozen(model, base, safe_open)

        with durable.building_dir(self.root) as tmp:
            save_file(heads, str(tmp / HEADS_WEIGHTS), metadata={"format": "pt"})
            # The base's config byte for byte: the pair must never disagree on preprocessing or shapes.
            shutil.copyfile(base.path / CONFIG, tmp / CONFIG)
            onnx_meta = None
            if base.onnx:
                files = onnx_export.export_onnx(model, tmp, parts=("heads",))
                onnx_meta = {
                    "files": files,
                    "opset": onnx_export.OPSET,
                    "atol": onnx_export.ATOL,
                    "rtol": onnx_export.RTOL,
                    "max_abs_error": onnx_export.verify_heads_onnx(model, tmp / HEADS_ONNX),
                }
            manifest, manifest_bytes = write_manifest(tmp)
            groups = model.named_parameter_groups()
            meta_base = {
                "format": FORMAT,
                "parent": parent,
                "stage": stage,
                "data": data,
                "metrics": metrics,
                "backbone": base_config.backbone,
                "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                "onnx": onnx_meta,
                "heads_only": True,
                "base_version": base.version_id,
                "base_manifest_sha256": base.manifest_sha256,
                "hf_base": None,  # the base version pins it
                "parameters": {g: sum(p.numel() for _, p in groups[g]) for g in HEAD_MODULES},
                "bytes": {name: e["bytes"] for name, e in manifest["files"].items()},
                "software": _software(),
            }
            version_id = self._commit(tmp, meta_base, stage)
        return self.get(version_id)

    def _check_frozen(self, model: VLAModel, base: VersionInfo, safe_open: Any) -> None:
        # Only the heads may differ from the base: anything else would give the heads a latent the base's
        # encoder.onnx does not compute.
        stored = {k: v for k, v in stored_state_dict(model).items() if not is_head_key(k)}
        with safe_open(str(base.path / WEIGHTS), framework="pt") as f:
            keys = set(f.keys())
            missing = sorted(set(stored) - keys)
            if missing:
                raise InvalidVersionError(f"base {base.version_id} has no tensors {missing[:5]}")
            for key, tensor in stored.items():
                theirs = f.get_tensor(key)
                if theirs.shape != tensor.shape or not torch.equal(theirs, tensor):
                    raise InvalidVersionError(
                        f"tensor {key} differs from base {base.version_id}: only the heads may change in a "
                        "heads-only version (save a full version instead)"
                    )

    # ---- loading ----
    def verify(self, version_id: str) -> VersionInfo:
        """Checksums only (manifest against meta, files against manifest, the hf base model's files)."""
        info = self.get(version_id)
        verify_version_dir(info.path, info.meta)
        if info.heads_only:
            base = self.base_of(version_id)
            if base.manifest_sha256 != info.meta.get("base_manifest_sha256"):
                raise CorruptVersionError(
                    f"{version_id}: its base {base.version_id} has changed since it was saved "
                    "(manifest checksum differs from the one recorded)"
                )
            self.verify(base.version_id)
            if (info.path / CONFIG).read_bytes() != (base.path / CONFIG).read_bytes():
                raise CorruptVersionError(f"{version_id}: {CONFIG} differs from its base {base.version_id}")
            return info
        hf_base = info.meta.get("hf_base")
        if hf_base:
            base_dir = Path(hf_base["dir"])
            for name, digest in hf_base["files"].items():
                file = base_dir / name
                if not file.is_file():
                    raise CorruptVersionError(f"{version_id}: base model file {file} is missing")
                if sha256_cached(file) != digest:
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
        if info.heads_only:
            return self._load_heads(info, device)
        config = self.read_config(version_id)
        try:
            tensors = load_file(str(info.path / WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidVersionError(f"{version_id}: {WEIGHTS} cannot be read: {exc}") from exc
        model = VLAModel(config, load_pretrained=False, tokenizer_dir=info.path / TOKENIZER_DIR)
        tensors = with_residual_defaults(tensors, model)
        check_tensors(tensors, model, version_id)
        result = model.load_state_dict(tensors, strict=False)
        base = {f"backbone.{k}" for k in (model.backbone.base_state_keys() or set())}
        if result.unexpected_keys or set(result.missing_keys) - base:
            raise InvalidVersionError(f"{version_id}: weights do not fit the model ({result})")
        model.to(device).eval()
        return model, config, info

    def _load_heads(
        self, info: VersionInfo, device: str | torch.device
    ) -> tuple[VLAModel, VLAConfig, VersionInfo]:
        """Base model (verified load) with this version's heads in place of its own."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model, config, _ = self.load(info.base_version, device="cpu")
        try:
            tensors = load_file(str(info.path / HEADS_WEIGHTS))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InvalidVersionError(f"{info.version_id}: {HEADS_WEIGHTS} cannot be read: {exc}") from exc
        tensors = with_residual_defaults(tensors, model)
        check_tensors(tensors, model, info.version_id, heads_only=True)
        result = model.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise InvalidVersionError(f"{info.version_id}: heads do not fit the model ({result})")
        model.to(device).eval()
        return model, config, info
