"""A simulated robot cell: a Sawyer arm and one Meta-World v3 task scene on MuJoCo.

The cell is shared by the simulated camera and the simulated arm backend, which run on different executor
threads; every access to physics or rendering state holds one re-entrant lock (`cell.lock`).

Episode semantics differ from Meta-World's benchmark loop on purpose: the cell never truncates an episode
(the session decides when an episode ends) and `success()` stays true once reached within the episode.

Time: Meta-World's experts (and its task design) assume one action per env step (`control_dt`, 12.5 ms): the hand
moves at most `action_scale` per step while the fingers close at their own speed. A cell driven at a longer
`control_period` (the graph's 0.1 s: one command, then `finish_control_period` holds the target) still moves the
hand at most one step's worth per period, so unchanged fingers would close `control_period / control_dt` times
further per hand move than Meta-World's: an expert closing its gripper while it descends on an object (push,
assembly, ...) closes it before it gets there. A cell told its `control_period` therefore slows the fingers by that
factor (time scaling of their damped slide joints: damping x k, armature x k^2), keeping Meta-World's hand-to-finger
speed ratio; the squeeze force of a closed gripper is unchanged.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Sequence
from typing import Any

import mujoco
import numpy as np
from metaworld.env_dict import ALL_V3_ENVIRONMENTS
from metaworld.policies import ENV_POLICY_MAP

from irevla_ros.sim import DEFAULT_TASKS

INSTRUCTIONS: dict[str, str] = {
    "button-press-v3": "press the button",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-wall-v3": "press the button behind the wall",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "door-open-v3": "open the door",
    "door-close-v3": "close the door",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "reach-v3": "reach the target",
    "push-v3": "push the puck to the target",
    "pick-place-v3": "pick up the puck and place it at the target",
    "handle-press-v3": "press the handle down",
    "lever-pull-v3": "pull the lever up",
    "coffee-button-v3": "press the coffee machine button",
    "plate-slide-v3": "slide the plate into the goal",
}

ARM_JOINTS: tuple[str, ...] = tuple(f"right_j{i}" for i in range(7))
GRIPPER_JOINTS: tuple[str, ...] = ("r_close", "l_close")

# Meta-World normalises the finger distance by the ~0.1 m maximum opening.
_MAX_FINGER_DISTANCE = 0.1
# Actions a hair outside [-1, 1] are float noise (float32 round trips), not bugs.
_ACTION_TOLERANCE = 1e-6
# The cell owns episode length; Meta-World's own horizon (500 steps) would raise mid-episode.
_UNBOUNDED_PATH_LENGTH = 2**62


class UnknownTaskError(ValueError):
    """A task name is not a Meta-World v3 task, or not one this cell was configured with."""


class UnknownCameraError(ValueError):
    """A camera name does not exist in the task's MuJoCo model."""


class InvalidActionError(ValueError):
    """An action or target is not finite, has the wrong shape, or lies outside the normalised range."""


class InvalidSeedError(ValueError):
    """A layout seed is not an integer in [0, 2**63) (what ResetEpisode and the episode store can carry)."""


# Mixed into the scene seeds so that a graph's scenes are not the episode_seed(seed, task, i) scenes of
# evaluation and validation (train/rollout.py) when the two seed numbers happen to be equal.
_SCENE_STREAM = zlib.crc32(b"sim_cell scenes")
_MAX_SEED = 2**63  # int64 on the wire (ResetEpisode.seed, EpisodeEvent.scene_seed) and in the catalogue


def _task_seed(seed: int, task: str) -> int:
    # Each task env gets its own stream so that the order in which tasks are first used does not change
    # another task's object positions.
    return int(np.random.SeedSequence([seed, zlib.crc32(task.encode())]).generate_state(1)[0])


