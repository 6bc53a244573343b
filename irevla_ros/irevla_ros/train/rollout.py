"""One episode in a MetaWorldCell without ROS, with the pieces the node graph uses.

The node graph's loop, step for step (the graph test `test_evaluation.py` checks the two agree):
- the observation built by the policy node's own function (`observation.assemble`) from each camera node's
  MuJoCo camera rendered at the cell's resolution and resized to the camera node's size, the arm backend's
  state, the instruction the reset returned and the simulator's expert action (for the scripted expert);
- the same Policy object (`VLAPolicy` over a model-store version's runtime, or the scripted expert), run and
  checked by the node's own function (`observation.decide`: a hold when the policy cannot act or returns a
  non-finite/wrong-shaped action);
- the arm controller's conversion: `SafetyLayer.command(action, now, measured ee)` -> `SimArm.send_target`,
  `SimArm.hold()` for holds and refused commands, `SafetyLayer.reset()` at the start of every episode;
- the sim cell's control period: the command is one physics step, the rest of the period holds the commanded
  target with the current gripper effort (`finish_control_period`, which the sim cell node calls too);
- the episode manager's end rule: success as soon as the simulator reports it after a period, otherwise a
  timeout after `episode_timeout / control_period` steps.

All settings come from the graph's own parameter files (`RolloutSettings.from_graph`), so a changed yaml value
changes both paths. Plain Python: no rclpy.
"""

from __future__ import annotations

import math
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from irevla_ros.hardware.arm.sim import SimArm
from irevla_ros.observation import (
    PROPRIOCEPTION_NAMES,
    ArmState,
    Frame,
    ObservationRules,
    assemble,
    decide,
    resize_area,
)
from irevla_ros.param_spec import from_parameters
from irevla_ros.policies.base import Observation, Policy
from irevla_ros.policies.scripted import EXPERT_ACTION_KEY
from irevla_ros.safety import SafetyLayer, SafetyLimits
from irevla_ros.sim.cell import MetaWorldCell, finish_control_period


class RolloutConfigError(ValueError):
    """The graph's parameters describe something a direct rollout cannot reproduce (the message says what)."""


@dataclass(frozen=True)
class CameraSpec:
    """One camera node of the graph: its name (the policy's camera name), the MuJoCo camera it renders, and
    the size the camera node publishes."""

    name: str
    sim_camera: str
    width: int
    height: int


@dataclass(frozen=True)
class RolloutSettings:
    cameras: tuple[CameraSpec, ...]
    cell_cameras: tuple[str, ...]  # the MuJoCo cameras the sim cell is configured with
    cell_width: int
    cell_height: int
    image_width: int  # policy input size
    image_height: int
    control_period: float  # simulated seconds per control tick (the graph-wide control_period)
    episode_timeout: float  # simulated seconds (episode manager)
    limits: SafetyLimits
    cell_seed: int = 0

    @property
    def max_steps(self) -> int:
        """Steps of an episode that times out: the episode manager ends it when `episode_timeout` has passed."""
        return max(1, math.ceil(self.episode_timeout / self.control_period - 1e-9))

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    @property
    def observation_rules(self) -> ObservationRules:
        """The policy node's input size. Its freshness limits never bind here: every input is of the tick."""
        return ObservationRules(self.camera_names, self.image_width, self.image_height)

    def replace(self, **changes: Any) -> RolloutSettings:
        import dataclasses

        return dataclasses.replace(self, **changes)

    @classmethod
    def from_graph(
        cls, cameras: Sequence[str] = ("camera",), overrides: Sequence[str] = ()
    ) -> RolloutSettings:
        """The effective parameters of the sim `collect` graph with camera nodes `cameras` and `--set`-style
        `overrides`, validated exactly as `irevla bringup` validates them."""
        from irevla_ros.bringup.graph import collect_graph, validate_graph, with_overrides

        with tempfile.TemporaryDirectory() as tmp:
            graph = with_overrides(collect_graph("sim", tuple(cameras)), list(overrides), Path(tmp))
            effective = validate_graph(graph)
        return cls.from_parameters(effective, cameras)

    @classmethod
    def from_parameters(
        cls, effective: Mapping[str, Mapping[str, object]], cameras: Sequence[str]
    ) -> RolloutSettings:
        cell, policy = effective["/sim_cell"], effective["/policy"]
        arm, manager = effective["/arm_controller"], effective["/episode_manager"]
        specs = []
        for name in cameras:
            node = effective[f"/{name}/{name}"]
            specs.append(CameraSpec(name, str(node["sim_camera"]), int(node["width"]), int(node["height"])))  # type: ignore[call-overload]
        period = float(cell["control_period"])  # type: ignore[arg-type]  # graph-wide: the policy's too
        cell_cameras = tuple(str(c) for c in cell["cameras"])  # type: ignore[union-attr]
        missing = [c.sim_camera for c in specs if c.sim_camera not in cell_cameras]
        if missing:
            raise RolloutConfigError(
                f"camera nodes render {missing}, not among /sim_cell.cameras {cell_cameras}"
            )
        limits = from_parameters(SafetyLimits, arm)  # as the arm controller builds its own
        return cls(
            cameras=tuple(specs),
            cell_cameras=cell_cameras,
            cell_width=int(cell["image_width"]),  # type: ignore[call-overload]
            cell_height=int(cell["image_height"]),  # type: ignore[call-overload]
            image_width=int(policy["image_width"]),  # type: ignore[call-overload]
            image_height=int(policy["image_height"]),  # type: ignore[call-overload]
            control_period=period,
            episode_timeout=float(manager["episode_timeout"]),  # type: ignore[arg-type]
            limits=limits,
            cell_seed=int(cell["seed"]),  # type: ignore[call-overload]
        )


