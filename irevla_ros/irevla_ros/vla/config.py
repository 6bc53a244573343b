"""VLAConfig: everything that decides the VLA's architecture and its input contract.

A config is saved with every model version (`config.json`), so it holds only JSON-able values, and
`from_dict` refuses unknown keys and bad values with the key named. Fields left at `None` take the backbone's
own default; `resolved()` fills them in (the hf backbone reads them from the model directory), and a model
version always stores the resolved config, so preprocessing never depends on what is installed later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

BACKBONES = ("compact", "hf")
HF_DTYPES = ("float32", "bfloat16", "float16")
HF_QUANTIZATIONS = ("none", "8bit", "4bit")

COMPACT_IMAGE_SIZE = 128
# EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128 over 0..255 pixels.
COMPACT_IMAGE_MEAN = (127.0 / 255.0,) * 3
COMPACT_IMAGE_STD = (128.0 / 255.0,) * 3
# LoRA on MiniLM's attention and on EfficientNet's last 1x1 convolution; the fusion layers are new and train fully.
COMPACT_LORA_TARGETS = ("query", "value", "_conv_head")
# BLIP-2 (and LLaVA) use the OpenAI CLIP statistics when the model directory has no preprocessor_config.json.
CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# LoRA on the language model's attention (OPT, Llama, ... name them q_proj / v_proj), as usual for VLM LoRA.
HF_LORA_TARGETS = ("q_proj", "v_proj")

_CAMERA_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


class VLAConfigError(ValueError):
    """A VLA config value or key is wrong; the message names the key."""


@dataclass(frozen=True)
class VLAConfig:
    backbone: str = "compact"
    # hf backbone: a local directory holding a transformers vision-language model (save_pretrained layout).
    hf_model_dir: str | None = None
    hf_dtype: str = "float32"  # bfloat16 / float16 for GPU machines; heads stay float32
    hf_quantization: str = "none"  # 8bit / 4bit through bitsandbytes (GPU only)
    image_size: int | None = None  # square side S fed to the backbone; None: backbone default
    image_mean: tuple[float, float, float] | None = None  # on 0..1 pixels; None: backbone default
    image_std: tuple[float, float, float] | None = None
    cameras: tuple[str, ...] = ("camera",)
    proprio_dim: int = 4  # 0: no proprioception input
    action_dim: int = 4  # end-effector delta (x, y, z) + gripper, in [-1, 1]
    latent_dim: int = 256  # d: width of the compact fusion and of the latent RL caches
    max_instruction_tokens: int = 32
    # compact backbone
    fusion_layers: int = 2
    fusion_heads: int = 4
    text_tokens: int = 2  # the sentence embedding is projected to this many tokens
    # token learner: attention pooling of the m backbone tokens into `token_learner_tokens` tokens -> latent
    token_learner_hidden: int = 128
    token_learner_tokens: int = 1
    # action and critic heads share this structure (the paper's critic copies the action head)
    head_hidden: tuple[int, ...] = (256, 256)
    lora_rank: int = 8  # 0: no LoRA (backbone frozen in every stage)
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # module-name suffixes, as peft matches them
    init_log_std: float = -1.0  # exploration std exp(-1) = 0.37 in [-1, 1] action units
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried with the config

    def __post_init__(self) -> None:
        _validate(self)

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VLAConfig:
        if not isinstance(data, Mapping):
            raise VLAConfigError(f"a VLA config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VLAConfigError(
                f"unknown VLA config key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a value of a type the validators do not expect at all
            raise VLAConfigError(f"bad VLA config: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VLAConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise VLAConfigError(f"VLA config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> VLAConfig:
        return dataclasses.replace(self, **changes)

    # ---- backbone defaults ----
    @property
    def n_cameras(self) -> int:
        return len(self.cameras)

    def is_resolved(self) -> bool:
        return None not in (self.image_size, self.image_mean, self.image_std, self.lora_targets)

    def resolved(self) -> VLAConfig:
        """This config with every backbone default filled in (reads the hf model directory's JSON files)."""
        if self.is_resolved():
            return self
        if self.backbone == "compact":
            defaults = {
                "image_size": COMPACT_IMAGE_SIZE,
                "image_mean": COMPACT_IMAGE_MEAN,
                "image_std": COMPACT_IMAGE_STD,
                "lora_targets": COMPACT_LORA_TARGETS,
            }
        else:
            size, mean, std = hf_image_defaults(str(self.hf_model_dir))
            defaults = {
                "image_size": size,
                "image_mean": mean,
                "image_std": std,
                "lora_targets": HF_LORA_TARGETS,
            }
        changes = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **changes)


