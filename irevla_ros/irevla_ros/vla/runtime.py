"""Robot-side inference: the same API over ONNX Runtime (default on CPU) and torch (fallback, GPU, hf in bf16).

    rt = OnnxPolicyRuntime(store.get("v0003-stage2_sft").path)   # or make_runtime(version_dir)
    mean, value, latent = rt.act({"camera": rgb_uint8}, "press the button", proprio)
    action, log_prob = rt.sample(mean, rng, deterministic=False)

A heads-only version (Stage 1) runs its base version's text and encoder graphs with its own heads.onnx;
`make_runtime(heads_dir, reuse=running)` shares the text/encoder sessions (and the instruction cache) of an
already loaded runtime on the same base, so swapping to a heads update loads only the ~1 MB heads graph.

`encode_instruction(text)` is cached by text (LRU): an episode's instruction is tokenised and encoded once, and
the same read-only array is returned after that. `latent` + `heads` are the two halves the RL stage uses
separately (latents cached, heads trained).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irevla_ros.vla import integrity
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.distribution import sample_action
from irevla_ros.vla.preprocess import VLAInputError, preprocess_images

Images = Mapping[str, np.ndarray] | Sequence[np.ndarray]


class _RuntimeBase:
    config: VLAConfig
    cache_size = 32

    def __init__(self) -> None:
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.text_encoder_calls = 0  # how often the text encoder actually ran (the cache's misses)

    # ---- implemented by the backends ----
    def _encode_text(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def _latent(
        self, images: np.ndarray, text_features: np.ndarray, proprio: np.ndarray | None
    ) -> np.ndarray:
        raise NotImplementedError

    def _heads(self, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    log_std: np.ndarray

    # ---- shared API ----
    def encode_instruction(self, text: str) -> np.ndarray:
        """(1, T, D) float32 text features; cached by text."""
        if not isinstance(text, str) or not text.strip():
            raise VLAInputError(f"instruction must be a non-empty string, got {text!r}")
        cached = self._text_cache.get(text)
        if cached is not None:
            self._text_cache.move_to_end(text)
            return cached
        features = np.ascontiguousarray(self._encode_text(text), dtype=np.float32)
        features.setflags(write=False)
        self.text_encoder_calls += 1
        self._text_cache[text] = features
        if len(self._text_cache) > self.cache_size:
            self._text_cache.popitem(last=False)
        return features

    def latent(self, images: np.ndarray, text_features: np.ndarray, proprio: np.ndarray | None) -> np.ndarray:
        """Preprocessed images (B, n_cam, 3, S, S) or (n_cam, 3, S, S), text features (1|B, T, D), proprio (B, P)
        or (P,) -> latent (B, latent_dim)."""
        cfg = self.config
        s = int(cfg.image_size)  # type: ignore[arg-type]
        images = np.asarray(images, dtype=np.float32)
        if images.ndim == 4:
            images = images[None]
        if images.ndim != 5 or images.shape[1:] != (cfg.n_cameras, 3, s, s):
            raise VLAInputError(
                f"images must have shape (B, {cfg.n_cameras}, 3, {s}, {s}) from preprocess_images, got {images.shape}"
            )
        b = images.shape[0]
        text_features = np.asarray(text_features, dtype=np.float32)
        if text_features.ndim != 3 or text_features.shape[0] not in (1, b):
            raise VLAInputError(f"text_features must have shape (1 or {b}, T, D), got {text_features.shape}")
        if text_features.shape[0] != b:
            text_features = np.broadcast_to(text_features, (b, *text_features.shape[1:]))
        if cfg.proprio_dim:
            proprio = np.asarray(proprio, dtype=np.float32) if proprio is not None else None
            if proprio is not None and proprio.ndim == 1:
                proprio = proprio[None]
            if proprio is None or proprio.shape != (b, cfg.proprio_dim) or not np.all(np.isfinite(proprio)):
                got = None if proprio is None else proprio.shape
                raise VLAInputError(f"proprio must be finite with shape ({b}, {cfg.proprio_dim}), got {got}")
        else:
            proprio = None
        return self._latent(np.ascontiguousarray(images), np.ascontiguousarray(text_features), proprio)

    def heads(self, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """latent (B, d) -> (action_mean (B, A) in [-1, 1], value (B,))."""
        latent = np.asarray(latent, dtype=np.float32)
        if latent.ndim == 1:
            latent = latent[None]
        if latent.ndim != 2 or latent.shape[1] != self.config.latent_dim:
            raise VLAInputError(f"latent must have shape (B, {self.config.latent_dim}), got {latent.shape}")
        return self._heads(np.ascontiguousarray(latent))

    def act(
        self, images: Images, instruction: str, proprio: np.ndarray | None
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """One observation (raw HxWx3 uint8 camera images) -> (action_mean (A,), value, latent (d,))."""
        x = preprocess_images(images, self.config)
        text_features = self.encode_instruction(instruction)
        latent = self.latent(x, text_features, proprio)
        mean, value = self.heads(latent)
        return mean[0], float(value[0]), latent[0]

    def sample(
        self, action_mean: np.ndarray, rng: np.random.Generator, *, deterministic: bool
    ) -> tuple[np.ndarray, float]:
        """Exploration around `action_mean`: (action in [-1, 1], log-probability), as VLAModel.distribution."""
        return sample_action(action_mean, self.log_std, rng, deterministic=deterministic)

    def close(self) -> None:
        """Let go of the backend (sessions, model) now: a process that exits with them still referenced has them
        destroyed during interpreter teardown, in no defined order with the libraries they run on."""
        self._text_cache.clear()


class OnnxPolicyRuntime(_RuntimeBase):
    """Runs a model version folder's text/encoder/heads ONNX graphs with onnxruntime on the CPU."""

    def __init__(
        self,
        version_dir: str | Path,
        intra_op_threads: int = 2,
        *,
        verify: bool = True,
        allow_spinning: bool = False,
        reuse: _RuntimeBase | None = None,
    ) -> None:
        super().__init__()
        from irevla_ros.vla.backbones import load_tokenizer
        from irevla_ros.vla.onnx_export import make_session

        path = Path(version_dir)
        meta = integrity.read_json(path / integrity.META)
        if verify:
            integrity.verify_version_dir(path, meta)
        onnx_meta = meta.get("onnx")
        if not onnx_meta:
            raise integrity.InvalidVersionError(
                f"{path.name}: no ONNX export in this version (use TorchPolicyRuntime / make_runtime)"
            )
        self.version_id = str(meta.get("version_id", path.name))
        self.config = VLAConfig.from_json((path / integrity.CONFIG).read_text())
        files = dict(onnx_meta["files"])

        def session(file: Path) -> Any:
            return make_session(file, intra_op_threads, allow_spinning=allow_spinning)

        self.reused_encoder = False
        if not meta.get("heads_only"):
            # The full version runs its own text and encoder graphs.
            self.encoder_version = self.version_id
            self.encoder_manifest_sha256 = str(meta.get("manifest_sha256", ""))
            self.tokenizer = load_tokenizer(path / integrity.TOKENIZER_DIR)
            self.sessions: dict[str, Any] = {k: session(path / files[k]) for k in files}
        else:
            self.encoder_version = str(meta["base_version"])
            self.encoder_manifest_sha256 = str(meta["base_manifest_sha256"])
            if (
                isinstance(reuse, OnnxPolicyRuntime)
                and reuse.encoder_version == self.encoder_version
                and reuse.encoder_manifest_sha256 == self.encoder_manifest_sha256
                and reuse.config == self.config
            ):
                # The same base graphs, already verified and warm: share them (sessions are thread-safe).
                self.reused_encoder = True
                self.tokenizer = reuse.tokenizer
                self.sessions = {"text": reuse.sessions["text"], "encoder": reuse.sessions["encoder"]}
                self._text_cache = OrderedDict(reuse._text_cache)
            else:
                base_path = path.parent / self.encoder_version
                base_meta = _base_meta(path.name, base_path, self.encoder_manifest_sha256, verify)
                base_config = VLAConfig.from_json((base_path / integrity.CONFIG).read_text())
                if base_config != self.config:
                    raise integrity.CorruptVersionError(
                        f"{path.name}: {integrity.CONFIG} differs from its base {self.encoder_version}"
                    )
                base_files = (base_meta.get("onnx") or {}).get("files", {})
                if "text" not in base_files or "encoder" not in base_files:
                    raise integrity.InvalidVersionError(
                        f"{path.name}: its base {self.encoder_version} has no ONNX text/encoder graphs"
                    )
                self.tokenizer = load_tokenizer(base_path / integrity.TOKENIZER_DIR)
                self.sessions = {k: session(base_path / base_files[k]) for k in ("text", "encoder")}
            self.sessions["heads"] = session(path / files["heads"])
        self._check_graphs(path.name)
        # log_std does not depend on the input; read it once.
        probe = np.zeros((1, self.config.latent_dim), dtype=np.float32)
        self.log_std = self.sessions["heads"].run(["log_std"], {"latent": probe})[0][0].astype(np.float32)
        self._encoder_inputs = {i.name for i in self.sessions["encoder"].get_inputs()}

    def _check_graphs(self, name: str) -> None:
        cfg = self.config
        s = int(cfg.image_size)  # type: ignore[arg-type]
        want = {
            ("encoder", "images"): [cfg.n_cameras, 3, s, s],
            ("heads", "latent"): [cfg.latent_dim],
        }
        for (part, inp), dims in want.items():
            shapes = {i.name: i.shape for i in self.sessions[part].get_inputs()}
            if inp not in shapes or list(shapes[inp][1:]) != dims:
                raise integrity.InvalidVersionError(
                    f"{name}: {part}.onnx input {inp} has shape {shapes.get(inp)}, the config needs [batch, *{dims}]"
                )
        outs = {o.name: o.shape for o in self.sessions["heads"].get_outputs()}
        if list(outs.get("action_mean", [None, None])[1:]) != [cfg.action_dim]:
            raise integrity.InvalidVersionError(
                f"{name}: heads.onnx action_mean has shape {outs.get('action_mean')}, config action_dim {cfg.action_dim}"
            )
        lat = {o.name: o.shape for o in self.sessions["encoder"].get_outputs()}
        if list(lat.get("latent", [None, None])[1:]) != [cfg.latent_dim]:
            raise integrity.InvalidVersionError(
                f"{name}: encoder.onnx latent has shape {lat.get('latent')}, config latent_dim {cfg.latent_dim}"
            )

    def _encode_text(self, text: str) -> np.ndarray:
        enc = self.tokenizer(
            [text],
            padding=True,
            truncation=True,
            max_length=self.config.max_instruction_tokens,
            return_tensors="np",
        )
        feed = {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
        }
        return self.sessions["text"].run(None, feed)[0]

    def _latent(
        self, images: np.ndarray, text_features: np.ndarray, proprio: np.ndarray | None
    ) -> np.ndarray:
        feed = {"images": images, "text_features": np.ascontiguousarray(text_features)}
        if "proprio" in self._encoder_inputs:
            feed["proprio"] = proprio  # type: ignore[assignment]
        return self.sessions["encoder"].run(None, feed)[0]

    def _heads(self, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, value, _ = self.sessions["heads"].run(None, {"latent": latent})
        return mean, value

    def close(self) -> None:
        super().close()
        # A session shared with another runtime (heads-only versions) lives on until that one closes too.
        self.sessions = {}


def _base_meta(name: str, base_path: Path, pinned_sha256: str, verify: bool) -> dict[str, Any]:
    """The base version of heads-only version `name`: its meta, after checking it is the base that was pinned."""
    if not base_path.is_dir():
        raise integrity.UnknownVersionError(f"{name}: its base version {base_path.name} is not in the store")
    base_meta = integrity.read_json(base_path / integrity.META)
    if base_meta.get("heads_only"):
        raise integrity.CorruptVersionError(f"{name}: its base {base_path.name} is itself heads-only")
    if base_meta.get("manifest_sha256") != pinned_sha256:
        raise integrity.CorruptVersionError(
            f"{name}: its base {base_path.name} has changed since it was saved (manifest checksum)"
        )
    if verify:
        integrity.verify_version_dir(base_path, base_meta)
    return base_meta


class TorchPolicyRuntime(_RuntimeBase):
    """The same API over a VLAModel in torch (fallback without ONNX, GPU machines, hf in bf16/quantised)."""

    def __init__(self, model: Any, num_threads: int | None = None) -> None:
        super().__init__()
        import torch

        self._torch = torch
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.model = model.eval()
        self.config = model.config
        self.reused_encoder = False
        self.version_id: str | None = None  # set by make_runtime for a stored version
        self.encoder_version: str | None = None
        self.device = model.log_std.device
        self.log_std = model.log_std.detach().cpu().numpy().astype(np.float32)

    def close(self) -> None:
        super().close()
        self.model = None

    def refresh(self) -> None:
        """Re-read log_std after the model's weights changed (e.g. new weights pushed by the learner)."""
        self.log_std = self.model.log_std.detach().cpu().numpy().astype(np.float32)
        self._text_cache.clear()

    def _encode_text(self, text: str) -> np.ndarray:
        with self._torch.no_grad():
            return self.model.encode_instruction([text]).float().cpu().numpy()

    def _latent(
        self, images: np.ndarray, text_features: np.ndarray, proprio: np.ndarray | None
    ) -> np.ndarray:
        t = self._torch
        with t.no_grad():
            p = t.from_numpy(proprio).to(self.device) if proprio is not None else None
            x = t.from_numpy(images).to(self.device)
            tf = t.from_numpy(np.array(text_features)).to(self.device)
            return self.model.encode(x, tf, p).float().cpu().numpy()

    def _heads(self, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self._torch
        with t.no_grad():
            z = t.from_numpy(latent).to(self.device)
            return self.model.action_mean(z).float().cpu().numpy(), self.model.value(z).float().cpu().numpy()


def make_runtime(
    version_dir: str | Path,
    *,
    prefer: str = "onnx",
    intra_op_threads: int = 2,
    reuse: _RuntimeBase | None = None,
) -> _RuntimeBase:
    """ONNX Runtime when the version has an export and onnxruntime imports; otherwise torch (verified load).

    `reuse`: a loaded ONNX runtime whose text/encoder sessions a heads-only version on the same base shares
    (ignored otherwise). The torch fallback always loads the whole model."""
    from irevla_ros.vla.model_store import ModelStore  # torch: only for the fallback

    path = Path(version_dir)
    has_onnx = bool(json.loads((path / integrity.META).read_text()).get("onnx"))
    if prefer == "onnx" and has_onnx:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            pass
        else:
            return OnnxPolicyRuntime(path, intra_op_threads, reuse=reuse)
    model, _, info = ModelStore(path.parent).load(path.name)
    runtime = TorchPolicyRuntime(model, num_threads=intra_op_threads)
    runtime.version_id, runtime.encoder_version = info.version_id, info.base_version
    return runtime