def make_cell(settings: RolloutSettings, tasks: Sequence[str], seed: int | None = None) -> MetaWorldCell:
    """A cell configured as the sim cell node configures its own (size, cameras, seed, control period)."""
    return MetaWorldCell(
        tasks=tuple(tasks),
        width=settings.cell_width,
        height=settings.cell_height,
        cameras=settings.cell_cameras,
        seed=settings.cell_seed if seed is None else int(seed),
        control_period=settings.control_period,
    )


# ---- the pieces shared with the nodes -------------------------------------------------------------------------


def observe(
    cell: MetaWorldCell,
    arm: SimArm,
    settings: RolloutSettings,
    instruction: str,
    now: float,
    *,
    render: bool = True,
) -> Observation:
    """The observation the policy node assembles at a tick (`observation.assemble`, the node's own function),
    from the cell's frames and arm state of this moment. A cell state no observation can be built from (a
    non-finite hand position) raises HoldTick: a bug of the simulation, not a tick to hold.

    `render=False`: no camera images (empty `images`), for policies that act on state alone (the scripted
    expert); rendering is most of a tick's time on a CPU. A policy that needs images then holds."""
    rules = settings.observation_rules
    if not render:
        rules = ObservationRules((), settings.image_width, settings.image_height)
    with cell.lock:
        # Each camera node publishes the cell's render at its own size (INTER_AREA).
        frames = {
            cam.name: Frame(resize_area(cell.render(cam.sim_camera), cam.width, cam.height), now)
            for cam in settings.cameras
            if render
        }
        state = arm.read_state()
        expert = cell.expert_action()
    arm_state = ArmState(state.ee_position, state.gripper, now)
    return assemble(rules, frames, arm_state, instruction, now, {EXPERT_ACTION_KEY: expert})


# ---- episode records ------------------------------------------------------------------------------------------


@dataclass
class EpisodeResult:
    """One episode as the graph would have recorded it (one row per step), plus what RL needs."""

    task: str
    instruction: str
    seed: int  # the layout seed the reset used (the cell draws one when run_episode got none)
    success: bool
    steps: int
    proprio: np.ndarray  # (T, 4) float32, before each action
    actions: np.ndarray  # (T, 4) float32, what the policy output (zeros on holds)
    log_probs: np.ndarray  # (T,) float32, NaN where the policy gave none
    values: np.ndarray  # (T,) float32, NaN where the policy gave none
    holds: np.ndarray  # (T,) bool
    ee_after: np.ndarray  # (T, 3) float64, hand position at the end of each period
    images: np.ndarray | None  # (T, n_cam, H, W, 3) uint8 when kept
    latents: np.ndarray | None  # (T, d) float32 when the policy exposes them (LatentTap)
    cameras: tuple[str, ...]
    policy_version: str
    hold_reasons: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def outcome(self) -> str:
        """The episode manager's outcome: success, or timeout when the time ran out."""
        return "success" if self.success else "timeout"


