"""SafetyLayer: property-based (hypothesis) checks of its guarantees under adversarial inputs and timing."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from irevla_ros.safety import (
    CommandStatus,
    SafetyConfigError,
    SafetyInvariantError,
    SafetyLayer,
    SafetyLimits,
    policy_gripper_to_opening,
)

EPS = 1e-9
REJECTED = {
    CommandStatus.REJECTED_NONFINITE,
    CommandStatus.REJECTED_SHAPE,
    CommandStatus.REJECTED_MAGNITUDE,
    CommandStatus.REJECTED_OUTSIDE_WORKSPACE,
}

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_limits(**overrides) -> SafetyLimits:
    values = dict(
        workspace_low=(-0.5, 0.4, 0.05),
        workspace_high=(0.5, 1.0, 0.5),
        home=(0.0, 0.6, 0.2),
        max_step=0.01,
        max_speed=0.05,
        gripper_min=0.1,
        gripper_max=0.9,
        watchdog_timeout=0.3,
        action_scale=0.02,
        max_abs_action=10.0,
        home_gripper=0.9,
    )
    values.update(overrides)
    return SafetyLimits(**values)


# ---- strategies --------------------------------------------------------------------------------------------

finite = st.floats(-1.5, 1.5, allow_nan=False)
wild = st.one_of(
    finite,
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 10.0, -10.0, 10.0000001, 1e6]),
    st.floats(allow_nan=True, allow_infinity=True),
)
good_action = st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4).map(np.array)
edge_action = st.lists(st.sampled_from([-1.0, 1.0, 0.0]), min_size=4, max_size=4).map(np.array)
bad_shape = st.one_of(
    st.lists(finite, min_size=0, max_size=3).map(np.array),
    st.lists(finite, min_size=5, max_size=8).map(np.array),
    st.just(np.zeros((2, 2))),
    st.just(None),
    st.just("left"),
    st.just([1.0, [2.0], 3.0, 4.0]),
)
action = st.one_of(
    good_action, good_action, edge_action, st.lists(wild, min_size=4, max_size=4).map(np.array), bad_shape
)
# Time advances: controller period, jitter, nothing, backwards, long gaps, nonsense.
time_step = st.one_of(
    st.just(0.1),
    st.floats(0.0, 0.2),
    st.floats(-5.0, 0.0),
    st.floats(0.3, 100.0),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)
# Where the measured arm is relative to the last target: tracking, lagging, far, garbage.
ee_mode = st.one_of(
    st.tuples(st.just("track"), st.just(0.0)),
    st.tuples(st.just("lag"), st.floats(0.0, 0.2)),
    st.tuples(st.just("random"), st.just(0.0)),
    st.tuples(st.just("nan"), st.just(0.0)),
)
op = st.one_of(
    st.tuples(st.just("command"), action, time_step, ee_mode),
    st.tuples(st.just("command"), good_action, st.just(0.1), ee_mode),
    st.tuples(st.just("toward"), st.lists(wild, min_size=3, max_size=3).map(np.array), time_step, ee_mode),
    st.tuples(st.just("home"), st.none(), time_step, ee_mode),
    st.tuples(st.just("estop"), st.none(), st.just(0.0), ee_mode),
    st.tuples(st.just("clear"), st.none(), st.just(0.0), ee_mode),
    st.tuples(st.just("reset"), st.none(), st.just(0.0), ee_mode),
    st.tuples(st.just("watchdog"), st.none(), time_step, ee_mode),
)


@st.composite
def limits_strategy(draw):
    low = np.array([draw(st.floats(-1.0, 0.5)) for _ in range(3)])
    size = np.array([draw(st.floats(0.02, 1.0)) for _ in range(3)])
    high = low + size
    home = low + size * np.array([draw(st.floats(0.0, 1.0)) for _ in range(3)])
    g_min = draw(st.floats(0.0, 0.5))
    g_max = draw(st.floats(g_min + 0.01, 1.0))
    max_step = draw(st.floats(0.001, 0.05))
    return SafetyLimits(
        workspace_low=tuple(low),
        workspace_high=tuple(high),
        home=tuple(np.clip(home, low, high)),
        max_step=max_step,
        max_speed=draw(st.floats(0.01, 1.0)),
        gripper_min=g_min,
        gripper_max=g_max,
        watchdog_timeout=draw(st.floats(0.05, 2.0)),
        action_scale=draw(st.floats(0.001, 0.1)),
        max_abs_action=draw(st.floats(1.0, 20.0)),
        home_gripper=g_max,
        max_lead=draw(st.one_of(st.none(), st.floats(max_step, 0.2))),
    )


# ---- the model the properties are checked against ----------------------------------------------------------


@dataclass
class Trace:
    """What an independent observer knows: the targets sent and when actions were accepted."""

    target: np.ndarray | None = None
    gripper: float | None = None
    last_accept: float | None = None
    estopped: bool = False


def in_box(x: np.ndarray, lim: SafetyLimits) -> bool:
    return bool(np.all(x >= lim.low - EPS) and np.all(x <= lim.high + EPS))


def measured_ee(mode, trace: Trace, lim: SafetyLimits, rng: np.random.Generator) -> np.ndarray:
    kind, amount = mode
    base = trace.target if trace.target is not None else np.array(lim.home)
    if kind == "track":
        return base.copy()
    if kind == "lag":
        direction = rng.normal(size=3)
        return base + amount * direction / np.linalg.norm(direction)
    if kind == "random":
        return rng.uniform(lim.low - 0.05, lim.high + 0.05)
    return np.array([math.nan, 0.0, 0.0])


def check(cmd, trace: Trace, lim: SafetyLimits, now: float, ee: np.ndarray, kind: str) -> None:
    # Everything returned lies in the box and the gripper range.
    if cmd.target is not None:
        assert cmd.target.shape == (3,) and in_box(cmd.target, lim), cmd
        assert cmd.gripper is not None and lim.gripper_min <= cmd.gripper <= lim.gripper_max, cmd
    else:
        assert cmd.gripper is None and trace.target is None, cmd
    assert isinstance(cmd.reason, str) and cmd.reason
    if trace.estopped:
        assert cmd.status is CommandStatus.ESTOP, cmd
    if cmd.is_hold:
        # A hold never moves: it repeats the last target (or asks for a backend hold when there is none).
        if trace.target is None:
            assert cmd.target is None
        else:
            np.testing.assert_array_equal(cmd.target, trace.target)
            assert cmd.gripper == trace.gripper
        return
    assert math.isfinite(now) and np.all(np.isfinite(ee)), (cmd, now, ee)
    if trace.target is None or trace.last_accept is None:
        # First command since start/reset: within max_step of the measured arm.
        assert np.linalg.norm(cmd.target - ee) <= lim.max_step + EPS, (cmd, ee)
    else:
        step = float(np.linalg.norm(cmd.target - trace.target))
        assert step <= lim.max_step + EPS, (cmd, trace)
        dt = max(0.0, now - trace.last_accept)
        assert step <= lim.max_speed * dt + EPS, (cmd, trace, now)
    trace.target = cmd.target.copy()
    trace.gripper = cmd.gripper
    trace.last_accept = now


@PROPERTY
@given(limits=limits_strategy(), ops=st.lists(op, min_size=1, max_size=40), seed=st.integers(0, 2**16))
def test_no_sequence_escapes_the_limits(limits, ops, seed):
    rng = np.random.default_rng(seed)
    layer = SafetyLayer(limits)
    trace = Trace()
    now = 0.0
    for kind, payload, dt, mode in ops:
        now = now + dt if math.isfinite(now) else 1.0  # recover from a nonsense clock for the next op
        ee = measured_ee(mode, trace, limits, rng)
        if kind == "command":
            cmd = layer.command(payload, now, ee)
            bad_input = not (
                isinstance(payload, np.ndarray)
                and payload.shape == (4,)
                and np.all(np.isfinite(payload))
                and np.all(np.abs(payload) <= limits.max_abs_action)
            )
            if bad_input and not trace.estopped:
                assert cmd.status in REJECTED, cmd
        elif kind == "toward":
            cmd = layer.command_toward(payload, now, ee)
        elif kind == "home":
            cmd = layer.command_home(now, ee)
        elif kind == "watchdog":
            cmd = layer.hold_target(now)
        elif kind == "estop":
            layer.estop("test e-stop")
            trace.estopped = True
            continue
        elif kind == "clear":
            layer.clear_estop()
            trace.estopped = False
            continue
        else:
            layer.reset()
            trace.target, trace.gripper, trace.last_accept = None, None, None
            continue
        check(cmd, trace, limits, now, ee, kind)


@PROPERTY
@given(
    actions=st.lists(st.tuples(good_action, st.floats(0.0, 0.5)), min_size=1, max_size=30),
    lag=st.floats(0.0, 0.3),
)
def test_a_lagging_arm_cannot_wind_the_target_up(actions, lag):
    # The arm never moves from where it started: targets must stay within the lead radius of it.
    limits = make_limits()
    layer = SafetyLayer(limits)
    arm = np.array(limits.home)
    now = 0.0
    for a, dt in actions:
        now += dt
        cmd = layer.command(a, now, arm)
        assert np.linalg.norm(cmd.target - arm) <= limits.lead_limit + EPS


@PROPERTY
@given(
    timeout=st.floats(0.05, 5.0),
    t0=st.floats(-1e4, 1e4),
    later=st.floats(0.0, 10.0),
    garbage=st.lists(st.floats(0.0, 10.0), max_size=5),
)
def test_watchdog_holds_within_its_deadline(timeout, t0, later, garbage):
    assume(abs(later - timeout) > 1e-6)  # exact ties are float rounding, not behaviour
    layer = SafetyLayer(make_limits(watchdog_timeout=timeout))
    assert not layer.check_watchdog(t0)  # nothing commanded yet: nothing to time out
    assert layer.command(np.zeros(4), t0, np.array(layer.limits.home)).moves
    # Garbage does not count as a sign of life.
    for g in garbage:
        layer.command(np.array([math.nan, 0, 0, 0]), t0 + g, np.array(layer.limits.home))
    expired = layer.check_watchdog(t0 + later)
    assert expired == (later >= timeout)
    if expired:
        hold = layer.hold_target(t0 + later)
        assert hold.status is CommandStatus.HOLD_WATCHDOG and hold.is_hold
        np.testing.assert_array_equal(hold.target, layer.last_target)
    # A fresh valid action re-arms the watchdog.
    layer.command(np.zeros(4), t0 + later, np.array(layer.limits.home))
    assert not layer.check_watchdog(t0 + later + 0.99 * timeout)
    assert layer.check_watchdog(t0 + later + 1.01 * timeout)


def test_watchdog_with_non_finite_time_holds():
    layer = SafetyLayer(make_limits())
    layer.command(np.zeros(4), 0.0, np.array(layer.limits.home))
    assert layer.check_watchdog(math.nan)


def test_estop_latches_until_cleared():
    limits = make_limits()
    layer = SafetyLayer(limits)
    home = np.array(limits.home)
    first = layer.command(np.array([1.0, 0, 0, -1]), 0.0, home)
    assert first.moves
    layer.estop("operator pressed stop")
    layer.estop("second reason is not the cause")
    for i in range(1, 20):
        cmd = layer.command(np.array([1.0, 1.0, 1.0, 1.0]), i * 0.1, home)
        assert cmd.status is CommandStatus.ESTOP
        assert "operator pressed stop" in cmd.reason
        np.testing.assert_array_equal(cmd.target, first.target)
    assert layer.command_home(2.0, home).status is CommandStatus.ESTOP
    assert layer.hold_target(2.0).status is CommandStatus.ESTOP
    layer.reset()  # a reset is not a way out of an e-stop
    assert layer.estopped
    layer.clear_estop()
    assert not layer.estopped and layer.estop_reason is None
    assert layer.command(np.array([1.0, 0, 0, -1]), 3.0, home).moves


def test_estop_before_any_command_asks_the_backend_to_hold():
    layer = SafetyLayer(make_limits())
    layer.estop("startup")
    cmd = layer.command(np.zeros(4), 0.0, np.array(layer.limits.home))
    assert cmd.status is CommandStatus.ESTOP and cmd.target is None and cmd.gripper is None


def test_normal_stream_moves_at_the_commanded_rate():
    limits = make_limits(max_step=0.01, max_speed=0.2, action_scale=0.005)
    layer = SafetyLayer(limits)
    ee = np.array(limits.home)
    for i in range(10):
        cmd = layer.command(np.array([1.0, 0.0, 0.0, 0.0]), i * 0.1, ee)
        assert cmd.status is CommandStatus.OK, cmd.reason
        ee = cmd.target
    np.testing.assert_allclose(ee, np.array(limits.home) + np.array([0.05, 0.0, 0.0]))


def test_step_and_speed_limits_clip_with_a_reason():
    limits = make_limits(max_step=0.01, max_speed=0.05, action_scale=0.1)
    layer = SafetyLayer(limits)
    home = np.array(limits.home)
    first = layer.command(np.array([1.0, 0.0, 0.0, 0.0]), 0.0, home)
    assert first.status is CommandStatus.CLIPPED and "max_step" in first.reason
    assert first.step == pytest.approx(0.01)
    second = layer.command(np.array([1.0, 0.0, 0.0, 0.0]), 0.1, first.target)
    assert second.step == pytest.approx(0.005) and "max_speed*dt" in second.reason
    backwards = layer.command(np.array([1.0, 0.0, 0.0, 0.0]), 0.05, second.target)
    assert backwards.step == 0.0 and "backwards" in backwards.reason
    np.testing.assert_array_equal(backwards.target, second.target)


def test_workspace_box_clips_the_target():
    # 1 m/s (the most max_speed may be) over 0.1 s per command allows 0.1 m: max_step binds, not the speed.
    limits = make_limits(max_step=0.05, max_speed=1.0, action_scale=0.05)
    layer = SafetyLayer(limits)
    ee = np.array(limits.home)
    for i in range(50):
        cmd = layer.command(np.array([0.0, 0.0, -1.0, 0.0]), i * 0.1, ee)
        ee = cmd.target
    assert ee[2] == pytest.approx(limits.workspace_low[2])
    assert cmd.status is CommandStatus.CLIPPED and "workspace box" in cmd.reason


def test_garbage_actions_hold_and_say_why():
    limits = make_limits()
    layer = SafetyLayer(limits)
    home = np.array(limits.home)
    before = layer.command(np.zeros(4), 0.0, home)
    cases = {
        CommandStatus.REJECTED_NONFINITE: [np.array([math.nan, 0, 0, 0]), np.array([0, 0, math.inf, 0])],
        CommandStatus.REJECTED_SHAPE: [np.zeros(3), np.zeros(7), "up", None, np.zeros((4, 1))],
        CommandStatus.REJECTED_MAGNITUDE: [np.array([0, 0, 0, 11.0]), np.array([-1e9, 0, 0, 0])],
    }
    for status, actions in cases.items():
        for a in actions:
            cmd = layer.command(a, 1.0, home)
            assert cmd.status is status, (a, cmd)
            assert cmd.is_hold and "action" in cmd.reason
            np.testing.assert_array_equal(cmd.target, before.target)
    clipped = layer.command(np.array([0, 0, 0, 5.0]), 2.0, home)
    assert clipped.status is CommandStatus.CLIPPED and "clipped to [-1, 1]" in clipped.reason
    assert clipped.gripper == limits.gripper_min
    bad_time = layer.command(np.zeros(4), math.nan, home)
    assert bad_time.status is CommandStatus.REJECTED_NONFINITE and "time" in bad_time.reason
    bad_arm = layer.command(np.zeros(4), 3.0, np.array([0, math.nan, 0]))
    assert bad_arm.status is CommandStatus.REJECTED_NONFINITE and "current_ee" in bad_arm.reason


def test_first_command_with_the_arm_outside_the_box_is_refused():
    limits = make_limits()
    layer = SafetyLayer(limits)
    outside = np.array(limits.workspace_high) + 0.1
    cmd = layer.command(np.zeros(4), 0.0, outside)
    assert cmd.status is CommandStatus.REJECTED_OUTSIDE_WORKSPACE and cmd.target is None
    # A hair outside (a reset pose on the boundary) is fine: the first target lands within max_step of it.
    barely = np.array(limits.workspace_high) + np.array([0.0, 0.0, 0.3 * limits.max_step])
    cmd = layer.command(np.array([0.0, 0.0, 1.0, 0.0]), 0.0, barely)
    assert cmd.moves and in_box(cmd.target, limits)
    assert np.linalg.norm(cmd.target - barely) <= limits.max_step + EPS


def test_gripper_mapping_follows_metaworld():
    limits = make_limits(gripper_min=0.1, gripper_max=0.9)
    assert policy_gripper_to_opening(-1.0, 0.1, 0.9) == pytest.approx(0.9)  # -1 opens
    assert policy_gripper_to_opening(1.0, 0.1, 0.9) == pytest.approx(0.1)  # +1 closes
    assert policy_gripper_to_opening(0.0, 0.1, 0.9) == pytest.approx(0.5)
    layer = SafetyLayer(limits)
    home = np.array(limits.home)
    assert layer.command(np.array([0, 0, 0, -1.0]), 0.0, home).gripper == pytest.approx(0.9)
    assert layer.command(np.array([0, 0, 0, 1.0]), 0.1, home).gripper == pytest.approx(0.1)


def test_command_home_is_rate_limited_and_arrives():
    limits = make_limits(max_step=0.01, max_speed=0.1)
    layer = SafetyLayer(limits)
    ee = np.array(limits.workspace_low) + 0.01
    now, steps = 0.0, 0
    prev = ee
    while True:
        cmd = layer.command_home(now, prev)
        assert np.linalg.norm(cmd.target - prev) <= limits.max_step + EPS
        assert cmd.gripper == limits.home_gripper
        if np.allclose(cmd.target, limits.home):
            break
        prev, now, steps = cmd.target, now + 0.1, steps + 1
        assert steps < 200
    distance = np.linalg.norm(np.array(limits.home) - ee)
    assert steps >= math.floor(distance / limits.max_step) - 1
    # command_toward clips an out-of-box goal into the box.
    far = layer.command_toward(np.array([100.0, 100.0, 100.0]), now + 100.0, cmd.target, gripper=2.0)
    assert far.status is CommandStatus.CLIPPED and in_box(far.target, limits)
    assert far.gripper == limits.gripper_max and "gripper" in far.reason


def test_invariant_check_is_live():
    layer = SafetyLayer(make_limits())
    inside = np.array(layer.limits.home)
    with pytest.raises(SafetyInvariantError, match="outside the box"):
        layer._verify(np.array(layer.limits.workspace_high) + 1.0, inside, 0.01, 0.5)
    with pytest.raises(SafetyInvariantError, match="step"):
        layer._verify(inside + 0.009, inside, 0.01, 0.5)
    with pytest.raises(SafetyInvariantError, match="gripper"):
        layer._verify(inside, inside, 0.01, 1.5)


# ---- configuration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workspace_low", (0.0, 0.0)),
        ("workspace_low", (0.0, math.nan, 0.0)),
        ("workspace_low", (0.6, 0.4, 0.05)),  # not below workspace_high on x
        ("workspace_high", "high"),
        ("home", (5.0, 0.6, 0.2)),
        ("max_step", 0.0),
        ("max_step", -0.01),
        ("max_speed", math.inf),
        ("watchdog_timeout", 0),
        ("action_scale", math.nan),
        ("max_abs_action", 0.5),
        ("gripper_min", 0.95),
        ("gripper_max", 1.5),
        ("home_gripper", 0.0),
        ("max_lead", 0.001),
        ("max_step", "fast"),
        ("max_speed", True),
    ],
)
def test_invalid_limits_name_the_field(field, value):
    with pytest.raises(SafetyConfigError) as info:
        make_limits(**{field: value})
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_from_dict_names_unknown_and_missing_keys():
    good = dict(
        workspace_low=[-0.5, 0.4, 0.05], workspace_high=[0.5, 1.0, 0.5], home=[0.0, 0.6, 0.2], max_step=0.02
    )
    limits = SafetyLimits.from_dict(good)
    assert limits.workspace_low == (-0.5, 0.4, 0.05) and limits.max_step == 0.02
    with pytest.raises(SafetyConfigError, match="max_stepp"):
        SafetyLimits.from_dict({**good, "max_stepp": 0.1})
    missing = dict(good)
    del missing["home"]
    with pytest.raises(SafetyConfigError, match="home"):
        SafetyLimits.from_dict(missing)


def test_limits_match_the_shipped_parameter_file():
    path = Path(__file__).resolve().parents[1] / "config" / "arm_controller.yaml"
    params = yaml.safe_load(path.read_text())["/arm_controller"]["ros__parameters"]
    names = {f.name for f in fields(SafetyLimits)}
    limits = SafetyLimits.from_dict({k: v for k, v in params.items() if k in names})
    assert in_box(np.array(limits.home), limits)


# ---- limits changed at run time (the arm controller's runtime parameters) -----------------------------------


def box_distance(x: np.ndarray, lim: SafetyLimits) -> float:
    return float(np.linalg.norm(x - np.clip(x, lim.low, lim.high)))


def test_a_shrunk_box_with_the_target_outside_is_reentered_at_most_max_step_per_command():
    limits = make_limits(max_step=0.01, max_speed=1.0, action_scale=0.02)
    layer = SafetyLayer(limits)
    ee = np.array(limits.home)
    for i in range(10):  # +y to 0.7
        ee = layer.command(np.array([0.0, 1.0, 0.0, 0.0]), i * 0.1, ee).target
    assert ee[1] == pytest.approx(0.7)
    # The new box ends 4.5 cm below the arm: projecting the last target in would be a 4.5 cm jump.
    smaller = make_limits(max_step=0.01, max_speed=1.0, action_scale=0.02, workspace_high=(0.5, 0.655, 0.5))
    old = layer.set_limits(smaller)
    assert old == limits and layer.limits == smaller
    distances = [box_distance(ee, smaller)]
    for i in range(10, 20):
        cmd = layer.command(np.array([0.0, 1.0, 0.0, 0.0]), i * 0.1, ee)  # the policy still pushes outward
        assert cmd.moves and cmd.step <= smaller.max_step + EPS, cmd
        distances.append(box_distance(cmd.target, smaller))
        ee = cmd.target
    assert distances[:6] == pytest.approx([0.045, 0.035, 0.025, 0.015, 0.005, 0.0])
    assert in_box(ee, smaller) and ee[1] == pytest.approx(0.655)


def test_new_limits_keep_the_estop_the_watchdog_and_the_step_budget():
    limits = make_limits(max_step=0.01, max_speed=1.0, action_scale=0.05, watchdog_timeout=0.3)
    layer = SafetyLayer(limits)
    ee = np.array(limits.home)
    ee = layer.command(np.array([1.0, 0.0, 0.0, 1.0]), 0.0, ee).target
    layer.set_limits(make_limits(max_step=0.002, max_speed=1.0, action_scale=0.05, watchdog_timeout=1.0))
    cmd = layer.command(np.array([1.0, 0.0, 0.0, 1.0]), 0.1, ee)
    assert cmd.step == pytest.approx(0.002) and "max_step" in cmd.reason  # from the next command on
    assert not layer.check_watchdog(0.1 + 0.5)  # the new timeout, from the same last valid action
    assert layer.check_watchdog(0.1 + 1.0)
    layer.estop("operator")
    layer.set_limits(limits)
    assert layer.estopped and layer.command(np.zeros(4), 1.2, ee).status is CommandStatus.ESTOP
    # A last gripper opening outside a narrower range is clipped into it (the gripper is not rate limited).
    layer.clear_estop()
    layer.set_limits(
        make_limits(max_step=0.01, max_speed=1.0, gripper_min=0.3, gripper_max=0.6, home_gripper=0.6)
    )
    toward = layer.command_toward(ee, 1.3, ee)
    assert toward.moves and toward.gripper == pytest.approx(0.3)


@PROPERTY
@given(
    sets=st.lists(limits_strategy(), min_size=2, max_size=5),
    ops=st.lists(st.tuples(st.integers(0, 4), good_action, st.floats(0.0, 0.2), ee_mode), max_size=40),
    seed=st.integers(0, 2**16),
)
def test_no_sequence_of_limit_changes_makes_a_command_jump(sets, ops, seed):
    rng = np.random.default_rng(seed)
    layer = SafetyLayer(sets[0])
    trace = Trace()
    now = 0.0
    for which, payload, dt, mode in ops:
        now += dt
        if which < len(sets) and rng.random() < 0.3:
            layer.set_limits(sets[which])
            continue
        lim = layer.limits
        ee = measured_ee(mode, trace, lim, rng)
        cmd = layer.command(payload, now, ee)
        if not cmd.moves:
            continue
        assert lim.gripper_min <= cmd.gripper <= lim.gripper_max, cmd
        if trace.target is None:
            assert np.linalg.norm(cmd.target - ee) <= lim.max_step + EPS and in_box(cmd.target, lim), cmd
        else:
            step = float(np.linalg.norm(cmd.target - trace.target))
            assert step <= lim.max_step + EPS and step <= lim.max_speed * (now - trace.last_accept) + EPS
            # Inside the box in force, or no further outside it than the last target was (a box shrunk since).
            assert box_distance(cmd.target, lim) <= box_distance(trace.target, lim) + EPS, cmd
        trace.target, trace.last_accept = cmd.target.copy(), now
