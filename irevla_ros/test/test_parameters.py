"""A node parameter is read-only (a change at run time is refused with a reason) or a runtime one the node applies
(the arm controller's safety limits: re-validated, in force from the next command, logged); never reported as
applied and then ignored (real nodes, real DDS, the SetParameters service `ros2 param set` calls)."""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import numpy as np
import pytest
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import GetParameters, SetParameters, SetParametersAtomically
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter as RclpyParameter

from irevla_interfaces.msg import ArmCommand
from irevla_ros import topics
from irevla_ros.bringup.graph import collect_graph, validate_graph, with_overrides
from irevla_ros.cli import main
from irevla_ros.hardware.arm import make_arm
from irevla_ros.node_parameters import SCHEMAS
from irevla_ros.nodes.arm_controller_node import ArmControllerNode
from irevla_ros.nodes.common import declare_parameters
from irevla_ros.nodes.policy_node import PolicyNode
from irevla_ros.param_spec import ConfigError, check_settings, defaults, from_parameters, group, setting
from irevla_ros.safety import SafetyConfigError, SafetyLimits
from irevla_ros.sim.cell import MetaWorldCell
from irevla_ros.train.config import (
    IterationConfig,
    PPOConfig,
    PPOConfigError,
    SACfDConfig,
    SACfDConfigError,
    SFTConfig,
    Stage1Config,
)
from irevla_ros.train.rollout import RolloutSettings

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
def test_every_parameter_is_read_only_or_runtime_with_a_callback_that_applies_it(ros_context, kind):
    specs = SCHEMAS[kind]
    runtime = [spec.name for spec in specs if spec.runtime]
    node = Node(f"schema_{kind}", context=ros_context)
    try:
        if runtime:
            # A runtime parameter without the node's callback would be accepted and ignored: refused at declaration.
            with pytest.raises(TypeError, match=r"runtime parameters \[.*\] need an `apply` callback"):
                declare_parameters(node, specs)
            assert set(runtime) == set(RUNTIME_CHANGES), "a runtime parameter the node test does not apply"
            return  # what the callback does: test_each_runtime_parameter_is_applied_by_the_arm_controller
        declare_parameters(node, specs)
        names = [spec.name for spec in specs]
        assert [d.read_only for d in node.describe_parameters(names)] == [True] * len(names)
        results = node.set_parameters([node.get_parameter(name) for name in names])
        assert all(not r.successful and "read-only" in r.reason for r in results)
    finally:
        node.destroy_node()


# A valid new value for each runtime parameter of the arm controller, in an order each is valid in (home_gripper
# before gripper_max shrinks below its default).
RUNTIME_CHANGES: dict[str, object] = {
    "workspace_low": [-0.5, 0.35, -0.05],
    "workspace_high": [0.5, 1.0, 0.6],
    "home": [0.0, 0.62, 0.25],
    "max_step": 0.005,
    "home_gripper": 0.8,
    "gripper_min": 0.1,
    "gripper_max": 0.9,
    "watchdog_timeout": 0.5,
    "max_abs_action": 5.0,
}


