"""Arm backends, camera backends and policies are picked by name through one registry shape, and no node imports
a concrete backend or policy: each goes through its registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from irevla_ros.hardware.arm import ARMS, UnknownArmError
from irevla_ros.hardware.camera import CAMERAS, UnknownCameraKindError
from irevla_ros.policies import POLICIES, UnknownPolicyError
from irevla_ros.registry import Registry

NODES = Path(__file__).resolve().parents[1] / "irevla_ros" / "nodes"
# Interfaces and registries a node may import; everything else under these packages is an implementation.
ALLOWED = {
    "irevla_ros.hardware.arm",
    "irevla_ros.hardware.arm.ros_transport",  # the ServoTransport interface a node implements, no backend
    "irevla_ros.hardware.camera",
    "irevla_ros.policies",
    "irevla_ros.policies.base",
    "irevla_ros.policies.slot",
}


@pytest.mark.parametrize(
    ("registry", "error", "unknown", "message"),
    [
        (ARMS, UnknownArmError, "ur5e", "unknown arm kind 'ur5e'; known arm kinds: " + ", ".join(ARMS.names)),
        (CAMERAS, UnknownCameraKindError, "kinect", "unknown camera kind 'kinect'; known camera kinds: sim, opencv, realsense"),
        (POLICIES, UnknownPolicyError, "magic", "unknown policy 'magic'; known policies: scripted_expert, random, vla"),
    ],
)  # fmt: skip
def test_one_registry_shape_and_one_error_style(registry, error, unknown, message):
    assert isinstance(registry, Registry)
    with pytest.raises(error) as info:
        registry.make(unknown)
    assert str(info.value) == message and isinstance(info.value, ValueError)
    assert {"sim", "franky"} <= set(ARMS.names)
    # entries resolve to factories (importing the module, not calling it); hardware client libraries are optional
    for name in set(registry.names) & {"sim", "opencv", "scripted_expert", "random", "vla"}:
        assert callable(registry.factory(name)), name


def test_nodes_import_no_concrete_backend_or_policy():
    offenders = []
    for path in sorted(NODES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
                concrete = module.startswith(("irevla_ros.hardware.", "irevla_ros.policies.")) or module in (
                    "irevla_ros.hardware",
                )
                if concrete and module not in ALLOWED:
                    offenders.append(f"{path.name}: from {module} import ...")
    assert offenders == []
