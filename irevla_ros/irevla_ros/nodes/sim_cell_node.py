"""The simulated cell process: the MuJoCo/Meta-World world, its clock, and the drivers that touch it.

`sim_cell_node` runs three nodes in one process, because they share one simulated world:
- `sim_cell` (this module's SimCellNode): owns the MetaWorldCell, advances it one control period at a time in
  step with the arm controller, renders the cameras after each period, publishes /clock (every node runs on
  simulated time), the simulator's success signal and its scripted expert's action, and serves
  /sim/reset_episode (per-episode randomisation);
- `camera` (CameraNode with the `sim` backend): publishes the frames the cell rendered;
- `arm_controller` (ArmControllerNode with the `sim` backend): its commands step the cell.

Lock-step: a period ends when the arm controller has commanded it (its command steps the physics), or when
`max_wall_wait` wall seconds pass without a command (the arm holds, like a real arm whose controller is late);
the remaining physics substeps of the period hold the commanded target. So simulated time runs as fast as the
graph can keep up, and rates, timeouts and the watchdog mean the same as on a robot.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from rclpy.node import Node
from rosgraph_msgs.msg import Clock
from std_msgs.msg import Bool, Float32MultiArray

from irevla_interfaces.srv import ResetEpisode
from irevla_ros import topics
from irevla_ros.hardware.arm import make_arm
from irevla_ros.hardware.camera.base import CameraBackend, CameraFrame, CameraInfoData
from irevla_ros.hardware.camera.sim import SimCamera
from irevla_ros.nodes.arm_controller_node import ArmControllerNode
from irevla_ros.nodes.camera_node import CameraNode
from irevla_ros.nodes.common import declare_parameters, run_nodes, to_time_msg
from irevla_ros.parameters import SIM_CELL
from irevla_ros.sim.cell import MetaWorldCell


class RenderedCamera(CameraBackend):
    """Camera backend `sim`: the newest frame the cell rendered for one of its cameras (rendering happens on the
    cell's thread, where its OpenGL context lives)."""

    def __init__(self, source: SimCamera) -> None:
        self._info = source.info
        self._frame: CameraFrame | None = None
        self._returned: int | None = None
        self._lock = threading.Lock()

    def offer(self, frame: CameraFrame) -> None:
        with self._lock:
            self._frame = frame

    def open(self) -> None:
        self._returned = None

    def read(self, timeout: float = 0.0) -> CameraFrame | None:
        with self._lock:
            frame = self._frame
            if frame is None or frame.frame_number == self._returned:
                return None
            self._returned = frame.frame_number
            return frame

    def close(self) -> None:
        pass

    @property
    def info(self) -> CameraInfoData:
        return self._info


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
        )
        self.period = float(p["control_period"])  # type: ignore[arg-type]
        self.substeps = max(1, round(self.period / self.cell.control_dt))
        self._renderers = {
            name: SimCamera(self.cell, name, skip_unchanged=False) for name in self.cell.cameras
        }
        for renderer in self._renderers.values():
            renderer.open()
        self.cameras = {name: RenderedCamera(r) for name, r in self._renderers.items()}
        self._clock_pub = self.create_publisher(Clock, "/clock", 10)
        self._success_pub = self.create_publisher(Bool, topics.SIM_SUCCESS, 10)
        self._expert_pub = self.create_publisher(Float32MultiArray, topics.SIM_EXPERT_ACTION, 10)
        self.create_service(ResetEpisode, topics.SIM_RESET, self._on_reset)
        self.periods = 0
        self.periods_without_command = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-cell", daemon=True)

    def start(self) -> None:
        self._publish_period()
        self._thread.start()

    def camera_backend(self, camera: str) -> RenderedCamera:
        if camera not in self.cameras:
            raise ValueError(
                f"sim camera {camera!r} is not rendered by the cell (cameras: {sorted(self.cameras)})"
            )
        return self.cameras[camera]

    def _on_reset(
        self, request: ResetEpisode.Request, response: ResetEpisode.Response
    ) -> ResetEpisode.Response:
        try:
            with self.cell.lock:
                self.cell.reset(
                    task=request.task or None, seed=None if request.seed < 0 else int(request.seed)
                )
                response.task, response.instruction = self.cell.task, self.cell.instruction
        except ValueError as exc:
            response.success, response.message = False, str(exc)
            return response
        response.success, response.message = True, f"reset to {response.task}"
        return response

    def _run(self) -> None:
        max_wait = float(self.params["max_wall_wait"])  # type: ignore[arg-type]
        rtf = float(self.params["real_time_factor"])  # type: ignore[arg-type]
        wall_start, sim_start = time.monotonic(), self.cell.sim_time
        while not self._stop.is_set():
            t0 = self.cell.sim_time
            deadline = time.monotonic() + max_wait
            while self.cell.sim_time == t0 and time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.0005)
            if self._stop.is_set():
                return
            with self.cell.lock:
                commanded = self.cell.sim_time != t0
                self.periods_without_command += 0 if commanded else 1
                gripper = float(self.cell.data.ctrl[0]) if self.cell.data.ctrl.size else 0.0
                while self.cell.sim_time < t0 + self.period - 1e-9:
                    self.cell.apply_action(np.array([0.0, 0.0, 0.0, np.clip(gripper, -1, 1)]))
            self.periods += 1
            if rtf > 0:
                ahead = (self.cell.sim_time - sim_start) / rtf - (time.monotonic() - wall_start)
                if ahead > 0:
                    time.sleep(ahead)
            self._publish_period()

    def _publish_period(self) -> None:
        with self.cell.lock:
            frames = {name: r.read() for name, r in self._renderers.items()}
            now = self.cell.sim_time
            success = self.cell.success()
            expert = self.cell.expert_action()
        for name, frame in frames.items():
            if frame is not None:
                self.cameras[name].offer(frame)
        self._success_pub.publish(Bool(data=bool(success)))
        self._expert_pub.publish(Float32MultiArray(data=[float(x) for x in expert]))
        self._clock_pub.publish(Clock(clock=to_time_msg(now)))

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self.cell.close()


def make_sim_nodes(context: object) -> list[Node]:
    cell_node = SimCellNode(context=context)
    camera = CameraNode(
        backend_factory=lambda params: cell_node.camera_backend(str(params["sim_camera"])), context=context
    )
    arm = ArmControllerNode(
        backend_factory=lambda params: make_arm("sim", cell=cell_node.cell), context=context
    )
    cell_node.start()
    # Closed in reverse: the arm and camera stop touching the cell before it shuts down.
    return [arm, camera, cell_node]


def main(args: list[str] | None = None) -> int:
    return run_nodes(make_sim_nodes, args)