class ArmUnderTest:
    """A real ArmControllerNode on the sim backend (its time: the cell's), a client node, one executor."""

    def __init__(self, ros_context, spin, overrides=()) -> None:
        self.cell = MetaWorldCell(tasks=("button-press-v3",), width=64, height=64, seed=0)
        self.cell.reset("button-press-v3", seed=0)
        self.arm = ArmControllerNode(
            backend_factory=lambda params: make_arm("sim", cell=self.cell),
            context=ros_context,
            time_source=lambda: self.cell.sim_time,
            parameter_overrides=[RclpyParameter(n, value=v) for n, v in overrides],
        )
        self.client = Node("param_client", context=ros_context)
        self.executor = SingleThreadedExecutor(context=ros_context)
        self.executor.add_node(self.arm)
        self.executor.add_node(self.client)
        self.spin = spin
        self._set = self.client.create_client(SetParameters, "/arm_controller/set_parameters")
        self._set_atomic = self.client.create_client(
            SetParametersAtomically, "/arm_controller/set_parameters_atomically"
        )
        self._get = self.client.create_client(GetParameters, "/arm_controller/get_parameters")
        self._action = self.client.create_publisher(ArmCommand, topics.ACTION, 10)

    def set(self, name: str, value: object):
        """What `ros2 param set /arm_controller NAME VALUE` sends; returns the one result."""
        msg = RclpyParameter(name, value=value).to_parameter_msg()
        (result,) = _call(
            self.executor, self._set, SetParameters.Request(parameters=[msg]), self.spin
        ).results
        return result

    def set_atomically(self, values: dict[str, object]):
        msgs = [RclpyParameter(n, value=v).to_parameter_msg() for n, v in values.items()]
        request = SetParametersAtomically.Request(parameters=msgs)
        return _call(self.executor, self._set_atomic, request, self.spin).result

    def get(self, name: str) -> object:
        (value,) = _call(self.executor, self._get, GetParameters.Request(names=[name]), self.spin).values
        got = RclpyParameter.from_parameter_msg(Parameter(name=name, value=value)).value
        return list(got) if isinstance(got, array.array) else got

    def command(self, delta: list[float]) -> float:
        """Publish one action over DDS, wait until the node sent it to the arm; the step of the target (m)."""
        before = self.arm.safety.last_target
        sent = self.arm.commands_sent
        self._action.publish(ArmCommand(ee_delta=delta, gripper=-1.0, episode_id="param-test"))
        assert self.spin(self.executor, lambda: self.arm.commands_sent > sent, timeout=10.0), "not sent"
        after = self.arm.safety.last_target
        assert after is not None
        return 0.0 if before is None else float(np.linalg.norm(after - before))

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.arm.close()
        self.arm.destroy_node()
        self.client.destroy_node()
        self.cell.close()


@pytest.fixture
def arm_under_test(ros_context, spin):
    # max_speed (read-only) at its maximum: over the cell's 12.5 ms step it allows 12.5 mm, so max_step binds.
    under_test = ArmUnderTest(ros_context, spin, overrides=[("max_speed", 1.0)])
    yield under_test
    under_test.close()


def test_ros2_param_set_lowering_max_step_holds_from_the_next_command_and_is_logged(arm_under_test, capfd):
    t = arm_under_test
    steps = [t.command([1.0, 1.0, 0.0]) for _ in range(4)]
    assert steps[1:] == pytest.approx([0.01] * 3)  # the default max_step binds (|delta| = 14 mm)
    result = t.set("max_step", 0.002)
    assert result.successful, result.reason
    assert t.arm.safety.limits.max_step == 0.002 == t.get("max_step") == t.arm.params["max_step"]
    after = [t.command([1.0, 1.0, 0.0]) for _ in range(4)]
    assert all(0.0 < step <= 0.002 + 1e-9 for step in after), after
    assert "safety limits changed at run time: max_step 0.01 -> 0.002" in capfd.readouterr().err