@lru_cache(maxsize=8)
def hf_image_defaults(model_dir: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(image size, mean, std) for a transformers VLM directory, from its own config files."""
    root = Path(model_dir)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise VLAConfigError(f"hf_model_dir {model_dir!r}: no config.json (not a save_pretrained directory)")
    config = json.loads(config_path.read_text())
    size = (config.get("vision_config") or {}).get("image_size")
    mean, std = CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
    pre_path = root / "preprocessor_config.json"
    if pre_path.is_file():
        pre = json.loads(pre_path.read_text())
        mean = tuple(float(v) for v in pre.get("image_mean", mean))
        std = tuple(float(v) for v in pre.get("image_std", std))
        pre_size = pre.get("size")
        if isinstance(pre_size, Mapping):
            pre_size = pre_size.get("height", pre_size.get("shortest_edge"))
        size = pre_size or size
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int):
        raise VLAConfigError(f"hf_model_dir {model_dir!r}: cannot find the vision model's image size")
    return size, mean, std


def _fail(key: str, message: str) -> None:
    raise VLAConfigError(f"VLA config {key}: {message}")


def _check_int(cfg: VLAConfig, key: str, minimum: int) -> None:
    value = getattr(cfg, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(key, f"must be an integer >= {minimum}, got {value!r}")


def _check_float(cfg: VLAConfig, key: str, minimum: float | None = None) -> None:
    value = getattr(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, f"must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        _fail(key, f"must be >= {minimum}, got {value!r}")


def _validate(cfg: VLAConfig) -> None:
    if cfg.backbone not in BACKBONES:
        _fail("backbone", f"{cfg.backbone!r} is not one of {', '.join(BACKBONES)}")
    if cfg.backbone == "hf" and not (isinstance(cfg.hf_model_dir, str) and cfg.hf_model_dir):
        _fail("hf_model_dir", "the hf backbone needs a local model directory")
    if cfg.hf_dtype not in HF_DTYPES:
        _fail("hf_dtype", f"{cfg.hf_dtype!r} is not one of {', '.join(HF_DTYPES)}")
    if cfg.hf_quantization not in HF_QUANTIZATIONS:
        _fail("hf_quantization", f"{cfg.hf_quantization!r} is not one of {', '.join(HF_QUANTIZATIONS)}")
    if cfg.image_size is not None:
        _check_int(cfg, "image_size", 32)
    for key in ("image_mean", "image_std"):
        value = getattr(cfg, key)
        if value is None:
            continue
        ok = isinstance(value, tuple) and len(value) == 3
        ok = ok and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        )
        if not ok or (key == "image_std" and min(value) <= 0):
            _fail(key, f"must be three finite numbers{' > 0' if key == 'image_std' else ''}, got {value!r}")
    if not isinstance(cfg.cameras, tuple) or not cfg.cameras:
        _fail("cameras", f"must be a non-empty list of camera names, got {cfg.cameras!r}")
    for name in cfg.cameras:
        if not isinstance(name, str) or not _CAMERA_RE.fullmatch(name):
            _fail("cameras", f"camera name {name!r} must match [A-Za-z][A-Za-z0-9_]*")
    if len(set(cfg.cameras)) != len(cfg.cameras):
        _fail("cameras", f"duplicate camera names in {cfg.cameras!r}")
    _check_int(cfg, "proprio_dim", 0)
    for key in ("action_dim", "latent_dim", "max_instruction_tokens", "fusion_heads", "text_tokens"):
        _check_int(cfg, key, 1)
    for key in ("token_learner_hidden", "token_learner_tokens"):
        _check_int(cfg, key, 1)
    _check_int(cfg, "fusion_layers", 0)
    _check_int(cfg, "lora_rank", 0)
    if cfg.latent_dim % cfg.fusion_heads:
        _fail(
            "fusion_heads", f"latent_dim {cfg.latent_dim} is not divisible by fusion_heads {cfg.fusion_heads}"
        )
    if not isinstance(cfg.head_hidden, tuple) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in cfg.head_hidden
    ):
        _fail("head_hidden", f"must be a list of positive integers, got {cfg.head_hidden!r}")
    _check_float(cfg, "lora_alpha", 0.0)
    _check_float(cfg, "lora_dropout", 0.0)
    if cfg.lora_dropout >= 1:
        _fail("lora_dropout", f"must be < 1, got {cfg.lora_dropout!r}")
    _check_float(cfg, "init_log_std")
    if not -10.0 <= cfg.init_log_std <= 2.0:
        _fail("init_log_std", f"must be in [-10, 2], got {cfg.init_log_std!r}")
    if cfg.lora_targets is not None and (
        not isinstance(cfg.lora_targets, tuple)
        or not cfg.lora_targets
        or not all(isinstance(t, str) and t for t in cfg.lora_targets)
    ):
        _fail("lora_targets", f"must be a non-empty list of module names, got {cfg.lora_targets!r}")
    if not isinstance(cfg.extra, dict):
        _fail("extra", f"must be a mapping, got {type(cfg.extra).__name__}")
