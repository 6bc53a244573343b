"""ONNX export of the inference graph, split in three so each part runs only as often as it must:

- `text.onnx`: (input_ids, attention_mask) int64 (B, T) -> text_features (B, T', D). Once per episode.
- `encoder.onnx`: (images (B, n_cam, 3, S, S), text_features, proprio (B, P)) -> latent (B, latent_dim).
  Backbone + token learner: the part whose output the RL stage caches.
- `heads.onnx`: latent (B, latent_dim) -> action_mean (B, A), value (B,), log_std (B, A). Cheap; the RL stage's
  trainable part, so a new critic or action head only changes this file.

LoRA is merged into the base weights of a copy before export, so the graphs carry no adapter branches. The
export is checked against the torch model (unmerged) on random inputs: every output must satisfy
|onnx - torch| <= ATOL + RTOL * |torch| (float32 both sides).

After export, every zero `Pad` that feeds a `Conv` is folded into that Conv's own `pads` attribute
(`fold_pads_into_convs`). EfficientNet-Lite's TensorFlow "SAME" padding is an explicit `F.pad` in torch (a
Conv2d cannot pad asymmetrically), and onnxruntime does not fuse the exported Pad itself (torch writes an empty
constant_value input, which ORT's PadFusion refuses). Each unfused Pad also forced the NCHWc layout back to NCHW
and forth (ReorderOutput/ReorderInput around it); measured on the 1-camera encoder, 2 threads: 17 Pads + 33
reorders were ~40 % of the run. The fold is exact (zero padding is what Conv's pads add).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from irevla_ros.vla.model import VLAModel, merge_lora_

OPSET = 17
ATOL = 1e-4
RTOL = 1e-3
ONNX_FILES = {"text": "text.onnx", "encoder": "encoder.onnx", "heads": "heads.onnx"}


class OnnxMismatchError(ValueError):
    """The ONNX export does not reproduce the torch model within tolerance (or cannot run)."""


class _TextGraph(nn.Module):
    def __init__(self, model: VLAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.backbone.text_features(input_ids, attention_mask)


class _EncoderGraph(nn.Module):
    def __init__(self, model: VLAModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, images: torch.Tensor, text_features: torch.Tensor, *proprio: torch.Tensor
    ) -> torch.Tensor:
        return self.model.encode(images, text_features, proprio[0] if proprio else None)


class _HeadsGraph(nn.Module):
    def __init__(self, model: VLAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Per row (B, A): a constant output would be folded into an initializer and lose its name.
        log_std = self.model.log_std.unsqueeze(0).expand(latent.shape[0], -1)
        return self.model.action_mean(latent), self.model.value(latent), log_std


def example_inputs(model: VLAModel, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of the right shapes (and a real tokenised instruction), for export and verification."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    s = int(cfg.image_size)  # type: ignore[arg-type]
    # Instructions of different lengths (padding inside the batch); another seed, other lengths.
    pool = [
        "pick up the red block and place it in the bowl",
        "press the button",
        "open the drawer",
        "close it",
    ]
    texts = [pool[(seed + i) % len(pool)] for i in range(batch)]
    ids, mask = model.tokenize(texts)
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "images": torch.randn(batch, cfg.n_cameras, 3, s, s, generator=g),
    }
    if cfg.proprio_dim:
        inputs["proprio"] = torch.randn(batch, cfg.proprio_dim, generator=g)
    return inputs


def export_onnx(
    model: VLAModel, out_dir: Path, parts: tuple[str, ...] = ("text", "encoder", "heads")
) -> dict[str, str]:
    """Write text.onnx, encoder.onnx and heads.onnx (or only `parts`, e.g. just the heads after an RL stage)
    into out_dir; returns {part: file name}."""
    out_dir = Path(out_dir)
    # A CPU float32 copy: the graph runs on the robot's CPU whatever device the model trains on.
    merged = merge_lora_(copy.deepcopy(model).to("cpu")).eval()
    merged.requires_grad_(False)
    ex = example_inputs(merged)
    with torch.no_grad():
        text_features = merged.backbone.text_features(ex["input_ids"], ex["attention_mask"])
        latent = merged.encode(ex["images"], text_features, ex.get("proprio"))
    batch = {0: "batch"}
    encoder_inputs: tuple[torch.Tensor, ...] = (ex["images"], text_features)
    encoder_names = ["images", "text_features"]
    if "proprio" in ex:
        encoder_inputs += (ex["proprio"],)
        encoder_names.append("proprio")
    jobs = [
        (
            _TextGraph(merged),
            (ex["input_ids"], ex["attention_mask"]),
            ["input_ids", "attention_mask"],
            ["text_features"],
            {
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "text_features": {0: "batch", 1: "text_tokens"},
            },
            ONNX_FILES["text"],
        ),
        (
            _EncoderGraph(merged),
            encoder_inputs,
            encoder_names,
            ["latent"],
            {
                "images": batch,
                "text_features": {0: "batch", 1: "text_tokens"},
                "proprio": batch,
                "latent": batch,
            },
            ONNX_FILES["encoder"],
        ),
        (
            _HeadsGraph(merged),
            (latent,),
            ["latent"],
            ["action_mean", "value", "log_std"],
            {"latent": batch, "action_mean": batch, "value": batch, "log_std": batch},
            ONNX_FILES["heads"],
        ),
    ]
    for module, args, in_names, out_names, axes, name in jobs:
        if name not in {ONNX_FILES[p] for p in parts}:
            continue
        axes = {k: v for k, v in axes.items() if k in in_names or k in out_names}
        with warnings.catch_warnings(), torch.no_grad():
            # tracer warnings about python-side shape checks, all constant for a given config
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(out_dir / name),
                input_names=in_names,
                output_names=out_names,
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        fold_pads_in_file(out_dir / name)
    return {p: ONNX_FILES[p] for p in parts}


def fold_pads_in_file(path: Path) -> int:
    """`fold_pads_into_convs` on an ONNX file, rewritten in place when anything was folded. The graph is read
    without its external data: a large hf export keeps its weights in side files, which stay untouched."""
    model = onnx.load(str(path), load_external_data=False)
    folded = fold_pads_into_convs(model)
    if folded:
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path))
    return folded


def _constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of tensor `name` when it depends only on initializers and Constant nodes (torch exports a Pad's
    pads as a small chain of Constant/ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast); None otherwise."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    if name in initializers:
        if onnx.external_data_helper.uses_external_data(initializers[name]):
            return None  # pads are a handful of integers, never stored outside the graph
        return numpy_helper.to_array(initializers[name])
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    graph_inputs = {i.name for i in graph.input}
    needed: set[int] = set()  # node indices
    used_initializers: set[str] = set()
    stack, seen = [name], set()
    while stack:
        tensor = stack.pop()
        if not tensor or tensor in seen:
            continue
        seen.add(tensor)
        if tensor in initializers:
            if onnx.external_data_helper.uses_external_data(initializers[tensor]):
                return None
            used_initializers.add(tensor)
            continue
        if tensor in graph_inputs or tensor not in producers:
            return None
        needed.add(producers[tensor])
        stack.extend(graph.node[producers[tensor]].input)
    nodes = [graph.node[i] for i in sorted(needed)]  # graph order is a topological order
    sub = helper.make_graph(
        nodes,
        "constant",
        [],
        [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
        [initializers[i] for i in sorted(used_initializers)],
    )
    return np.asarray(
        ReferenceEvaluator(helper.make_model(sub, opset_imports=model.opset_import)).run(None, {})[0]
    )


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Fold each constant zero Pad (spatial dims only) whose one consumer is a Conv into the Conv's `pads`, in
    place; drop the constant chains nothing uses any more. Returns how many Pads were folded."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = 0
    for pad in [n for n in graph.node if n.op_type == "Pad" and n.domain in ("", "ai.onnx")]:
        attrs = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        users = consumers.get(pad.output[0], [])
        if attrs.get("mode", b"constant") != b"constant" or len(pad.input) < 2 or pad.output[0] in outputs:
            continue
        if len(users) != 1 or users[0].op_type != "Conv" or len(pad.input) > 3:  # opset 18's `axes`: skip
            continue
        conv = users[0]
        conv_attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        if conv_attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
            continue
        if len(pad.input) > 2 and pad.input[2]:
            fill = _constant_value(model, pad.input[2])
            if fill is None or np.any(fill != 0):
                continue
        pads_value = _constant_value(model, pad.input[1])
        if pads_value is None:
            continue
        pads = [int(v) for v in pads_value.ravel()]
        rank = len(pads) // 2
        spatial = len(conv_attrs.get("kernel_shape", ()))
        # Only the spatial dims may be padded (Conv cannot pad batch or channels), and only outwards.
        if rank != spatial + 2 or any(pads[i] for i in (0, 1, rank, rank + 1)) or min(pads) < 0:
            continue
        old = list(conv_attrs.get("pads", [0] * (2 * spatial)))
        new = [old[i] + pads[2 + i] for i in range(spatial)] + [
            old[spatial + i] + pads[rank + 2 + i] for i in range(spatial)
        ]
        for attribute in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(attribute)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
        folded += 1
    if folded:
        _drop_unused(graph)
    return folded


def _drop_unused(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {t for n in graph.node for t in n.input} | outputs
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def make_session(path: Path, intra_op_threads: int = 2, *, allow_spinning: bool = False) -> object:
    """An onnxruntime CPU session with explicit threads. Spinning is off by default: on a robot PC the ROS nodes
    share the cores, and spinning workers then cost more than they save (measured: encoder p99 41 ms with
    spinning vs 9 ms without, 2 threads, 2 busy cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def compare(name: str, got: np.ndarray, want: np.ndarray) -> float:
    """Max abs error; raises OnnxMismatchError outside ATOL + RTOL * |want| or on a shape mismatch."""
    if got.shape != want.shape:
        raise OnnxMismatchError(f"{name}: ONNX output shape {got.shape} != torch {want.shape}")
    err = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if not np.all(np.isfinite(got)) or np.any(err > ATOL + RTOL * np.abs(want)):
        raise OnnxMismatchError(
            f"{name}: ONNX and torch differ by up to {float(np.nanmax(err)):.3g} (tolerance {ATOL} + {RTOL}*|x|)"
        )
    return float(err.max()) if err.size else 0.0


def verify_onnx(
    model: VLAModel, onnx_dir: Path, *, seed: int = 1, sessions: Mapping[str, object] | None = None
) -> dict[str, float]:
    """Run torch and the three ONNX graphs on the same random inputs; returns max abs error per output."""
    onnx_dir = Path(onnx_dir)
    sessions = sessions or {k: make_session(onnx_dir / f) for k, f in ONNX_FILES.items()}
    ex = example_inputs(model, batch=3, seed=seed)  # another batch size and other lengths than the export
    model = model.eval()
    dev = model.log_std.device
    with torch.no_grad():
        tf = model.backbone.text_features(ex["input_ids"].to(dev), ex["attention_mask"].to(dev))
        proprio = ex["proprio"].to(dev) if "proprio" in ex else None
        latent = model.encode(ex["images"].to(dev), tf, proprio)
        mean, value = model.action_mean(latent).cpu(), model.value(latent).cpu()
        tf, latent = tf.cpu(), latent.cpu()
    errors: dict[str, float] = {}
    (o_tf,) = sessions["text"].run(  # type: ignore[attr-defined]
        None, {"input_ids": ex["input_ids"].numpy(), "attention_mask": ex["attention_mask"].numpy()}
    )
    errors["text_features"] = compare("text_features", o_tf, tf.numpy())
    feed = {"images": ex["images"].numpy(), "text_features": tf.numpy()}
    if "proprio" in ex:
        feed["proprio"] = ex["proprio"].numpy()
    (o_latent,) = sessions["encoder"].run(None, feed)  # type: ignore[attr-defined]
    errors["latent"] = compare("latent", o_latent, latent.numpy())
    o_mean, o_value, o_log_std = sessions["heads"].run(None, {"latent": latent.numpy()})  # type: ignore[attr-defined]
    errors["action_mean"] = compare("action_mean", o_mean, mean.numpy())
    errors["value"] = compare("value", o_value, value.numpy())
    want_log_std = np.broadcast_to(model.log_std.detach().cpu().numpy(), o_mean.shape)
    errors["log_std"] = compare("log_std", o_log_std, want_log_std)
    return errors


def verify_heads_onnx(model: VLAModel, heads_onnx: Path, seed: int = 1) -> dict[str, float]:
    """heads.onnx against the model's torch heads on random latents; max abs error per output."""
    session = make_session(Path(heads_onnx), 1)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(3, model.config.latent_dim, generator=g)
    model = model.eval()
    with torch.no_grad():
        z = latent.to(model.log_std.device)
        mean, value = model.action_mean(z).cpu().numpy(), model.value(z).cpu().numpy()
        log_std = np.broadcast_to(model.log_std.detach().cpu().numpy(), mean.shape)
    o_mean, o_value, o_log_std = session.run(None, {"latent": latent.numpy()})  # type: ignore[attr-defined]
    return {
        "action_mean": compare("action_mean", o_mean, mean),
        "value": compare("value", o_value, value),
        "log_std": compare("log_std", o_log_std, log_std),
    }
