"""What every node adapter shares: parameter declaration from the schema table, message conversions,
QoS profiles, and a `run_nodes` main loop that shuts down cleanly on Ctrl-C and SIGTERM."""

from __future__ import annotations

import array
import faulthandler
import functools
import gc
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time as TimeMsg
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.clock import Clock as RosClock
from rclpy.clock import ClockType
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.subscription import Subscription
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image

from irevla_interfaces.msg import EpisodeEvent
from irevla_ros import topics
from irevla_ros.dds_profile import use_default_profile
from irevla_ros.param_spec import ConfigError, ParamSpec, ParamValue

# REP-2003: sensor drivers (the cameras, the overlay image) publish reliable, keep-last: every subscriber can
# connect (a reliable one, RViz's default, gets nothing from a best-effort publisher) and a keep-last writer never
# waits for a slow reader. Consumers subscribe with SENSOR_QOS (best-effort): only the newest frames, no repairs.
DRIVER_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
SENSOR_QOS = qos_profile_sensor_data
# Step records and episode events must not be dropped: reliable, deep queue.
RELIABLE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1000, reliability=ReliabilityPolicy.RELIABLE)
# Latest state for late joiners (active version, session status).
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


# Applies a change of runtime parameters: (every parameter's value with the change, the changed ones). Raises
# ValueError (ConfigError, SafetyConfigError, ...) to refuse the change, its message the reason.
ApplyParameters = Callable[[Mapping[str, ParamValue], Mapping[str, ParamValue]], None]


def declare_parameters(
    node: Node, specs: Sequence[ParamSpec], apply: ApplyParameters | None = None
) -> dict[str, ParamValue]:
    """Declare `specs` with descriptors (description, ranges) and return their validated values.

    A parameter is read-only unless its spec says `runtime`: most are read once, at construction, so a change at
    run time (`ros2 param set`) would be reported as applied and change nothing; rclpy refuses it instead, with a
    reason. Values still come from parameter files and `--ros-args -p` (overrides apply at declaration). A change
    of runtime parameters (one SetParameters entry, or an atomic set of several) is checked against their specs
    and handed to `apply`, which must put it into effect or raise to refuse it with the reason: only then is it
    stored, and the returned dict (the node's values) updated. A node with runtime parameters must pass `apply`."""
    runtime = {spec.name: spec for spec in specs if spec.runtime}
    if runtime and apply is None:
        raise TypeError(f"{node.get_name()}: runtime parameters {sorted(runtime)} need an `apply` callback")
    values: dict[str, ParamValue] = {}
    for spec in specs:
        descriptor = ParameterDescriptor(description=spec.description, read_only=not spec.runtime)
        if spec.choices:
            descriptor.additional_constraints = "one of: " + ", ".join(spec.choices)
        if spec.min_exclusive:
            # ROS ranges are inclusive: the range below admits `min`, spec.check (after declaring) refuses it.
            descriptor.additional_constraints = f"greater than {spec.min}"
        if isinstance(spec.default, float) and (spec.min is not None or spec.max is not None):
            descriptor.floating_point_range = [
                FloatingPointRange(
                    from_value=float(spec.min if spec.min is not None else -sys.float_info.max),
                    to_value=float(spec.max if spec.max is not None else sys.float_info.max),
                )
            ]
        elif (
            isinstance(spec.default, int)
            and not isinstance(spec.default, bool)
            and (spec.min is not None or spec.max is not None)
        ):
            descriptor.integer_range = [
                IntegerRange(
                    from_value=int(spec.min if spec.min is not None else -(2**63)),
                    to_value=int(spec.max if spec.max is not None else 2**63 - 1),
                )
            ]
        try:
            param = node.declare_parameter(spec.name, spec.default, descriptor)
        except Exception as exc:  # InvalidParameterValueException, type mismatch from an override
            raise ConfigError(f"{node.get_fully_qualified_name()}: parameter {spec.name}: {exc}") from exc
        where = f"{node.get_fully_qualified_name()}: parameter {spec.name}"
        values[spec.name] = spec.check(param.value, where)
    if runtime:
        assert apply is not None
        # Registered after declaring: rclpy runs these callbacks on declaration too.
        node.add_on_set_parameters_callback(functools.partial(_on_set, runtime, values, apply))
    return values


def _on_set(
    runtime: Mapping[str, ParamSpec],
    values: dict[str, ParamValue],
    apply: ApplyParameters,
    parameters: list[Parameter],
) -> SetParametersResult:
    """rclpy's on-set callback: rclpy has refused read-only parameters and wrong types before calling it."""
    changed: dict[str, ParamValue] = {}
    for param in parameters:
        spec = runtime.get(param.name)
        if spec is None:  # a built-in one (use_sim_time): rclpy's own
            continue
        value = param.value
        converted, problem = spec.convert(list(value) if isinstance(value, (tuple, array.array)) else value)
        if problem is not None:
            return SetParametersResult(successful=False, reason=f"{param.name}: {problem}")
        changed[param.name] = converted
    if not changed:
        return SetParametersResult(successful=True)
    try:
        apply({**values, **changed}, changed)
    except ValueError as exc:
        return SetParametersResult(successful=False, reason=str(exc))
    values.update(changed)
    return SetParametersResult(successful=True)