def test_an_invalid_limit_set_is_refused_with_the_reason_and_the_old_limits_hold(arm_under_test, capfd):
    t = arm_under_test
    before = t.arm.safety.limits
    refused = [
        # rclpy's own check of the declared range (the descriptor) comes first ...
        ("max_step", -0.01, "max_step"),
        # ... then the whole set, built as SafetyLimits: each value against the others in force.
        (
            "workspace_low",
            [0.6, 0.348, -0.0525],
            "workspace_low[0]=0.6 must be below workspace_high[0]=0.525",
        ),
        (
            "workspace_high",
            [0.525, 0.5, 0.7],
            "home=[0.0, 0.6, 0.2] lies outside the workspace box on axes [1]",
        ),
        ("gripper_max", 0.5, "home_gripper=1.0 must lie in [0.0, 0.5]"),
        ("workspace_low", [0.0, 0.5], "workspace_low must be 3 numbers"),
    ]
    for name, value, reason in refused:
        result = t.set(name, value)
        assert not result.successful and reason in result.reason, (name, value, result.reason)
        assert t.arm.safety.limits == before and t.get(name) == t.arm.params[name]
    assert t.get("workspace_high") == list(before.workspace_high)
    # Read-only ones stay refused by rclpy, before any callback.
    result = t.set("backend", "franky")
    assert not result.successful and "read-only" in result.reason
    assert t.get("backend") == "sim"
    # The old limits are in force: steps of the old max_step, inside the old box.
    steps = [t.command([1.0, 1.0, 0.0]) for _ in range(3)]
    assert steps[1:] == pytest.approx([before.max_step] * 2)
    # Refused alone, valid together: an atomic set is validated as one (a smaller box and a home inside it).
    result = t.set_atomically({"workspace_high": [0.525, 0.7, 0.7], "home": [0.0, 0.55, 0.2]})
    assert result.successful, result.reason
    assert t.arm.safety.limits.workspace_high == (0.525, 0.7, 0.7) and t.arm.safety.limits.home == (
        0.0,
        0.55,
        0.2,
    )
    assert "changed at run time" in capfd.readouterr().err


def test_each_runtime_parameter_is_applied_by_the_arm_controller(arm_under_test):
    t = arm_under_test
    for name, value in RUNTIME_CHANGES.items():
        result = t.set(name, value)
        assert result.successful, (name, result.reason)
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(t.arm.safety.limits, name) == expected, name
        assert t.get(name) == value
    # A smaller box with the arm outside it: the arm moves back at most max_step per command, never jumps.
    for _ in range(12):
        t.command([0.0, 0.0, 1.0])
    target = t.arm.safety.last_target
    assert target is not None
    top = float(target[2]) - 0.02  # 4 steps of the new max_step below the last target
    home = [0.0, 0.62, top - 0.01]
    assert t.set_atomically({"workspace_high": [0.5, 1.0, top], "home": home}).successful
    steps = [t.command([0.0, 0.0, 1.0]) for _ in range(6)]  # the policy still pushes up
    assert all(0.0 < step <= 0.005 + 1e-9 for step in steps[:4]), steps
    final = t.arm.safety.last_target
    assert final is not None and final[2] == pytest.approx(top)


# ---- one source per setting: the config dataclasses -------------------------------------------------------------


def test_a_node_without_parameter_files_runs_the_dataclass_defaults():
    trainer = from_parameters(IterationConfig, defaults(SCHEMAS["trainer"]))
    assert trainer == IterationConfig()
    assert trainer.stage1 == Stage1Config() and trainer.stage2 == SFTConfig()
    arm = from_parameters(SafetyLimits, defaults(SCHEMAS["arm_controller"]))
    assert arm == SafetyLimits(**box_of_sim())  # every other limit: the dataclass default


def arm_default(name: str) -> object:
    (spec,) = [s for s in SCHEMAS["arm_controller"] if s.name == name]
    return tuple(spec.default)  # type: ignore[arg-type]


def test_every_config_field_is_a_documented_parameter_with_its_default():
    specs = {s.name: s for s in SCHEMAS["trainer"]}
    for name, default in (
        ("stage1.ppo.lr", PPOConfig().lr),
        ("stage1.sacfd.critic_lr", SACfDConfig().critic_lr),
        ("stage1.episodes_per_update", Stage1Config().episodes_per_update),
        ("stage1.push_every_episodes", Stage1Config().push_every_episodes),
        ("stage2.steps", SFTConfig().steps),
    ):
        assert specs[name].default == default and specs[name].description
    arm = {s.name: s for s in SCHEMAS["arm_controller"]}
    assert arm["max_speed"].default == SafetyLimits(**box_of_sim()).max_speed
    assert arm["watchdog_timeout"].default == SafetyLimits(**box_of_sim()).watchdog_timeout


