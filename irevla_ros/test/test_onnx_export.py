"""ONNX export details that decide onnxruntime's speed: zero Pads folded into their Conv (exactly), other Pads
left alone, and EfficientNet-Lite's trunk kept in ORT's NCHWc layout from its first to its last convolution.
Real onnx graphs, run by real onnxruntime; the trunk is the real EfficientNetLite0 (random weights, small
images so the file runs in seconds)."""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from irevla_ros.vla.efficientnet_lite import EfficientNetLite0, SamePadConv2d
from irevla_ros.vla.latency import measure_runtimes
from irevla_ros.vla.onnx_export import (
    ATOL,
    OPSET,
    RTOL,
    fold_pads_in_file,
    fold_pads_into_convs,
    make_session,
)


def _ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph.node)


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray], tmp_path: Path, name: str) -> np.ndarray:
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return make_session(path, 1).run(None, feed)[0]  # type: ignore[attr-defined]


def _torch_export(module: torch.nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (x,),
            str(path),
            input_names=["x"],
            output_names=["y"],
            opset_version=OPSET,
            dynamo=False,
        )
    return onnx.load(str(path))


@pytest.mark.parametrize(("size", "kernel", "stride"), [(9, 3, 2), (8, 3, 2), (8, 5, 2), (7, 5, 1)])
def test_same_pad_conv_export_has_no_pad_and_matches_torch(size, kernel, stride, tmp_path):
    """torch's F.pad exports as Pad with pads from a chain of Constant nodes; the fold must evaluate that chain,
    including TensorFlow's asymmetric SAME padding (more at the bottom/right) of stride-2 convolutions."""
    torch.manual_seed(0)
    conv = SamePadConv2d(3, 4, kernel, stride, in_size=size)
    assert any(conv.same_pad)
    x = torch.randn(2, 3, size, size)
    model = _torch_export(conv, x, tmp_path / "conv.onnx")
    assert _ops(model)["Pad"] == 1
    before = _run(model, {"x": x.numpy()}, tmp_path, "before")
    assert fold_pads_into_convs(model) == 1
    onnx.checker.check_model(model)
    assert _ops(model)["Pad"] == 0 and _ops(model)["Constant"] == 0  # the pads' constant chain is gone too
    (conv_node,) = [n for n in model.graph.node if n.op_type == "Conv"]
    pads = list(helper.get_attribute_value(next(a for a in conv_node.attribute if a.name == "pads")))
    left, right, top, bottom = conv.same_pad  # F.pad order: last dim first
    assert pads == [top, left, bottom, right]
    after = _run(model, {"x": x.numpy()}, tmp_path, "after")
    with torch.no_grad():
        want = conv(x).numpy()
    np.testing.assert_allclose(after, want, rtol=RTOL, atol=ATOL)
    # Same arithmetic, only the padding moved into the Conv: equal up to float summation order.
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def test_fold_in_file_leaves_external_weights_in_their_side_file(tmp_path):
    """Large (hf) exports keep weights outside the .onnx file; the fold rewrites only the graph."""
    torch.manual_seed(0)
    conv = SamePadConv2d(3, 8, 3, 2, in_size=16)
    x = torch.randn(1, 3, 16, 16)
    model = _torch_export(conv, x, tmp_path / "export.onnx")
    path = tmp_path / "big" / "conv.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, location="conv.weights", size_threshold=0)
    weights = (path.parent / "conv.weights").read_bytes()
    assert fold_pads_in_file(path) == 1
    assert (path.parent / "conv.weights").read_bytes() == weights
    assert _ops(onnx.load(str(path), load_external_data=False))["Pad"] == 0
    with torch.no_grad():
        want = conv(x).numpy()
    got = make_session(path, 1).run(None, {"x": x.numpy()})[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert fold_pads_in_file(path) == 0  # nothing left to fold: the file is not rewritten


def _pad_conv_graph(
    pads: list[int], *, mode: str = "constant", fill: float | None = None, extra_output: bool = False
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.asarray(pads, dtype=np.int64), "pads"),
        numpy_helper.from_array(
            rng.standard_normal((4, 3 + pads[1] + pads[5], 3, 3)).astype(np.float32), "w"
        ),
    ]
    pad_inputs = ["x", "pads"]
    if fill is not None:
        inits.append(numpy_helper.from_array(np.asarray(fill, dtype=np.float32), "fill"))
        pad_inputs.append("fill")
    nodes = [
        helper.make_node("Pad", pad_inputs, ["p"], mode=mode),
        helper.make_node("Conv", ["p", "w"], ["y"], kernel_shape=[3, 3], pads=[0, 0, 0, 0], strides=[2, 2]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, list("nchw"))]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, list("nchw")))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@pytest.mark.parametrize(
    ("case", "pads", "kwargs", "folds"),
    [
        ("zero pads on H and W", [0, 0, 1, 0, 0, 0, 2, 1], {}, True),
        ("explicit zero fill", [0, 0, 1, 1, 0, 0, 1, 1], {"fill": 0.0}, True),
        ("non-zero fill", [0, 0, 1, 1, 0, 0, 1, 1], {"fill": 1.5}, False),
        ("reflect mode", [0, 0, 1, 1, 0, 0, 1, 1], {"mode": "reflect"}, False),
        ("pads the channels", [0, 1, 1, 1, 0, 0, 1, 1], {}, False),
        ("negative pads (a crop)", [0, 0, -1, 0, 0, 0, 1, 1], {}, False),
        ("padded tensor is also an output", [0, 0, 1, 1, 0, 0, 1, 1], {"extra_output": True}, False),
    ],
)
def test_fold_only_what_a_conv_can_express(case, pads, kwargs, folds, tmp_path):
    model = _pad_conv_graph(pads, **kwargs)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = _run(model, {"x": x}, tmp_path, "want")
    assert fold_pads_into_convs(model) == int(folds), case
    onnx.checker.check_model(model)
    assert _ops(model)["Pad"] == int(not folds)
    np.testing.assert_allclose(_run(model, {"x": x}, tmp_path, "got"), want, rtol=0, atol=1e-5)