class LatentTap:
    """A runtime wrapper that keeps the latent of the last `act` (VLAPolicy discards it; RL caches it).

    Everything else is the wrapped runtime's, so VLAPolicy runs its ordinary code path."""

    def __init__(self, runtime: Any) -> None:
        self._runtime = runtime
        self.last_latent: np.ndarray | None = None

    def act(self, *args: Any, **kwargs: Any) -> tuple[np.ndarray, float, np.ndarray]:
        mean, value, latent = self._runtime.act(*args, **kwargs)
        self.last_latent = np.asarray(latent, dtype=np.float32).copy()
        return mean, value, latent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runtime, name)


def run_episode(
    cell: MetaWorldCell,
    policy: Policy,
    settings: RolloutSettings,
    task: str | None = None,
    seed: int | None = None,
    *,
    keep_images: bool = True,
    max_steps: int | None = None,
    safety: SafetyLayer | None = None,
    on_step: Callable[[int, Observation], None] | None = None,
    render: bool = True,
) -> EpisodeResult:
    """Reset `cell` to `task` (None: the next configured one) with layout `seed`, run `policy` until success
    or timeout, and return the episode. `max_steps` overrides the graph's timeout rule (shorter benchmarks).
    `render=False` (with `keep_images=False`) skips the cameras: the same loop for state-only policies such as
    the scripted expert (`observe`); the physics, and so the trajectory, are unchanged."""
    started_wall = time.monotonic()
    limit = settings.max_steps if max_steps is None else int(max_steps)
    if limit < 1:
        raise ValueError(f"max_steps must be >= 1, got {limit}")
    if keep_images and not render:
        raise ValueError("keep_images=True needs render=True: an episode run without cameras has no images")
    layer = safety or SafetyLayer(settings.limits)
    arm = SimArm(cell)
    arm.connect()
    with cell.lock:
        layout = cell.reset(task, seed)  # the one the cell drew when `seed` is None: recorded all the same
        task_name, instruction = cell.task, cell.instruction
    layer.reset()  # the arm controller does this at START
    policy.reset(instruction)
    runtime = getattr(policy, "runtime", None)
    tap = runtime if isinstance(runtime, LatentTap) else None
    period = settings.control_period
    rows: dict[str, list[Any]] = {
        k: [] for k in ("proprio", "actions", "logp", "value", "hold", "ee", "img", "lat")
    }
    reasons: list[str] = []
    success = False
    now = 0.0  # ROS time of the tick; only differences matter to the safety layer
    for step in range(limit):
        obs = observe(cell, arm, settings, instruction, now, render=render)
        if on_step is not None:
            on_step(step, obs)
        decision = decide(policy, obs)  # the policy node decides with the same function
        output, action = decision.output, decision.action
        with cell.lock:
            period_start = cell.sim_time
            if output is None:
                arm.hold()  # the policy published a hold; the controller holds the arm
                reasons.append(decision.hold_reason)
            else:
                cmd = layer.command(action.astype(np.float64), now, arm.read_state().ee_position)
                if cmd.moves and cmd.target is not None and cmd.gripper is not None:
                    arm.send_target(cmd.target, cmd.gripper)
                else:
                    arm.hold()
            finish_control_period(cell, period_start, period)
            ee_after = cell.ee_position()
            success = cell.success()
        rows["proprio"].append(obs.proprioception)
        rows["actions"].append(action)
        rows["logp"].append(np.nan if output is None or output.log_prob is None else output.log_prob)
        rows["value"].append(np.nan if output is None or output.value is None else output.value)
        rows["hold"].append(output is None)
        rows["ee"].append(ee_after)
        if keep_images:
            rows["img"].append(np.stack([obs.images[c] for c in settings.camera_names]))
        if tap is not None:
            rows["lat"].append(
                tap.last_latent if output is not None and tap.last_latent is not None else None
            )
        now += period
        if success:
            break
    latents = None
    if tap is not None and rows["lat"] and all(x is not None for x in rows["lat"]):
        latents = np.stack(rows["lat"]).astype(np.float32)
    return EpisodeResult(
        task=task_name,
        instruction=instruction,
        seed=layout,
        success=bool(success),
        steps=len(rows["actions"]),
        proprio=np.stack(rows["proprio"]).astype(np.float32),
        actions=np.stack(rows["actions"]).astype(np.float32),
        log_probs=np.asarray(rows["logp"], np.float32),
        values=np.asarray(rows["value"], np.float32),
        holds=np.asarray(rows["hold"], bool),
        ee_after=np.stack(rows["ee"]),
        images=np.stack(rows["img"]) if keep_images else None,
        latents=latents,
        cameras=settings.camera_names,
        policy_version=str(getattr(policy, "version", "")),
        hold_reasons=reasons,
        wall_seconds=time.monotonic() - started_wall,
    )


