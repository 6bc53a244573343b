"""The ROS parameters of every node kind: one table, read by the nodes (declaration with descriptors and ranges),
by `irevla bringup` (validation of config/*.yaml before start) and by the docs."""

from __future__ import annotations

from irevla_ros.params import ParamSpec

DEFAULT_TASKS = ["button-press-v3", "drawer-open-v3", "door-open-v3", "window-open-v3", "window-close-v3"]

SIM_CELL = (
    ParamSpec("tasks", DEFAULT_TASKS, "Meta-World v3 tasks the cell cycles through"),
    ParamSpec("seed", 0, "seed of the per-episode scene randomisation", min=0),
    ParamSpec("image_width", 128, "rendered image width (pixels)", min=16, max=1920),
    ParamSpec("image_height", 128, "rendered image height (pixels)", min=16, max=1080),
    ParamSpec("cameras", ["corner", "gripperPOV"], "MuJoCo cameras the cell may render (validated at start)"),
    ParamSpec(
        "camera_nodes", ["camera"], "camera nodes hosted in this process (set by the graph description)"
    ),
    ParamSpec(
        "control_period", 0.1, "simulated seconds per control period (one arm command)", min=0.0125, max=1.0
    ),
    ParamSpec(
        "max_wall_wait",
        2.0,
        "wall seconds the cell waits for the controller's command before advancing with the arm held",
        min=0.01,
        max=60.0,
    ),
    ParamSpec(
        "real_time_factor", 0.0, "0: as fast as the graph keeps up; 1: no faster than real time", min=0.0
    ),
)

CAMERA = (
    ParamSpec("backend", "sim", "camera backend", choices=("sim", "opencv", "realsense")),
    ParamSpec("fps", 10.0, "publish rate (Hz, ROS time)", min=0.5, max=120.0),
    ParamSpec("frame_id", "camera_color_optical_frame", "frame of the published images"),
    ParamSpec("width", 128, "published width (pixels); frames of another size are resized", min=16, max=1920),
    ParamSpec("height", 128, "published height (pixels)", min=16, max=1080),
    ParamSpec("sim_camera", "corner", "sim backend: MuJoCo camera name"),
    ParamSpec("source", "0", "opencv backend: V4L2 index, /dev/videoN or a video file"),
    ParamSpec("loop", True, "opencv backend: restart a video file at its end"),
    ParamSpec("serial_no", "", "realsense backend: device serial (empty: first device)"),
    ParamSpec("profile", "640x480x30", "realsense backend: WIDTHxHEIGHTxFPS of colour and depth"),
    ParamSpec("enable_depth", True, "realsense backend: publish depth aligned to colour"),
    ParamSpec("playback_file", "", "realsense backend: play a recorded .db3/.bag instead of a device"),
)

ARM_CONTROLLER = (
    ParamSpec("backend", "sim", "arm backend", choices=("sim", "franky")),
    ParamSpec("franky_host", "172.16.0.2", "franky backend: robot (or franky-sim) address"),
    ParamSpec(
        "franky_dynamics_factor", 0.1, "franky backend: velocity/acceleration scaling", min=0.01, max=1.0
    ),
    ParamSpec("action_frame", "base", "frame of the end-effector deltas", choices=("base",)),
    ParamSpec("action_scale", 0.01, "metres per unit of normalised policy action", min=1e-4, max=0.1),
    ParamSpec(
        "max_abs_action", 10.0, "normalised actions above this magnitude are rejected as garbage", min=1.0
    ),
    ParamSpec("workspace_low", [-0.525, 0.348, -0.0525], "workspace box lower corner (m, base frame)"),
    ParamSpec("workspace_high", [0.525, 1.025, 0.7], "workspace box upper corner (m, base frame)"),
    ParamSpec("max_step", 0.01, "largest end-effector move per command (m)", min=1e-4, max=0.1),
    ParamSpec("max_speed", 0.25, "largest end-effector speed (m/s)", min=1e-3, max=1.0),
    ParamSpec("gripper_min", 0.0, "smallest gripper command (normalised opening)", min=0.0, max=1.0),
    ParamSpec("gripper_max", 1.0, "largest gripper command (normalised opening)", min=0.0, max=1.0),
    ParamSpec(
        "watchdog_timeout", 0.3, "hold the arm when the newest action is older than this (s)", min=0.01
    ),
    ParamSpec("home", [0.0, 0.6, 0.2], "reset-to-home end-effector position (m)"),
    ParamSpec("home_gripper", 1.0, "gripper opening at home", min=0.0, max=1.0),
    ParamSpec("state_rate", 10.0, "JointState / pose publish rate (Hz)", min=1.0, max=1000.0),
)