def box_of_sim() -> dict[str, object]:
    return {name: arm_default(name) for name in ("workspace_low", "workspace_high", "home")}


def test_parameters_reach_the_configs_the_trainer_and_the_arm_build():
    values = {
        **defaults(SCHEMAS["trainer"]),
        "stage1.ppo.lr": 1e-3,
        "stage2.steps": 7,
        "stage1.algorithm": "sacfd",
    }
    config = from_parameters(IterationConfig, values)
    assert config.stage1.ppo.lr == 1e-3 and config.stage2.steps == 7 and config.stage1.algorithm == "sacfd"
    assert config.validation_tasks == tuple(defaults(SCHEMAS["trainer"])["validation_tasks"])  # type: ignore[arg-type]
    limits = from_parameters(SafetyLimits, {**defaults(SCHEMAS["arm_controller"]), "max_speed": 0.05})
    assert limits.max_speed == 0.05 and limits.workspace_low == arm_default("workspace_low")


def test_dotted_parameters_are_set_and_checked_from_the_command_line(capsys):
    assert main(["check-config", "--set", "/trainer.stage1.ppo.lr=0.001"]) == 0
    out = capsys.readouterr().out
    assert "stage1.ppo.lr: 0.001" in out
    assert main(["check-config", "--set", "/trainer.stage1.ppo.gamma=2"]) == 2
    assert "/trainer.ros__parameters.stage1.ppo.gamma: 2.0 is above the maximum" in capsys.readouterr().err


# ---- one control period for the whole graph ----------------------------------------------------------------------


def test_one_control_period_reaches_every_node_and_the_rollout(tmp_path):
    effective = validate_graph(with_overrides(collect_graph("sim"), ["/**.control_period=0.05"], tmp_path))
    assert {values["control_period"] for values in effective.values()} == {0.05}
    assert RolloutSettings.from_graph(overrides=["/**.control_period=0.05"]).control_period == 0.05


def test_a_control_period_for_one_node_alone_is_refused(tmp_path):
    with pytest.raises(
        ConfigError, match=r"control_period is one setting of the whole graph.*/policy: 0\.05"
    ):
        validate_graph(with_overrides(collect_graph("sim"), ["/policy.control_period=0.05"], tmp_path))


def test_the_policy_ticks_once_per_control_period(ros_context):
    node = PolicyNode(context=ros_context, parameter_overrides=[RclpyParameter("control_period", value=0.05)])
    try:
        assert node.period == 0.05
    finally:
        node.destroy_node()


def test_check_config_builds_the_configs_so_inconsistent_values_fail_before_start(capsys):
    # Each value is in its own range; together they are not (the arm would refuse to start).
    assert main(["check-config", "--set", "/arm_controller.home=[0.0, 0.6, 0.8]"]) == 2
    assert "/arm_controller: home=[0.0, 0.6, 0.8] lies outside the workspace box on axes [2]" in (
        capsys.readouterr().err
    )
    # (tau=0.0, once the example here, is out of its own range now: its strict bound is in its field.)
    assert main(["check-config", "--set", "/arm_controller.gripper_min=1.0"]) == 2
    assert "/arm_controller: gripper_min=1.0 must be below gripper_max=1.0" in capsys.readouterr().err


# ---- one declaration per range: the dataclass and the parameter check read the same field ------------------------


