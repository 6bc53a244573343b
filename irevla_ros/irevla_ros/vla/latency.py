"""Policy-step latency of the compact VLA: torch vs ONNX Runtime, one and two cameras.

    python -m irevla_ros.vla.latency [--steps 300] [--threads 2] [--image-hw 480 640] [--json out.json]

One step = what the policy node does per tick (`runtime.act`): preprocess the camera frame(s) (HxWx3 uint8 ->
SxS), look up the cached instruction features, backbone + token learner, heads. The first 20 steps of each
runtime are warm-up.

The runtimes are measured interleaved, in blocks of 10 steps in alternating order, so that on a shared machine
both see the same background load (measured one after the other, a burst of load lands on one of them only).
`breakdown` times the same pieces separately (preprocess, encoder = backbone + token learner, heads), p50 of
each, to show where a step's time goes; `load_average` is os.getloadavg() before and after the run, and
`quiet` says whether the 1-minute load before the run was under half the cores. On a busy machine the torch
figures mostly measure OpenMP contention (torch's 2-thread parallel regions wait for a descheduled thread: p50
~500 ms at load 6-7 on 2 cores, ~9 ms when quiet); compare runtimes only from a quiet run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

INSTRUCTION = "press the button"
WARMUP = 20
BLOCK = 10


def _percentiles(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


def _frames(cameras: tuple[str, ...], hw: tuple[int, int], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    # a few distinct frames so caches cannot help
    return [{c: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for c in cameras} for _ in range(8)]


def _interleaved(steps_of: Mapping[str, Callable[[int], None]], steps: int) -> dict[str, list[float]]:
    """Wall time of each step function, `steps` times each after WARMUP, in alternating blocks of BLOCK."""
    names = list(steps_of)
    for name in names:
        for i in range(WARMUP):
            steps_of[name](i)
    times: dict[str, list[float]] = {n: [] for n in names}
    done = 0
    block = 0
    while done < steps:
        n = min(BLOCK, steps - done)
        for name in names if block % 2 == 0 else reversed(names):
            fn = steps_of[name]
            for i in range(done, done + n):
                t0 = time.perf_counter()
                fn(i)
                times[name].append(time.perf_counter() - t0)
        done += n
        block += 1
    return times


def measure_runtimes(
    runtimes: Mapping[str, Any], cameras: tuple[str, ...], steps: int, hw: tuple[int, int], seed: int = 0
) -> dict[str, dict[str, float]]:
    """p50/p99 of `runtime.act` (one observation) for each runtime, measured interleaved."""
    frames = _frames(cameras, hw, seed)
    proprio = np.zeros(next(iter(runtimes.values())).config.proprio_dim, dtype=np.float32)

    def stepper(rt: Any) -> Callable[[int], None]:
        return lambda i: rt.act(frames[i % len(frames)], INSTRUCTION, proprio)

    times = _interleaved({k: stepper(rt) for k, rt in runtimes.items()}, steps)
    return {k: _percentiles(v) for k, v in times.items()}


def measure(
    runtime: object, cameras: tuple[str, ...], steps: int, hw: tuple[int, int], seed: int = 0
) -> dict[str, float]:
    """p50/p99 of `runtime.act` for one runtime."""
    return measure_runtimes({"rt": runtime}, cameras, steps, hw, seed)["rt"]


def breakdown(
    runtimes: Mapping[str, Any], cameras: tuple[str, ...], steps: int, hw: tuple[int, int], seed: int = 0
) -> dict[str, dict[str, float]]:
    """p50 ms of each piece of a step (the calls `act` makes), per runtime, interleaved like the totals."""
    from irevla_ros.vla.preprocess import preprocess_images

    frames = _frames(cameras, hw, seed)
    out: dict[str, dict[str, float]] = {}
    for name, rt in runtimes.items():
        proprio = np.zeros(rt.config.proprio_dim, dtype=np.float32)
        x = preprocess_images(frames[0], rt.config)
        text = rt.encode_instruction(INSTRUCTION)
        latent = rt.latent(x, text, proprio)
        pieces = {
            "preprocess": lambda i, rt=rt: preprocess_images(frames[i % len(frames)], rt.config),
            "encoder": lambda i, rt=rt, x=x, text=text, p=proprio: rt.latent(x, text, p),
            "heads": lambda i, rt=rt, z=latent: rt.heads(z),
        }
        times = _interleaved(pieces, steps)
        out[name] = {f"{k}_p50_ms": _percentiles(v)["p50_ms"] for k, v in times.items()}
    return out


def _machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


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
    hw = tuple(args.image_hw)
    results: dict = {
        "threads": args.threads,
        "image_hw": list(hw),
        "steps": args.steps,
        "method": "runtime.act per step, torch and onnxruntime interleaved in blocks of 10 steps; "
        "breakdown: p50 of each piece measured the same way",
        "machine": _machine(),
        "load_average": {"before": list(os.getloadavg())},
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(tmp)
        for cameras in (("camera",), ("front", "wrist")):
            model = VLAModel(VLAConfig(cameras=cameras))
            info = store.save(model, parent=None, stage="bench")
            runtimes = {
                "torch": TorchPolicyRuntime(model),
                "onnxruntime": OnnxPolicyRuntime(info.path, intra_op_threads=args.threads),
            }
            totals = measure_runtimes(runtimes, cameras, args.steps, hw)
            t, o = totals["torch"], totals["onnxruntime"]
            results[f"{len(cameras)}cam"] = {
                **totals,
                "speedup_p50": t["p50_ms"] / o["p50_ms"],
                "speedup_p99": t["p99_ms"] / o["p99_ms"],
                "breakdown": breakdown(runtimes, cameras, max(args.steps // 3, 10), hw),
                "bytes": info.meta["bytes"],
                "parameters": info.meta["parameters"],
            }
    results["load_average"]["after"] = list(os.getloadavg())
    results["quiet"] = results["load_average"]["before"][0] < 0.5 * (os.cpu_count() or 1)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