def to_time_msg(seconds: float) -> TimeMsg:
    sec = int(np.floor(seconds))
    return TimeMsg(sec=sec, nanosec=round((seconds - sec) * 1e9) % 1_000_000_000)


def time_to_ns(stamp: TimeMsg) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def image_to_msg(array: np.ndarray, stamp: TimeMsg, frame_id: str, encoding: str = "rgb8") -> Image:
    array = np.ascontiguousarray(array)
    msg = Image()
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(array.strides[0])
    msg.data = array.tobytes()
    return msg


_CHANNELS = {"rgb8": (3, np.uint8), "bgr8": (3, np.uint8), "mono8": (1, np.uint8), "16UC1": (1, np.uint16)}


class ImageFormatError(ValueError):
    pass


def msg_to_image(msg: Image) -> np.ndarray:
    """Decode a sensor_msgs/Image into an HxWxC (or HxW) array; malformed messages raise ImageFormatError."""
    if msg.encoding not in _CHANNELS:
        raise ImageFormatError(f"unsupported encoding {msg.encoding!r} (supported: {', '.join(_CHANNELS)})")
    channels, dtype = _CHANNELS[msg.encoding]
    itemsize = np.dtype(dtype).itemsize
    if msg.height == 0 or msg.width == 0:
        raise ImageFormatError("empty image (0 pixels)")
    if msg.step < msg.width * channels * itemsize:
        raise ImageFormatError(f"step {msg.step} too small for width {msg.width} x {channels} channels")
    expected = msg.step * msg.height
    if len(msg.data) != expected:
        raise ImageFormatError(f"data has {len(msg.data)} bytes, expected step*height = {expected}")
    flat = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)
    rows = flat[:, : msg.width * channels * itemsize].copy().view(dtype)
    image = (
        rows.reshape(msg.height, msg.width, channels) if channels > 1 else rows.reshape(msg.height, msg.width)
    )
    if msg.encoding == "bgr8":
        image = image[..., ::-1].copy()
    return image


class RosTimePeriodic:
    """Call `callback` once per `period` of ROS time, robot and simulation alike.

    On wall time this is an ordinary timer. Under `use_sim_time` it is driven by /clock itself: each clock message
    that crosses the next period boundary runs the callback at once, in the node's own callback group. (rclpy
    timers on simulated time were seen firing up to seconds late in wall time; a control loop in lock-step with
    the simulator cannot wait that long.)
    """

    def __init__(
        self, node: Node, period: float, callback: Callable[[], Any], callback_group: Any = None
    ) -> None:
        self.period_ns = round(period * 1e9)
        self._callback = callback
        self._next_ns: int | None = None
        self._node = node
        self._clock_ns: int | None = None
        if node.get_parameter("use_sim_time").value:
            node.create_subscription(Clock, "/clock", self._on_clock, 10, callback_group=callback_group)
        else:
            node.create_timer(period, callback, callback_group=callback_group)

    def now_ns(self) -> int:
        """ROS time of the call in progress (ns): the /clock message that triggered it in simulation (the node's
        own clock may not have seen that message yet: stamping with it gave a tick the previous period's time),
        the node clock otherwise."""
        if self._clock_ns is not None:
            return self._clock_ns
        return self._node.get_clock().now().nanoseconds

    def now(self) -> float:
        """`now_ns` in seconds."""
        return self.now_ns() * 1e-9

    def _on_clock(self, msg: Clock) -> None:
        now = time_to_ns(msg.clock)
        self._clock_ns = now
        if self._next_ns is None or now < self._next_ns - 10 * self.period_ns:  # first message, or time reset
            self._next_ns = now
        if now >= self._next_ns - self.period_ns // 100:  # a clock a hair early still is this period's tick
            # Like a timer: one call however many periods passed, next due on the period grid after now.
            self._next_ns += ((now - self._next_ns) // self.period_ns + 1) * self.period_ns
            self._callback()


def subscriber_nodes(node: Node, topic: str) -> set[str]:
    """Fully qualified names of the nodes whose subscriptions to `topic` `node` has discovered."""
    return {
        f"{info.node_namespace.rstrip('/')}/{info.node_name}"
        for info in node.get_subscriptions_info_by_topic(topic)
    }


def listen_to_episodes_once_connected(
    node: Node,
    inputs: Sequence[Subscription],
    callback: Callable[[Any], None],
    callback_group: Any = None,
    outputs: Sequence[Publisher] = (),
) -> None:
    """Subscribe `node` to the episode events once each of `inputs` has a connected publisher (and each of
    `outputs` a connected subscriber). The sequences are read at each check: items added later count too.

    The episode manager starts a session once its required nodes listen to the episode events. A node that records
    or carries out another node's messages during an episode (the trainer the policy's step records, the arm
    controller its actions) is ready only when it is connected to that producer: listening earlier lets a session
    start while the first steps still have nowhere to go (seen under load: the trainer, which had discovered the
    episode manager but not yet the policy, stored the first episode with no steps). Checked on wall time: a paused
    simulated clock must not hold it back."""
    since = time.monotonic()

    def check() -> None:
        waiting = [s.topic_name for s in inputs if s.get_publisher_count() == 0] + [
            p.topic_name for p in outputs if p.get_subscription_count() == 0
        ]
        if waiting:
            if time.monotonic() - since > 10.0:
                node.get_logger().info(
                    f"not listening to {topics.EPISODE_EVENTS} yet (no session starts without this node): "
                    f"not connected on {waiting}",
                    throttle_duration_sec=30.0,
                )
            return
        timer.cancel()
        node.destroy_timer(timer)
        node.create_subscription(
            EpisodeEvent, topics.EPISODE_EVENTS, callback, RELIABLE_QOS, callback_group=callback_group
        )

    steady = RosClock(clock_type=ClockType.STEADY_TIME)
    timer = node.create_timer(0.05, check, callback_group=callback_group, clock=steady)


_stop_signals: list[int] = []  # SIGINT/SIGTERM received by this process (run_nodes' handler)


def _stop_without_keyboard_interrupt() -> None:
    """Make SIGINT and SIGTERM only stop the executor, never raise in Python code.

    rclpy's signal handler (installed by `rclpy.init`) shuts the contexts down, which ends `spin`, and then calls
    the handler that was there before it. Python's default SIGINT handler raises KeyboardInterrupt at whatever
    bytecode the main thread is running; when that is inside rclpy's message conversion (Python code called
    from `take_message`), pybind11 reports it as "RuntimeError: Unable to convert call argument '0' to Python
    object", and the node exited 1 on a plain Ctrl-C (the trainer node, seen in CI). A handler that only
    returns leaves the stop to the context shutdown, which every node already handles.
    """

    def stop_requested(signum: int, frame: object) -> None:
        del frame  # rclpy's own handler, which calls this one, has already shut the contexts down
        _stop_signals.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_requested)


