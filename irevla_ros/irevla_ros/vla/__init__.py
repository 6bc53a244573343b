"""The VLA model of iRe-VLA: backbone -> token learner -> latent -> action / critic heads.

Modules: `config` (VLAConfig), `preprocess` (the one image preprocessing function), `backbones` (compact and
hf), `model` (VLAModel), `model_store` (versioned safetensors + ONNX folders), `runtime` (onnxruntime / torch
inference with cached instruction features). Plain Python + torch; no rclpy.
"""

from irevla_ros.vla.config import VLAConfig, VLAConfigError

__all__ = ["VLAConfig", "VLAConfigError"]