POLICY = (
    ParamSpec("policy", "scripted_expert", "active policy", choices=("scripted_expert", "random", "vla")),
    ParamSpec("control_rate", 10.0, "control rate (Hz, ROS time)", min=0.5, max=100.0),
    ParamSpec("cameras", ["/camera/camera/color/image_raw"], "image topics the observation is built from"),
    ParamSpec("image_width", 128, "policy input width (pixels)", min=16, max=1024),
    ParamSpec("image_height", 128, "policy input height (pixels)", min=16, max=1024),
    ParamSpec("max_image_age", 0.25, "a camera frame older than this is stale (s)", min=0.0),
    ParamSpec(
        "max_camera_skew", 0.1, "largest stamp difference between cameras of one observation (s)", min=0.0
    ),
    ParamSpec("max_state_age", 0.25, "an arm pose (~/ee_pose) older than this is stale (s)", min=0.0),
    ParamSpec(
        "action_noise", 0.0, "std of Gaussian noise added to the scripted expert (normalised units)", min=0.0
    ),
    ParamSpec("seed", 0, "random seed (noise, random policy)", min=0),
    ParamSpec("model_store", "models", "model store folder (VLA policy)"),
    ParamSpec("version", "", "model-store version to start with (empty: newest)"),
    ParamSpec("deterministic", False, "VLA: act with the mean action (evaluation) instead of sampling"),
)

EPISODE_MANAGER = (
    ParamSpec("tasks", DEFAULT_TASKS, "tasks cycled through, one per episode"),
    ParamSpec("num_episodes", 0, "episodes to run, then idle (0: until stopped)", min=0),
    ParamSpec("auto_start", True, "start the next episode after a reset without an operator"),
    ParamSpec(
        "required_nodes",
        ["/policy", "/trainer", "/arm_controller"],
        "the session starts once these nodes are up and listening to the episode events",
    ),
    ParamSpec(
        "episode_timeout", 15.0, "an episode running this long (s, ROS time) ends as a timeout", min=0.1
    ),
    ParamSpec("success_source", "simulator", "automatic outcome source", choices=("simulator", "none")),
    ParamSpec("label_wait", 0.0, "after an episode ends, wait this long for an operator label (s)", min=0.0),
    ParamSpec("reset_timeout", 10.0, "a reset taking longer than this (s, wall) aborts the session", min=0.1),
    ParamSpec("joy_success_button", 0, "gamepad button: label success", min=-1),
    ParamSpec("joy_failure_button", 1, "gamepad button: label failure", min=-1),
    ParamSpec("joy_reset_button", 2, "gamepad button: reset (the teleop reset button)", min=-1),
    ParamSpec("joy_pause_button", 3, "gamepad button: pause / resume", min=-1),
    ParamSpec(
        "source",
        "expert",
        "episode source recorded in the catalogue",
        choices=("expert", "policy", "intervention"),
    ),
)

TRAINER = (
    ParamSpec(
        "control_period",
        0.1,
        "seconds per control period: stored steps must be this far apart",
        min=0.0125,
        max=1.0,
    ),
    ParamSpec("store_path", "data/store", "episode store folder"),
    ParamSpec("status_period", 1.0, "trainer status publish period (s)", min=0.05),
    ParamSpec("iterate", True, "run iRe-VLA iterations (Stage 1 during sessions, Stage 2 between them)"),
    ParamSpec("run_dir", "data/trainer", "iteration state, checkpoints, TensorBoard logs and reports"),
    ParamSpec("model_store", "models", "model store folder: versions are read from and written to it"),
    ParamSpec("initial_version", "", "version the first iteration starts from (empty: the newest)"),
    ParamSpec("stage1_enabled", True, "online RL on the heads (VLM frozen) during sessions"),
    ParamSpec("stage1_algorithm", "ppo", "Stage 1 algorithm", choices=("ppo", "sacfd")),
    ParamSpec("episodes_per_update", 2, "PPO: new policy episodes per Stage 1 update", min=1),
    ParamSpec("push_every_episodes", 2, "push Stage 1 head updates to the policy every N episodes", min=1),
    ParamSpec("push_every_seconds", 0.0, "... or every N seconds (0: by episodes only)", min=0.0),
    ParamSpec(
        "episode_budget", 0, "policy episodes per session, then Stage 2 (0: the operator decides)", min=0
    ),
    ParamSpec("plateau_window", 0, "end a session when N episodes did not beat the N before (0: off)", min=0),
    ParamSpec(
        "plateau_delta", 0.05, "success-rate gain below which a session has plateaued", min=0.0, max=1.0
    ),
    ParamSpec("auto_iterate", True, "start Stage 2 by itself when a session ends by budget or plateau"),
    ParamSpec("max_iterations", 0, "stop iterating after N iterations (0: never)", min=0),
    ParamSpec("sft_steps", 150, "Stage 2 optimiser steps", min=1),
    ParamSpec("sft_batch_size", 16, "Stage 2 batch size", min=1),
    ParamSpec("rl_fraction", 0.5, "share of each Stage 2 batch drawn from D_RL", min=0.0, max=1.0),
    ParamSpec(
        "stage2_launcher",
        "local",
        "where Stage 2 runs: local, torchrun, or a remote command template with {job}",
    ),
    ParamSpec("stage2_nproc", 1, "torchrun processes for Stage 2", min=1),
    ParamSpec("validation_tasks", DEFAULT_TASKS, "simulation: tasks the candidate is evaluated on"),
    ParamSpec("validation_episodes", 0, "simulation: evaluation episodes per task (0: checks only)", min=0),
    ParamSpec("validation_margin", 0.1, "promote unless the success rate drops by more", min=0.0, max=1.0),
)

SCHEMAS: dict[str, tuple[ParamSpec, ...]] = {
    "sim_cell": SIM_CELL,
    "camera": CAMERA,
    "arm_controller": ARM_CONTROLLER,
    "policy": POLICY,
    "episode_manager": EPISODE_MANAGER,
    "trainer": TRAINER,
}