def episode_seed(seed: int, task: str, episode: int) -> int:
    """A layout seed per (run seed, task, episode index): the same whatever the order tasks are run in."""
    return int(
        np.random.SeedSequence([int(seed), zlib.crc32(task.encode()), int(episode)]).generate_state(1)[0]
    )


# ---- into the datasets and the store --------------------------------------------------------------------------


def to_transitions(episodes: Sequence[EpisodeResult], *, skip_holds: bool = True) -> Any:
    """Episodes (with images) as `train.datasets.Transitions`, exactly as `load_transitions` would give them from
    the store: holds skipped, sparse binary reward on the last step of a success, one instruction id per text."""
    from irevla_ros.train.datasets import DatasetError, transitions_from_episodes

    parts = []
    for i, ep in enumerate(episodes):
        if ep.images is None:
            raise DatasetError(
                f"episode {i} ({ep.task}) was run with keep_images=False: no images to train on"
            )
        keep = ~ep.holds if skip_holds else np.ones(ep.steps, bool)
        if not keep.any():
            continue
        arrays = {
            "images": ep.images[keep],
            "proprio": ep.proprio[keep],
            "actions": ep.actions[keep],
            "log_probs": ep.log_probs[keep],
        }
        parts.append((f"direct-{i:05d}-{ep.task}", ep.instruction, bool(ep.success), arrays))
    return transitions_from_episodes(parts)


def write_to_store(
    store: Any,
    episode: EpisodeResult,
    *,
    source: str,
    episode_id: str | None = None,
    started_ns: int | None = None,
    period_ns: int | None = None,
) -> Any:
    """Store an episode (with images) through the episode store's public API, as the trainer node does:
    one StepData per step, outcome and label source "simulator", the episode's layout seed as its scene seed;
    returns the catalogue row."""
    import uuid

    from irevla_ros.store.records import AssembledEpisode, EpisodeMeta, StepData

    if episode.images is None:
        raise ValueError(
            "an episode run with keep_images=False cannot be stored (the store keeps observations)"
        )
    eid = episode_id or f"ep-direct-{uuid.uuid4().hex[:12]}"
    period = period_ns if period_ns is not None else 100_000_000
    t0 = time.time_ns() if started_ns is None else int(started_ns)
    steps = []
    for k in range(episode.steps):
        stamp = t0 + k * period
        steps.append(
            StepData(
                episode_id=eid,
                step_index=k,
                stamp_ns=stamp,
                images={c: episode.images[k, i] for i, c in enumerate(episode.cameras)},
                image_stamps_ns={c: stamp for c in episode.cameras},
                proprioception=episode.proprio[k],
                proprioception_names=list(PROPRIOCEPTION_NAMES),
                instruction=episode.instruction,
                action=episode.actions[k],
                log_prob=None if math.isnan(float(episode.log_probs[k])) else float(episode.log_probs[k]),
                value=None if math.isnan(float(episode.values[k])) else float(episode.values[k]),
                policy_version=episode.policy_version,
                intervention=False,
                hold=bool(episode.holds[k]),
            )
        )
    meta = EpisodeMeta(
        episode_id=eid,
        task=episode.task,
        instruction=episode.instruction,
        policy_version=episode.policy_version,
        source=source,
        started_ns=t0,
        ended_ns=t0 + episode.steps * period,
        outcome=episode.outcome,
        label_source="simulator",
        expected_steps=episode.steps,
        scene_seed=episode.seed,
    )
    return store.write(AssembledEpisode(meta=meta, steps=steps, complete=True))