def scene_seed(seed: int, task: str, index: int) -> int:
    """The layout seed a cell with seed `seed` draws for its `index`-th reset (0-based) of `task` without a seed.

    A function of the three only, so a recorded seed rebuilds its scene in any cell, and the order in which
    tasks are run does not change another task's scenes."""
    return int(
        np.random.SeedSequence(
            [int(seed), zlib.crc32(task.encode()), int(index), _SCENE_STREAM]
        ).generate_state(1)[0]
    )


def _finite_vector(name: str, value: object, size: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidActionError(f"{name} must be a numeric array of shape ({size},): {exc}") from exc
    if arr.shape != (size,):
        raise InvalidActionError(f"{name} must have shape ({size},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidActionError(f"{name} must be finite, got {arr.tolist()}")
    return arr


class _TaskSlot:
    """One lazily built Meta-World env with what the cell needs alongside it."""

    def __init__(
        self,
        task: str,
        width: int,
        height: int,
        cameras: Sequence[str],
        seed: int,
        control_period: float | None,
    ) -> None:
        env = ALL_V3_ENVIRONMENTS[task](width=width, height=height)
        # What Meta-World's benchmark wrappers do, minus the fixed list of 50 goals: a fresh random object
        # placement per reset drawn from the env's own seeded generator.
        env._set_task_called = True
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        # Goal-observable observations, as in MT1: some scripted experts read the goal from the observation.
        if env._partially_observable:
            del env.sawyer_observation_space  # cached_property: recompute the bounds with the goal visible
            env._partially_observable = False
        env.max_path_length = _UNBOUNDED_PATH_LENGTH
        env.seed(_task_seed(seed, task))
        self.env = env
        self.policy = ENV_POLICY_MAP[task]()
        model = env.model
        self.camera_names = tuple(model.camera(i).name for i in range(model.ncam))
        missing = [c for c in cameras if c not in self.camera_names]
        if missing:
            raise UnknownCameraError(
                f"cameras {missing} not in the {task} model; it has {list(self.camera_names)}"
            )
        names = ARM_JOINTS + GRIPPER_JOINTS
        self.joint_names = list(names)
        self.qpos_index = np.array([model.jnt_qposadr[model.joint(n).id] for n in names])
        self.qvel_index = np.array([model.jnt_dofadr[model.joint(n).id] for n in names])
        self.hand_body = model.body("hand").id
        self.left_claw = model.body("leftclaw").id
        self.right_claw = model.body("rightclaw").id
        control_dt = float(env.frame_skip * model.opt.timestep)
        self.finger_time_scale = 1.0 if control_period is None else max(1.0, control_period / control_dt)
        # The finger slides are damping-dominated (their servo force / damping is their speed): scaling damping by
        # k and armature by k^2 plays their motion k times slower, end points and squeeze force unchanged.
        fingers = self.qvel_index[len(ARM_JOINTS) :]
        model.dof_damping[fingers] *= self.finger_time_scale
        model.dof_armature[fingers] *= self.finger_time_scale**2
        self.width, self.height = width, height
        self._renderer: mujoco.Renderer | None = None
        self._rotate: dict[str, bool] = {}
        self.obs: np.ndarray | None = None

    @property
    def renderer(self) -> mujoco.Renderer:
        if self._renderer is None:
            vis = self.env.model.vis.global_
            vis.offwidth = max(int(vis.offwidth), self.width)
            vis.offheight = max(int(vis.offheight), self.height)
            self._renderer = mujoco.Renderer(self.env.model, self.height, self.width)
        return self._renderer

    def upside_down(self, camera: str) -> bool:
        # Meta-World's corner cameras are mounted with their image "up" axis pointing at the floor. Decided
        # once per camera so a camera that moves with the hand never flips mid-episode.
        if camera not in self._rotate:
            cam_id = self.env.model.camera(camera).id
            up_world = self.env.data.cam_xmat[cam_id].reshape(3, 3)[:, 1]
            self._rotate[camera] = bool(up_world[2] < 0.0)
        return self._rotate[camera]

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.env.close()


class MetaWorldCell:
    """A Sawyer arm in a Meta-World v3 scene: episodes, Cartesian control, expert actions, camera images."""

    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        width: int = 128,
        height: int = 128,
        cameras: Sequence[str] = ("corner",),
        seed: int = 0,
        control_period: float | None = None,
    ) -> None:
        """`control_period`: the period (s) of the controller that will drive the cell, one command per period
        (see the module docstring: the fingers are slowed to keep Meta-World's hand-to-finger speed ratio);
        None: one command per Meta-World env step, Meta-World's own fingers."""
        tasks = tuple(tasks)
        if not tasks:
            raise UnknownTaskError("tasks must name at least one Meta-World v3 task")
        unknown = [t for t in tasks if t not in ALL_V3_ENVIRONMENTS]
        if unknown:
            raise UnknownTaskError(f"unknown tasks {unknown}; valid tasks: {sorted(ALL_V3_ENVIRONMENTS)}")
        if len(set(tasks)) != len(tasks):
            raise UnknownTaskError(f"tasks must not repeat, got {list(tasks)}")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            raise ValueError(f"width and height must be positive integers, got {width!r} x {height!r}")
        if control_period is not None and not (math.isfinite(control_period) and control_period > 0):
            raise ValueError(
                f"control_period must be a positive number of seconds or None, got {control_period!r}"
            )
        self._control_period = None if control_period is None else float(control_period)
        self._tasks = tasks
        self._width, self._height = width, height
        self._cameras = tuple(cameras)
        self._seed = int(seed)
        self._slots: dict[str, _TaskSlot] = {}
        self._lock = threading.RLock()
        self._next_task_index = 0
        self._sim_time = 0.0
        self._success = False
        self._episode_steps = 0
        self._scenes_drawn: dict[str, int] = {}  # task -> resets without a seed so far
        self._episode_seed = 0
        self._task = tasks[0]
        # Start in a valid episode so a camera can render before the first explicit reset; the round-robin
        # still begins with tasks[0], and so does the task's scene sequence (this scene is not one of it).
        self._start_episode(tasks[0], _task_seed(self._seed, tasks[0]))

    # ---- configuration -------------------------------------------------------------------------------------

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    @property
    def cameras(self) -> tuple[str, ...]:
        return self._cameras

    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    @property
    def task(self) -> str:
        return self._task

    @property
    def instruction(self) -> str:
        return instruction_for(self._task)

    @property
    def episode_seed(self) -> int:
        """The layout seed of the current episode: the reset's, or the one the cell drew for a reset without one
        (`scene_seed`). Resetting the task with it in any cell rebuilds the same scene."""
        return self._episode_seed

    @property
    def episode_steps(self) -> int:
        return self._episode_steps

    @property
    def control_dt(self) -> float:
        env = self._current.env
        return float(env.frame_skip * env.model.opt.timestep)

    @property
    def control_period(self) -> float | None:
        """The controller period the fingers are timed for (None: one Meta-World env step)."""
        return self._control_period

    @property
    def finger_time_scale(self) -> float:
        """How many times slower than Meta-World's the fingers move (control_period / control_dt, at least 1)."""
        return self._current.finger_time_scale

    @property
    def sim_time(self) -> float:
        return self._sim_time

    @property
    def action_scale(self) -> float:
        return float(self._current.env.action_scale)

    @property
    def workspace_low(self) -> np.ndarray:
        return np.array(self._current.env.hand_low, dtype=np.float64)

    @property
    def workspace_high(self) -> np.ndarray:
        return np.array(self._current.env.hand_high, dtype=np.float64)

    @property
    def model(self) -> mujoco.MjModel:
        return self._current.env.model

    @property
    def data(self) -> mujoco.MjData:
        return self._current.env.data

    @property
    def renderer(self) -> mujoco.Renderer:
        """The current task's renderer, for benchmarks timing a bare render (hold `lock` while using it)."""
        with self._lock:
            return self._current.renderer

    def camera_fovy(self, camera: str) -> float:
        """Vertical field of view of a MuJoCo camera, in degrees."""
        with self._lock:
            return float(self.model.cam_fovy[self._camera_id(camera)])

    # ---- episodes ------------------------------------------------------------------------------------------

    def reset(self, task: str | None = None, seed: int | None = None) -> int:
        """Start an episode: `task` None takes the next configured task in turn; `seed` fixes the layout, None
        draws the task's next scene seed (`scene_seed`). Returns the layout seed used (`episode_seed`)."""
        valid = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < _MAX_SEED
        if seed is not None and not valid:
            raise InvalidSeedError(f"layout seed must be an integer in [0, 2**63), got {seed!r}")
        with self._lock:
            if task is None:
                task = self._tasks[self._next_task_index]
            elif task not in self._tasks:
                raise UnknownTaskError(f"task {task!r} is not configured; this cell runs {list(self._tasks)}")
            self._next_task_index = (self._tasks.index(task) + 1) % len(self._tasks)
            if seed is None:
                # An explicit seed even here, so that every episode's scene can be recorded and rebuilt.
                index = self._scenes_drawn.get(task, 0)
                self._scenes_drawn[task] = index + 1
                seed = scene_seed(self._seed, task, index)
            self._start_episode(task, int(seed))
            return self._episode_seed

    def _start_episode(self, task: str, seed: int) -> None:
        slot = self._slot(task)
        slot.env.seed(seed)
        obs, _ = slot.env.reset()
        slot.obs = obs
        self._task = task
        self._episode_seed = seed
        self._success = False
        self._episode_steps = 0
        # Meta-World homes the hand by simulating; that physics time passed, so stamps keep increasing.
        self._sim_time += max(float(slot.env.data.time), self.control_dt)

    def object_layout(self) -> np.ndarray:
        """The random vector Meta-World drew for this episode (object/goal positions)."""
        with self._lock:
            return np.array(self._current.env._last_rand_vec, dtype=np.float64)

    def success(self) -> bool:
        return self._success

    # ---- robot state ---------------------------------------------------------------------------------------

    def ee_position(self) -> np.ndarray:
        """Hand position in the world frame, metres (the position Meta-World observes and experts track)."""
        with self._lock:
            return self.data.xpos[self._current.hand_body].copy()

    def gripper_opening(self) -> float:
        """Finger separation normalised to [0, 1] (1: fully open), as in Meta-World's observation."""
        with self._lock:
            slot = self._current
            xpos = slot.env.data.xpos
            distance = np.linalg.norm(xpos[slot.right_claw] - xpos[slot.left_claw])
            return float(np.clip(distance / _MAX_FINGER_DISTANCE, 0.0, 1.0))

    def joint_state(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Names, positions (rad or m) and velocities of the 7 arm joints and the 2 finger joints."""
        with self._lock:
            slot = self._current
            data = slot.env.data
            return (
                list(slot.joint_names),
                data.qpos[slot.qpos_index].copy(),
                data.qvel[slot.qvel_index].copy(),
            )

    # ---- control -------------------------------------------------------------------------------------------

    def apply_action(self, action: np.ndarray) -> None:
        """One control period of a Meta-World action: xyz hand delta and gripper effort, all in [-1, 1]."""
        arr = _finite_vector("action", action, 4)
        if np.any(np.abs(arr) > 1.0 + _ACTION_TOLERANCE):
            raise InvalidActionError(f"action must lie in [-1, 1], got {arr.tolist()}")
        arr = np.clip(arr, -1.0, 1.0)
        with self._lock:
            slot = self._current
            obs, _reward, _terminated, _truncated, info = slot.env.step(arr)
            slot.obs = obs
            self._episode_steps += 1
            self._sim_time += self.control_dt
            if info.get("success", 0.0) >= 1.0:
                self._success = True

    def move_toward(self, target_xyz: np.ndarray, gripper: float) -> None:
        """One control step moving the hand toward a world-frame target (at most action_scale per axis)."""
        target = _finite_vector("target_xyz", target_xyz, 3)
        grip = _finite_vector("gripper", [gripper], 1)[0]
        if abs(grip) > 1.0 + _ACTION_TOLERANCE:
            raise InvalidActionError(f"gripper must lie in [-1, 1], got {grip}")
        with self._lock:
            # Measured from the commanded (mocap) position, not the hand: the hand lags the mocap weld by
            # about a centimetre, and closing the loop on it with this gain makes the hand oscillate there.
            commanded = self.data.mocap_pos[0]
            delta = np.clip((target - commanded) / self.action_scale, -1.0, 1.0)
            self.apply_action(np.append(delta, np.clip(grip, -1.0, 1.0)))

    def expert_action(self) -> np.ndarray:
        """Meta-World's scripted expert action for the current observation, shape (4,), float32, in [-1, 1].

        The experts' proportional gains overshoot [-1, 1] by design (Meta-World clips inside `step`); the
        clip here makes the returned action one that `apply_action` accepts and that a dataset records as
        what was actually executed.
        """
        with self._lock:
            slot = self._current
            assert slot.obs is not None  # set by every reset and step
            action = np.asarray(slot.policy.get_action(slot.obs.copy()), dtype=np.float32)
            return np.clip(action, -1.0, 1.0)

    # ---- rendering -----------------------------------------------------------------------------------------

    def render(self, camera: str) -> np.ndarray:
        """An upright RGB image (height, width, 3) uint8 of the current state from a MuJoCo camera."""
        with self._lock:
            slot = self._current
            cam_id = self._camera_id(camera)
            renderer = slot.renderer
            renderer.update_scene(slot.env.data, camera=cam_id)
            # Shadows and reflections cost ~4x the frame time on a software renderer and add nothing a policy
            # needs; they must be switched off after every update_scene, which restores the model defaults.
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            image = renderer.render()
            if slot.upside_down(camera):
                image = np.ascontiguousarray(image[::-1, ::-1])
            return image

    def close(self) -> None:
        with self._lock:
            for slot in self._slots.values():
                slot.close()
            self._slots.clear()

    # ---- internals -----------------------------------------------------------------------------------------

    @property
    def _current(self) -> _TaskSlot:
        return self._slots[self._task]

    def _slot(self, task: str) -> _TaskSlot:
        if task not in self._slots:
            self._slots[task] = _TaskSlot(
                task, self._width, self._height, self._cameras, self._seed, self._control_period
            )
        return self._slots[task]

    def _camera_id(self, camera: str) -> int:
        slot = self._current
        if camera not in slot.camera_names:
            raise UnknownCameraError(
                f"camera {camera!r} not in the {self._task} model; it has {list(slot.camera_names)}"
            )
        return int(slot.env.model.camera(camera).id)

    def __enter__(self) -> MetaWorldCell:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def instruction_for(task: str) -> str:
    """A natural-language instruction for a Meta-World task name."""
    if task in INSTRUCTIONS:
        return INSTRUCTIONS[task]
    return task.removesuffix("-v3").replace("-", " ")


def finish_control_period(cell: MetaWorldCell, period_start: float, period: float) -> int:
    """Hold the commanded target, with the current gripper effort, for the rest of a control period that began
    at simulated time `period_start`; returns the number of physics steps taken (the sim cell node's rule)."""
    steps = 0
    with cell.lock:
        gripper = float(cell.data.ctrl[0]) if cell.data.ctrl.size else 0.0
        while cell.sim_time < period_start + period - 1e-9:
            cell.apply_action(np.array([0.0, 0.0, 0.0, np.clip(gripper, -1, 1)]))
            steps += 1
    return steps
