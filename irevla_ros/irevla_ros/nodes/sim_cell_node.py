"""The simulated cell process: the MuJoCo/Meta-World world, its clock, and the drivers that touch it.

`sim_cell_node` runs three nodes in one process, because they share one simulated world:
- `sim_cell` (this module's SimCellNode): owns the MetaWorldCell, advances it one control period at a time in
  step with the arm controller, renders the cameras after each period, publishes /clock (every node runs on
  simulated time), the simulator's success signal and its scripted expert's action, and serves
  /sim/reset_episode (per-episode randomisation; the answer names the layout seed, drawn by the cell when the
  request has none, so every episode's scene can be rebuilt);
- `camera` (CameraNode with the `sim` backend): publishes the frames the cell rendered;
- `arm_controller` (ArmControllerNode with the `sim` backend): its commands step the cell; its state (pose,
  joints) is published by the cell after every period, like the frames.

Lock-step: a period ends when the arm controller has commanded it (its command steps the physics), or when
`max_wall_wait` wall seconds pass without a command (the arm holds, like a real arm whose controller is late);
the remaining physics substeps of the period hold the commanded target. So simulated time runs as fast as the
graph can keep up, and rates, timeouts and the watchdog mean the same as on a robot.

Everything observed at time t (camera frames, arm state, success, the expert's action) is published before the
/clock message of t, so the policy's tick at t acts on the world at t, as the direct rollout (`train/rollout.py`)
does. A reset answers only after its new scene is out, with the scene's stamp: the episode starts, and its timeout
counts, from that first observation.

Status on /diagnostics ("sim_cell: world", `irevla_ros.diagnostics`): simulated time and periods; periods that
advanced without an arm command are WARN, a dead stepping thread ERROR.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

from builtin_interfaces.msg import Time as TimeMsg
from rclpy._rclpy_pybind11 import RCLError
from rclpy.node import Node
from rosgraph_msgs.msg import Clock
from std_msgs.msg import Bool

from irevla_interfaces.msg import ArmCommand
from irevla_interfaces.srv import ResetEpisode
from irevla_ros import topics
from irevla_ros.diagnostics import EVENT_WINDOW, EventWindow, SimSnapshot, Status, sim_status
from irevla_ros.hardware.arm import make_arm
from irevla_ros.hardware.camera import CameraBackend, make_camera
from irevla_ros.node_parameters import SIM_CELL
from irevla_ros.nodes.arm_controller_node import ArmControllerNode
from irevla_ros.nodes.camera_node import CameraNode
from irevla_ros.nodes.common import declare_parameters, run_nodes
from irevla_ros.nodes.diagnostics_publisher import DiagnosticsPublisher
from irevla_ros.sim.cell import MetaWorldCell, finish_control_period


class SimCellNode(Node):
    def __init__(self, name: str = "sim_cell", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        p = declare_parameters(self, SIM_CELL)
        self.params = p
        self.cell = MetaWorldCell(
            tasks=list(p["tasks"]),  # type: ignore[arg-type]
            width=int(p["image_width"]),  # type: ignore[arg-type]
            height=int(p["image_height"]),  # type: ignore[arg-type]
            cameras=list(p["cameras"]),  # type: ignore[arg-type]
            seed=int(p["seed"]),  # type: ignore[arg-type]
            control_period=float(p["control_period"]),  # type: ignore[arg-type]  # fingers timed for it
        )
        self.period = float(p["control_period"])  # type: ignore[arg-type]
        # /clock advances on an exact grid of control periods (integer nanoseconds), so every node's timers
        # at the control rate fire once per period; float drift of the physics time never skips a tick.
        self.period_ns = round(self.period * 1e9)
        self.clock_ns = 0
        self.substeps = max(1, round(self.period / self.cell.control_dt))
        # Rendered only once a camera node asks for them (camera_backend), on the cell's thread.
        self.cameras: dict[str, CameraBackend] = {}
        self._clock_pub = self.create_publisher(Clock, "/clock", 10)
        self._success_pub = self.create_publisher(Bool, topics.SIM_SUCCESS, 10)
        self._expert_pub = self.create_publisher(ArmCommand, topics.SIM_EXPERT_ACTION, 10)
        self.create_service(ResetEpisode, topics.SIM_RESET, self._on_reset)
        self.periods = 0
        self.periods_without_command = 0
        self._recent_uncommanded = EventWindow(EVENT_WINDOW)  # wall times of those periods
        self._stop = threading.Event()
        self._wake = threading.Event()  # a reset happened: publish the new scene now
        self._scene_out = threading.Condition(self.cell.lock)  # the new scene was published (after _wake)
        self._scenes_published = 0
        self._scene_stamp_ns = 0
        self._reset_jump_ns = 0
        # Called with the ROS time (s) of each period, on the cell's thread, before that period's /clock.
        self.on_period: list[Callable[[float], Any]] = []
        # Called with the new scene's stamp (s) after a reset, before the reset is answered.
        self.on_reset: list[Callable[[float], Any]] = []
        self._thread = threading.Thread(target=self._run, name="sim-cell", daemon=True)
        self.diagnostics = DiagnosticsPublisher(self, self._statuses)

    def start(self) -> None:
        self._thread.start()

    def camera_backend(self, camera: str) -> CameraBackend:
        """The `sim` camera backend for MuJoCo camera `camera`; it is rendered after every period from now on."""
        if camera not in self.cell.cameras:
            raise ValueError(
                f"sim camera {camera!r} is not one of the cell's cameras {list(self.cell.cameras)}"
            )
        with self.cell.lock:
            if camera not in self.cameras:
                self.cameras[camera] = make_camera("sim", cell=self.cell, camera=camera)
            return self.cameras[camera]

    def _on_reset(
        self, request: ResetEpisode.Request, response: ResetEpisode.Response
    ) -> ResetEpisode.Response:
        try:
            with self.cell.lock:
                before = self.cell.sim_time
                # A request without a seed (-1) gets one drawn by the cell; either way the answer names it, so
                # the episode's scene is recorded and can be rebuilt (irevla replay).
                response.seed = self.cell.reset(
                    task=request.task or None, seed=None if request.seed < 0 else int(request.seed)
                )
                response.task, response.instruction = self.cell.task, self.cell.instruction
                # The reset's own physics time (Meta-World homes the hand) passes on the clock too, in whole
                # periods; the cell's thread renders and publishes the new scene (all rendering happens on that
                # thread, where the OpenGL contexts live). The answer waits for it: whoever starts the episode
                # on this answer has the new scene's stamp, and every node has its first observation.
                self._reset_jump_ns += self.period_ns * math.ceil(
                    (self.cell.sim_time - before) / self.period - 1e-6
                )
                published = self._scenes_published
                self._wake.set()
                self._scene_out.wait_for(
                    lambda: self._scenes_published > published or not self._thread.is_alive(), timeout=10.0
                )
                if self._scenes_published == published:
                    raise ValueError("the cell's thread did not publish the new scene")
                stamp_ns = self._scene_stamp_ns
        except ValueError as exc:
            response.success, response.message = False, str(exc)
            return response
        for callback in self.on_reset:
            callback(stamp_ns * 1e-9)
        response.stamp = TimeMsg(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
        response.success, response.message = True, f"reset to {response.task}"
        return response

    def _run(self) -> None:
        try:
            self._step_periods()
        except RCLError:
            if self.context.ok():
                raise
            # shutting down (Ctrl-C, SIGTERM): the context went away under this thread mid-publish

    def _step_periods(self) -> None:
        max_wait = float(self.params["max_wall_wait"])  # type: ignore[arg-type]
        rtf = float(self.params["real_time_factor"])  # type: ignore[arg-type]
        wall_start, sim_start = time.monotonic(), self.clock_ns * 1e-9
        self._publish_period()
        while not self._stop.is_set() and self.context.ok():
            t0 = self.cell.sim_time
            deadline = time.monotonic() + max_wait
            while (
                self.cell.sim_time == t0
                and not self._wake.is_set()
                and time.monotonic() < deadline
                and not self._stop.is_set()
            ):
                time.sleep(0.0005)
            if self._stop.is_set():
                return
            if self._wake.is_set():
                with self.cell.lock:
                    self._wake.clear()
                    self.clock_ns += self._reset_jump_ns
                    self._reset_jump_ns = 0
                    self._publish_period()
                    self._scene_stamp_ns = self.clock_ns
                    self._scenes_published += 1
                    self._scene_out.notify_all()
                continue
            with self.cell.lock:
                commanded = self.cell.sim_time != t0
                if not commanded:
                    self.periods_without_command += 1
                    self._recent_uncommanded.add(time.monotonic())
                    self.get_logger().warning(
                        f"no arm command within {max_wait} s (wall): period advanced with the arm held",
                        throttle_duration_sec=5.0,
                    )
                # The rest of the period holds the commanded target (shared with the direct rollout).
                finish_control_period(self.cell, t0, self.period)
            if rtf > 0:
                ahead = (self.clock_ns * 1e-9 + self.period - sim_start) / rtf - (
                    time.monotonic() - wall_start
                )
                if ahead > 0:
                    time.sleep(ahead)
            with self.cell.lock:  # one clock: a concurrent reset also advances and publishes it
                self.periods += 1
                self.clock_ns += self.period_ns
                self._publish_period()

    def _publish_period(self) -> None:
        with self.cell.lock:
            now = self.clock_ns * 1e-9
            # Rendered here, on the cell's thread with its OpenGL context, stamped with this period's clock.
            frames = [(camera, camera.render(now)) for camera in self.cameras.values()]  # type: ignore[attr-defined]
            success = self.cell.success()
            expert = self.cell.expert_action()
            for callback in self.on_period:
                callback(now)
        for camera, frame in frames:
            camera.offer(frame)  # type: ignore[attr-defined]  # the camera node publishes it now, before /clock
        stamp = TimeMsg(sec=self.clock_ns // 10**9, nanosec=self.clock_ns % 10**9)
        self._success_pub.publish(Bool(data=bool(success)))
        # Stamped, like the frames and the arm state: the policy's tick of t waits for the expert's action of t.
        expert_msg = ArmCommand(ee_delta=[float(x) for x in expert[:3]], gripper=float(expert[3]))
        expert_msg.header.stamp = stamp
        self._expert_pub.publish(expert_msg)
        self._clock_pub.publish(Clock(clock=stamp))

    def _statuses(self) -> list[Status]:
        snapshot = SimSnapshot(
            running=self._thread.is_alive(),
            stopping=self._stop.is_set() or not self._thread.ident,  # not started yet counts as fine
            sim_time=self.clock_ns * 1e-9,
            periods=self.periods,
            uncommanded=self._recent_uncommanded.count(time.monotonic()),
            max_wall_wait=float(self.params["max_wall_wait"]),  # type: ignore[arg-type]
        )
        return [sim_status(self.get_name(), snapshot)]

    def stop(self) -> None:
        """Stop advancing the world (idempotent): no more periods, frames or state after this returns."""
        if not self._stop.is_set():
            self._stop.set()
            self.get_logger().info(
                f"stopped after {self.periods} control periods, {self.periods_without_command} of them without an "
                f"arm command (each waited max_wall_wait)"
            )
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)

    def close(self) -> None:
        self.stop()
        if not self._thread.is_alive():  # never pull the world from under a thread still rendering it
            self.cell.close()


def make_sim_nodes(context: object) -> list[Node]:
    cell_node = SimCellNode(context=context)
    cameras = [
        CameraNode(
            backend_factory=lambda params: cell_node.camera_backend(str(params["sim_camera"])),
            name=name,
            namespace=name,
            context=context,
        )
        for name in cell_node.params["camera_nodes"]  # type: ignore[union-attr]
    ]
    arm = ArmControllerNode(
        backend_factory=lambda params: make_arm("sim", cell=cell_node.cell),
        state_publisher="external",  # the cell publishes the arm's state of each period, before its /clock
        time_source=lambda: cell_node.clock_ns * 1e-9,  # the world's clock, which waits for this arm
        context=context,
    )
    cell_node.on_period.append(arm.publish_state)
    cell_node.on_reset.append(arm.scene_reset)
    cell_node.start()
    # Closed in this order: the arm and the cameras stop touching the cell before it shuts down.
    return [arm, *cameras, cell_node]


def main(args: list[str] | None = None) -> int:
    cells: list[SimCellNode] = []

    def make(context: object) -> list[Node]:
        nodes = make_sim_nodes(context)
        cells.extend(n for n in nodes if isinstance(n, SimCellNode))
        return nodes

    # The world stops first: the arm and cameras then close without a period in flight (the arm's close still
    # holds it, on the open cell).
    return run_nodes(make, args, on_shutdown=lambda: [cell.stop() for cell in cells])