def run_nodes(
    make_nodes: Callable[[Context], Sequence[Node]],
    args: list[str] | None = None,
    on_shutdown: Callable[[], Any] | None = None,
) -> int:
    """Init rclpy, create the nodes, spin them on one executor, shut down cleanly.

    The process's default context is used, so rclpy's own signal handlers turn SIGINT and SIGTERM into a
    context shutdown that wakes the executor: `kill`, systemd and `ros2 launch` all stop the nodes the same way
    (their `close()` runs: the arm holds, the episode writer drains, the cell stops, the policy's loads stop and
    its sessions are released). Everything native is let go of here, in order, before rclpy shuts down and long
    before interpreter teardown. A close() that raises makes the exit code 1 (the others still run); a crash in
    native code still kills the process by its signal, after faulthandler has written every thread's Python
    stack to stderr (the node's log). SIGINT never raises KeyboardInterrupt here (see
    `_stop_without_keyboard_interrupt`).
    """
    faulthandler.enable()
    use_default_profile()  # before this process's first DDS participant
    _stop_without_keyboard_interrupt()
    rclpy.init(args=args if args is not None else sys.argv)
    context = rclpy.get_default_context()
    if _stop_signals:  # before rclpy's handler was installed: nothing shut the context down yet
        rclpy.try_shutdown()
    nodes: list[Node] = []
    # One thread: rclpy's MultiThreadedExecutor busy-loops (holding the GIL) while a ready entity's callback group
    # is busy, which starved the policy's own tick on 2 cores. Long work runs on the nodes' own threads instead.
    executor = SingleThreadedExecutor(context=context)
    code = 0
    try:
        try:
            nodes = list(make_nodes(context))
        except Exception:
            if context.ok():
                raise
            # SIGINT/SIGTERM arrived while the node was being built (creating an entity on a shut-down context
            # fails): that is a stop request, not a crash.
            return code
        for node in nodes:
            executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (_rclpy.RCLError, _rclpy.InvalidHandle) as exc:
        if context.ok():
            raise
        # rclpy's signal handler shuts the context down from its own thread, so a callback that was running at
        # that moment fails its next publish ("publisher's context is invalid"): that is the stop, not a crash.
        # Any other exception, or an rclpy error on a live context, still ends the process non-zero.
        print(
            f"stopping: a callback was cut off by the shutdown ({str(exc).splitlines()[0]})", file=sys.stderr
        )
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        code = 2
    finally:
        steps: list[Callable[[], Any]] = [on_shutdown] if on_shutdown is not None else []
        steps += [close for node in nodes if callable(close := getattr(node, "close", None))]
        for step in steps:
            try:
                step()
            except Exception:
                traceback.print_exc()
                code = code or 1
        executor.shutdown(timeout_sec=2.0)
        for node in nodes:
            node.destroy_node()
        nodes.clear()
        gc.collect()  # what only a cycle still holds (nodes, runtimes) goes now, not during interpreter teardown
        rclpy.try_shutdown()
    return code
