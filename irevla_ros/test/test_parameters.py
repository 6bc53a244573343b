"""Node parameters are read once at start: a change at run time is refused with a reason, never reported as
applied and then ignored (real nodes, real DDS, the SetParameters service `ros2 param set` calls)."""

from __future__ import annotations

import pytest
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter as RclpyParameter

from irevla_ros.hardware.arm import make_arm
from irevla_ros.nodes.arm_controller_node import ArmControllerNode
from irevla_ros.nodes.common import declare_parameters
from irevla_ros.parameters import SCHEMAS
from irevla_ros.sim.cell import MetaWorldCell

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")


def _call(executor: SingleThreadedExecutor, client, request, spin) -> object:
    assert client.wait_for_service(timeout_sec=10.0), f"{client.srv_name} not available"
    future = client.call_async(request)
    assert spin(executor, future.done, timeout=10.0), f"{client.srv_name}: no answer"
    return future.result()


def test_ros2_param_set_on_the_arm_controller_is_refused_and_changes_nothing(ros_context, spin):
    cell = MetaWorldCell(tasks=("button-press-v3",), width=64, height=64, seed=0)
    # Start-up values (parameter files, `-p`) are overrides applied at declaration: read-only does not stop them.
    arm = ArmControllerNode(
        backend_factory=lambda params: make_arm("sim", cell=cell),
        context=ros_context,
        parameter_overrides=[RclpyParameter("max_speed", value=0.2)],
    )
    client_node = Node("param_client", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(arm)
    executor.add_node(client_node)
    try:
        before = arm.get_parameter("max_speed").value
        assert before == 0.2 == arm.safety.limits.max_speed
        set_client = client_node.create_client(SetParameters, "/arm_controller/set_parameters")
        request = SetParameters.Request(
            parameters=[
                Parameter(
                    name="max_speed",
                    value=ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=before / 2),
                )
            ]
        )
        response = _call(executor, set_client, request, spin)
        (result,) = response.results  # type: ignore[attr-defined]
        assert result.successful is False
        assert "read-only" in result.reason
        get_client = client_node.create_client(GetParameters, "/arm_controller/get_parameters")
        got = _call(executor, get_client, GetParameters.Request(names=["max_speed"]), spin)
        assert got.values[0].double_value == before  # type: ignore[attr-defined]
        assert arm.safety.limits.max_speed == before
    finally:
        executor.shutdown(timeout_sec=2.0)
        arm.close()
        arm.destroy_node()
        client_node.destroy_node()
        cell.close()


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_every_declared_parameter_is_read_only(ros_context, kind):
    node = Node(f"schema_{kind}", context=ros_context)
    try:
        declare_parameters(node, SCHEMAS[kind])
        names = [spec.name for spec in SCHEMAS[kind]]
        descriptors = node.describe_parameters(names)
        assert [d.read_only for d in descriptors] == [True] * len(names)
        results = node.set_parameters([node.get_parameter(name) for name in names])
        assert not any(r.successful for r in results)
    finally:
        node.destroy_node()