def test_a_strict_bound_is_refused_by_the_dataclass_the_parameter_files_and_the_node(capsys, ros_context):
    with pytest.raises(
        PPOConfigError, match=r"^PPO lr 0\.0 is not above the exclusive minimum 0\.0 \(PPOConfig\.lr\)$"
    ):
        PPOConfig(lr=0.0)
    with pytest.raises(SACfDConfigError, match=r"tau 0\.0 is not above the exclusive minimum 0\.0"):
        SACfDConfig(tau=0)
    # The parameter check refuses it with the file's key named, before any config is built.
    assert main(["check-config", "--set", "/trainer.stage1.ppo.lr=0.0"]) == 2
    err = capsys.readouterr().err
    assert "/trainer.ros__parameters.stage1.ppo.lr: 0.0 is not above the exclusive minimum 0.0" in err
    assert main(["check-config", "--set", "/trainer.stage1.sacfd.tau=0.0"]) == 2
    assert "stage1.sacfd.tau: 0.0 is not above the exclusive minimum 0.0" in capsys.readouterr().err
    assert main(["check-config", "--set", "/trainer.stage1.ppo.lr=0.0001"]) == 0
    capsys.readouterr()
    # A node: the descriptor's range is inclusive (ROS has no other), the check at declaration refuses the bound.
    node = Node(
        "strict", context=ros_context, parameter_overrides=[RclpyParameter("stage1.ppo.lr", value=0.0)]
    )
    try:
        with pytest.raises(
            ConfigError, match=r"parameter stage1\.ppo\.lr: 0\.0 is not above the exclusive minimum"
        ):
            declare_parameters(node, SCHEMAS["trainer"])
        (descriptor,) = node.describe_parameters(["stage1.ppo.lr"])
        assert descriptor.floating_point_range[0].from_value == 0.0
        assert descriptor.additional_constraints == "greater than 0.0"
    finally:
        node.destroy_node()


def test_a_range_declared_only_in_the_field_is_enforced_by_the_dataclass():
    # No __post_init__ line names these fields: only their declarations (setting(..., max=1.0)) hold the range.
    with pytest.raises(
        ValueError,
        match=r"^iteration plateau_delta 1\.5 is above the maximum 1\.0 \(IterationConfig\.plateau_delta\)$",
    ):
        IterationConfig(plateau_delta=1.5)
    with pytest.raises(
        SafetyConfigError, match=r"max_speed 5\.0 is above the maximum 1\.0 \(SafetyLimits\.max_speed\)"
    ):
        SafetyLimits(**box_of_sim(), max_speed=5.0)


class ProbeError(ValueError):
    pass


@dataclass(frozen=True)
class Probe:
    count: int = setting(1, "a count", min=1, max=3)
    rate: float = setting(0.5, "a rate", min=0.0, min_exclusive=True)
    names: tuple[str, ...] = setting(("a",), "names", choices=("a", "b"))
    sub: SFTConfig = group(SFTConfig, "a nested config")

    def __post_init__(self) -> None:
        check_settings(self, ProbeError, "probe")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"count": 4}, r"probe count 4 is above the maximum 3 \(Probe\.count\)"),
        ({"count": 0}, r"probe count 0 is below the minimum 1"),
        ({"count": True}, r"probe count expected integer, got bool \(True\)"),
        ({"count": 2.0}, r"probe count expected integer, got double"),
        ({"rate": 0}, r"probe rate 0\.0 is not above the exclusive minimum 0\.0"),
        ({"rate": math.inf}, r"probe rate inf is not a finite number"),
        ({"rate": "fast"}, r"probe rate expected double, got string"),
        ({"names": ("a", "c")}, r"probe names 'c' is not one of a, b \(Probe\.names\)"),
        ({"names": ("a", 1)}, r"probe names expected string\[\]"),
        ({"sub": {"steps": 3}}, r"probe sub: expected SFTConfig, got dict"),
    ],
)
def test_check_settings_checks_every_field_from_its_declaration(overrides, message):
    with pytest.raises(ProbeError, match=message):
        Probe(**overrides)


def test_check_settings_stores_each_value_as_its_declared_type():
    probe = Probe(count=np.int64(2), rate=2, names=["b"])
    assert (probe.count, probe.rate, probe.names) == (2, 2.0, ("b",))
    assert (type(probe.count), type(probe.rate), type(probe.names)) == (int, float, tuple)
    assert type(PPOConfig(lr=1).lr) is float and SFTConfig(steps=np.int64(5)).steps == 5
