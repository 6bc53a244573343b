"""Policy-step latency of the compact VLA: torch vs ONNX Runtime, one and two cameras.

    python -m irevla_ros.vla.latency [--steps 300] [--threads 2] [--image-hw 480 640] [--json out.json]

One step = what the policy node does per tick: preprocess the camera frame(s) (HxWx3 uint8 -> SxS), look up the
cached instruction features, backbone + token learner, heads. The first 20 steps are warm-up.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def measure(
    runtime: object, cameras: tuple[str, ...], steps: int, hw: tuple[int, int], seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    frames = [
        {c: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for c in cameras} for _ in range(8)
    ]  # a few distinct frames so caches cannot help
    proprio = np.zeros(runtime.config.proprio_dim, dtype=np.float32)  # type: ignore[attr-defined]
    times = []
    for i in range(steps + 20):
        t0 = time.perf_counter()
        runtime.act(frames[i % len(frames)], "press the button", proprio)  # type: ignore[attr-defined]
        if i >= 20:
            times.append(time.perf_counter() - t0)
    return _percentiles(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-hw", type=int, nargs=2, default=(480, 640))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from irevla_ros.vla.config import VLAConfig
    from irevla_ros.vla.model import VLAModel
    from irevla_ros.vla.model_store import ModelStore
    from irevla_ros.vla.runtime import OnnxPolicyRuntime, TorchPolicyRuntime

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads, "image_hw": list(args.image_hw), "steps": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(tmp)
        for cameras in (("camera",), ("front", "wrist")):
            model = VLAModel(VLAConfig(cameras=cameras))
            info = store.save(model, parent=None, stage="bench")
            key = f"{len(cameras)}cam"
            results[key] = {
                "torch": measure(TorchPolicyRuntime(model), cameras, args.steps, tuple(args.image_hw)),
                "onnxruntime": measure(
                    OnnxPolicyRuntime(info.path, intra_op_threads=args.threads),
                    cameras,
                    args.steps,
                    tuple(args.image_hw),
                ),
                "bytes": info.meta["bytes"],
                "parameters": info.meta["parameters"],
            }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
