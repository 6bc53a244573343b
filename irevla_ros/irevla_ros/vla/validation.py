"""Runtime validation of a model version: what a version must pass before it is announced or swapped in.

`validate(store, version_id)`: everything a verified load checks, plus a probe observation through torch and
(when exported) ONNX Runtime: right shapes, finite outputs, ONNX within tolerance of torch. `validate_heads`: the
light check of a heads-only version for a node that already runs its base's encoder (milliseconds, in process).
Both raise InvalidVersionError with the reason, or return a report.

Its own module because it runs the runtimes, which read version folders: the store writes and loads versions
and imports neither.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from irevla_ros.vla import onnx_export
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.integrity import (
    CONFIG,
    HEADS_WEIGHTS,
    MANIFEST,
    CorruptVersionError,
    InvalidVersionError,
    sha256_file,
    verify_version_dir,
)
from irevla_ros.vla.model import ActionResidual, VLAModel, with_residual_defaults
from irevla_ros.vla.model_store import ModelStore, check_shapes
from irevla_ros.vla.runtime import OnnxPolicyRuntime, TorchPolicyRuntime


def validate(store: ModelStore, version_id: str) -> dict[str, Any]:
    """Everything `load` checks, plus a probe observation through torch and (if exported) ONNX Runtime:
    right shapes, finite outputs, ONNX within tolerance of torch. Raises InvalidVersionError with the reason;
    returns a report."""
    model, config, info = store.load(version_id)
    probe = probe_observation(config)
    report: dict[str, Any] = {
        "version_id": version_id,
        "checksums": "ok",
        "weights": "ok",
        "heads_only": info.heads_only,
        "base_version": info.base_version,
    }
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


def validate_heads(store: ModelStore, version_id: str, latents: np.ndarray | None = None) -> dict[str, Any]:
    """The light check of a heads-only version for a node that already runs its base's encoder: its own
    checksums, the base pinned by manifest checksum, the config byte-equal to the base's, the heads' keys,
    shapes and finiteness, and heads.onnx against torch heads on `latents` (e.g. the running encoder's
    latent of the probe observation) and random latents, all outputs finite. The base's weight files are
    not re-hashed: the caller vouches for them (its runtime verified them when it loaded the base).
    Milliseconds, no backbone in torch; `validate` is the full check."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from irevla_ros.vla.model import mlp

    info = store.get(version_id)
    if not info.heads_only:
        raise InvalidVersionError(f"{version_id} is a full version, not heads-only")
    verify_version_dir(info.path, info.meta)
    base = store.base_of(version_id)
    if sha256_file(base.path / MANIFEST) != info.meta.get("base_manifest_sha256"):
        raise CorruptVersionError(
            f"{version_id}: its base {base.version_id} has changed since it was saved "
            "(manifest checksum differs from the one recorded)"
        )
    if (info.path / CONFIG).read_bytes() != (base.path / CONFIG).read_bytes():
        raise CorruptVersionError(f"{version_id}: {CONFIG} differs from its base {base.version_id}")
    config = store.read_config(version_id)
    heads = torch.nn.Module()  # just the heads, named as in VLAModel, so VLAModel's head functions apply
    heads.action_head = mlp(config.latent_dim, config.head_hidden, config.action_dim, final_std=0.01)
    heads.action_residual = ActionResidual(config.latent_dim, config.action_dim, config.head_hidden)
    heads.critic_head = mlp(config.latent_dim, config.head_hidden, 1, final_std=0.01)
    heads.log_std = torch.nn.Parameter(torch.zeros(config.action_dim))
    try:
        tensors = load_file(str(info.path / HEADS_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidVersionError(f"{version_id}: {HEADS_WEIGHTS} cannot be read: {exc}") from exc
    tensors = with_residual_defaults(tensors, heads)
    check_shapes(tensors, {k: tuple(v.shape) for k, v in heads.state_dict().items()}, version_id)
    heads.load_state_dict(tensors, strict=True)
    heads.eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, config.latent_dim, generator=g)
    if latents is not None:
        given = torch.as_tensor(np.asarray(latents, np.float32)).reshape(-1, config.latent_dim)
        if not torch.isfinite(given).all():
            raise InvalidVersionError(f"{version_id}: the probe latents given are not finite")
        z = torch.cat([given, z])
    with torch.no_grad():
        mean = VLAModel.action_mean(heads, z).numpy()  # type: ignore[arg-type]
        value = VLAModel.value(heads, z).numpy()  # type: ignore[arg-type]
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(value))):
        raise InvalidVersionError(f"{version_id}: heads outputs are not finite on the probe latents")
    report: dict[str, Any] = {
        "version_id": version_id,
        "checksums": "ok",
        "weights": "ok",
        "heads_only": True,
        "base_version": base.version_id,
        "probe_torch": {"action_mean": mean[0].tolist(), "value": float(value[0])},
    }
    if info.onnx:
        try:
            session = onnx_export.make_session(info.path / info.onnx["files"]["heads"], 1)
            o_mean, o_value, o_log_std = session.run(None, {"latent": z.numpy()})  # type: ignore[attr-defined]
            report["onnx_max_abs_error"] = {
                "action_mean": onnx_export.compare("action_mean", o_mean, mean),
                "value": onnx_export.compare("value", o_value, value),
                "log_std": onnx_export.compare(
                    "log_std", o_log_std, np.broadcast_to(heads.log_std.detach().numpy(), mean.shape)
                ),
            }
        except onnx_export.OnnxMismatchError as exc:
            raise InvalidVersionError(f"{version_id}: ONNX does not match torch: {exc}") from exc
        except Exception as exc:  # onnxruntime's own errors: a broken or mismatched graph
            raise InvalidVersionError(f"{version_id}: heads.onnx fails on the probe: {exc}") from exc
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