def test_efficientnet_trunk_stays_in_one_layout_and_matches_torch(tmp_path):
    """Without the fold, ORT wraps each of the 17 Pads in ReorderOutput/ReorderInput (NCHWc -> NCHW -> NCHWc);
    with it, the trunk is converted once at its end (on CPUs without NCHWc kernels there are no reorders)."""
    torch.manual_seed(0)
    trunk = EfficientNetLite0(64)
    with (
        torch.no_grad()
    ):  # BatchNorm statistics that are not the identity, so folding BN into Conv is exercised
        for m in trunk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    model = _torch_export(trunk, x, tmp_path / "trunk.onnx")
    unfolded = _ops(model)["Pad"]
    assert unfolded == 17  # the stem and every depthwise convolution
    assert fold_pads_into_convs(model) == unfolded
    path = tmp_path / "trunk_folded.onnx"
    onnx.save(model, str(path))

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "trunk_ort.onnx")
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimised = _ops(onnx.load(str(tmp_path / "trunk_ort.onnx")))
    assert optimised["Pad"] == 0
    assert optimised["ReorderInput"] + optimised["ReorderOutput"] <= 1, optimised
    with torch.no_grad():
        want = trunk(x).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, rtol=RTOL, atol=ATOL)


class _SleepRuntime:
    """A stand-in runtime for the measuring loop only (named so): `act` sleeps a known time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0
        self.config = type("Config", (), {"proprio_dim": 4})()

    def act(self, images: dict, instruction: str, proprio: np.ndarray) -> None:
        import time

        assert set(images) == {"camera"} and images["camera"].shape == (24, 32, 3) and proprio.shape == (4,)
        self.calls += 1
        time.sleep(self.seconds)


def test_latency_runtimes_are_interleaved_and_timed():
    fast, slow = _SleepRuntime(0.001), _SleepRuntime(0.004)
    result = measure_runtimes({"fast": fast, "slow": slow}, ("camera",), 25, (24, 32))
    assert fast.calls == slow.calls == 25 + 20  # warm-up included
    assert result["fast"]["n"] == result["slow"]["n"] == 25
    assert 1.0 <= result["fast"]["p50_ms"] < result["slow"]["p50_ms"]
    assert result["slow"]["p50_ms"] >= 4.0
