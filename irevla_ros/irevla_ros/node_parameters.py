"""The ROS parameters of every node kind: one table, read by the nodes (declaration with descriptors and ranges),
by `irevla bringup` (validation of config/*.yaml before start) and by the docs.

Settings that a config dataclass holds are generated from it (`parameter_specs`), never copied here: the arm
controller's safety limits from `SafetyLimits`, the trainer's iteration, Stage 1 and Stage 2 settings from
`IterationConfig` (dotted names: `stage1.ppo.lr`, `stage2.steps`). Only what a node alone uses is listed here.
"""

from __future__ import annotations

from irevla_ros.param_spec import ParamSpec, parameter_specs
from irevla_ros.safety import SafetyLimits
from irevla_ros.sim import DEFAULT_TASKS as _TASKS
from irevla_ros.teleop.mapping import TeleopMapping
from irevla_ros.train.config import IterationConfig

DEFAULT_TASKS = list(_TASKS)

# Settings of the whole graph: every node declares them (a `/**` entry gives them to all) and `validate_graph`
# refuses a graph whose nodes would see different values. The policy ticks, the simulated cell steps and the
# direct rollout advances once per control period: one setting, so they cannot disagree.
GRAPH_WIDE = (
    ParamSpec(
        "control_period",
        0.1,
        "seconds (ROS time) per control period: one policy tick, one arm command, one simulated step",
        min=0.0125,  # one Meta-World physics frame (5 substeps of 2.5 ms)
        max=1.0,
    ),
)

SIM_CELL = (
    *GRAPH_WIDE,
    ParamSpec("tasks", DEFAULT_TASKS, "Meta-World v3 tasks the cell cycles through"),
    ParamSpec("seed", 0, "seed of the per-episode scene randomisation", min=0),
    ParamSpec("image_width", 128, "rendered image width (pixels)", min=16, max=1920),
    ParamSpec("image_height", 128, "rendered image height (pixels)", min=16, max=1080),
    ParamSpec("cameras", ["corner", "gripperPOV"], "MuJoCo cameras the cell may render (validated at start)"),
    ParamSpec(
        "camera_nodes", ["camera"], "camera nodes hosted in this process (set by the graph description)"
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
    *GRAPH_WIDE,
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
    ParamSpec("initial_reset", False, "realsense backend: hardware reset of the device before starting it"),
    ParamSpec("playback_file", "", "realsense backend: play a recorded .db3/.bag instead of a device"),
)

ARM_CONTROLLER = (
    *GRAPH_WIDE,
    # A backend's own parameters are named "<backend>_<its keyword>" (the node passes them on with the prefix cut).
    ParamSpec("backend", "sim", "arm backend", choices=("sim", "franky", "ur_rtde", "servo")),
    ParamSpec("franky_host", "172.16.0.2", "franky backend: robot (or franky-sim) address"),
    ParamSpec(
        "franky_dynamics_factor", 0.1, "franky backend: velocity/acceleration scaling", min=0.01, max=1.0
    ),
    ParamSpec("ur_rtde_host", "192.168.1.102", "ur_rtde backend: UR controller (or protocol peer) address"),
    ParamSpec("ur_rtde_frequency", 500.0, "ur_rtde backend: RTDE rate (Hz; CB3: 125)", min=1.0, max=500.0),
    ParamSpec("ur_rtde_servo_rate", 125.0, "ur_rtde backend: servoL stream rate (Hz)", min=10.0, max=500.0),
    ParamSpec("ur_rtde_lookahead_time", 0.1, "ur_rtde backend: servoL lookahead (s)", min=0.03, max=0.2),
    ParamSpec("ur_rtde_gain", 300.0, "ur_rtde backend: servoL gain", min=100.0, max=2000.0),
    ParamSpec("ur_rtde_home_speed", 0.05, "ur_rtde backend: move_home moveL speed (m/s)", min=0.001, max=0.5),
    ParamSpec("ur_rtde_gripper", "robotiq", "ur_rtde backend: gripper", choices=("robotiq", "none")),
    # servo: an arm run by its own ROS 2 driver + MoveIt Servo (or a Cartesian-velocity forward controller).
    ParamSpec(
        "servo_command_mode",
        "twist",
        "servo backend: twist (TwistStamped to MoveIt Servo) or velocity_array (Float64MultiArray vx..wz)",
        choices=("twist", "velocity_array"),
    ),
    ParamSpec("servo_command_topic", "/servo_node/delta_twist_cmds", "servo backend: command topic"),
    ParamSpec("servo_twist_frame", "", "servo backend: the twist's header frame (empty: base_frame)"),
    ParamSpec("servo_rate", 50.0, "servo backend: command stream rate (Hz)", min=5.0, max=1000.0),
    ParamSpec(
        "servo_period", 0.1, "servo backend: twist = (target - current) / period (s)", min=0.01, max=2.0
    ),
    ParamSpec("servo_max_angular_speed", 0.5, "servo backend: angular speed cap (rad/s)", min=0.001, max=3.2),
    ParamSpec(
        "servo_state_source",
        "tf",
        "servo backend: end-effector pose from tf or pose_topic",
        choices=("tf", "pose"),
    ),
    ParamSpec("servo_joint_states_topic", "/joint_states", "servo backend: the driver's joint states"),
    ParamSpec("servo_pose_topic", "", "servo backend: PoseStamped of the end effector (state_source pose)"),
    ParamSpec(
        "servo_joint_names",
        [
            "shoulder_pan_joint",
            "shoulder_lift_joint",
            "elbow_joint",
            "wrist_1_joint",
            "wrist_2_joint",
            "wrist_3_joint",
        ],
        "servo backend: the arm's joints in the driver's /joint_states, in order",
    ),
    ParamSpec(
        "servo_gripper_joints",
        ["fr3_finger_joint1", "fr3_finger_joint2"],
        "servo backend: finger joints whose positions sum to the gripper width (absent: the commanded opening)",
    ),
    ParamSpec("servo_gripper_max_width", 0.08, "servo backend: fully open width (m)", min=0.001, max=1.0),
    ParamSpec(
        "servo_state_timeout",
        0.5,
        "servo backend: driver state older than this is stale (s)",
        min=0.01,
        max=10.0,
    ),
    ParamSpec(
        "servo_connect_timeout", 10.0, "servo backend: wait for the driver's state (s)", min=0.1, max=120.0
    ),
    ParamSpec("action_frame", "base", "frame of the end-effector deltas", choices=("base",)),
    # Standard robot state (REP-105 style): /tf base_frame -> ee_frame, ~/ee_pose in base_frame.
    ParamSpec("base_frame", "world", "robot base frame (fr3_link0, base, world for the simulated cell)"),
    ParamSpec("ee_frame", "hand", "end-effector frame (fr3_hand_tcp, tool0, hand for the simulated cell)"),
    ParamSpec("state_rate", 10.0, "JointState / pose publish rate (Hz)", min=1.0, max=1000.0),
    *parameter_specs(SafetyLimits),
)

POLICY = (
    *GRAPH_WIDE,
    ParamSpec("policy", "scripted_expert", "active policy", choices=("scripted_expert", "random", "vla")),
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
    ParamSpec(
        "expert_command_topic",
        "/sim/expert_action",
        "ArmCommand topic the scripted_expert policy follows (/teleop/command: teleoperated demonstrations)",
    ),
    ParamSpec("teleop_max_age", 0.25, "a teleop command older than this no longer takes over (s)", min=0.0),
)

EPISODE_MANAGER = (
    *GRAPH_WIDE,
    ParamSpec("tasks", DEFAULT_TASKS, "tasks cycled through, one per episode"),
    ParamSpec("num_episodes", 0, "episodes to run, then idle (0: until stopped)", min=0),
    ParamSpec("auto_start", True, "start the next episode after a reset without an operator"),
    ParamSpec(
        "required_nodes",
        ["/policy", "/trainer", "/arm_controller"],
        "the session starts once these nodes are up and listening to the episode events (the trainer and the "
        "arm controller listen once their step records resp. actions have a publisher)",
    ),
    ParamSpec(
        "episode_timeout", 15.0, "an episode running this long (s, ROS time) ends as a timeout", min=0.1
    ),
    ParamSpec("success_source", "simulator", "automatic outcome source", choices=("simulator", "none")),
    ParamSpec("label_wait", 0.0, "after an episode ends, wait this long for an operator label (s)", min=0.0),
    ParamSpec(
        "reset_timeout",
        10.0,
        "a reset unanswered this long (s, wall) is abandoned as failed and tried again after a back-off; on a robot"
        " keep it above the arm controller's own homing deadline (60 s)",
        min=0.1,
    ),
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

TELEOP = (
    *GRAPH_WIDE,
    ParamSpec(
        "device",
        "joy_topic",
        "joy_topic: map /joy (joy_node); evdev / spacemouse: read the device and publish /joy too",
        choices=("joy_topic", "evdev", "spacemouse"),
    ),
    ParamSpec("device_path", "", "evdev: /dev/input/eventN; spacemouse: hidraw path (empty: first found)"),
    ParamSpec("rate", 20.0, "device modes: /joy and command publish rate (Hz)", min=1.0, max=1000.0),
    *parameter_specs(TeleopMapping),
)

SIM_OPERATOR = (
    *GRAPH_WIDE,
    ParamSpec("demonstrate", False, "drive expert episodes: /joy with the deadman held, from the expert"),
    ParamSpec("takeover_probability", 0.0, "chance per policy episode of a takeover", min=0.0, max=1.0),
    ParamSpec("takeover_start", 10, "step of a probability takeover", min=0),
    ParamSpec("stall_steps", 0, "take over after this many steps without progress (0: never)", min=0),
    ParamSpec(
        "stall_distance", 0.005, "the arm moving less than this over stall_steps is no progress (m)", min=0.0
    ),
    ParamSpec("takeover_steps", 10, "steps a takeover lasts before handing back", min=1),
    ParamSpec("seed", 0, "seed of the per-episode takeover draw", min=0),
    *parameter_specs(TeleopMapping),
)

TRAINER = (
    *GRAPH_WIDE,
    ParamSpec("store_path", "data/store", "episode store folder"),
    ParamSpec("status_period", 1.0, "trainer status publish period (s)", min=0.05),
    ParamSpec(
        "disk_warn_free_gb",
        10.0,
        "/diagnostics WARN below this much free disk space at the store (GB)",
        min=0.0,
    ),
    ParamSpec(
        "disk_error_free_gb",
        2.0,
        "/diagnostics ERROR below this much free disk space at the store (GB)",
        min=0.0,
    ),
    ParamSpec("iterate", True, "run iRe-VLA iterations (Stage 1 during sessions, Stage 2 between them)"),
    ParamSpec("run_dir", "data/trainer", "iteration state, checkpoints, TensorBoard logs and reports"),
    ParamSpec("model_store", "models", "model store folder: versions are read from and written to it"),
    ParamSpec("initial_version", "", "version the first iteration starts from (empty: the newest)"),
    *parameter_specs(IterationConfig),
)

# The config dataclasses a node kind builds from its parameters: `validate_graph` builds them too, so a value
# that is in range but inconsistent with another (home outside the box) fails before anything starts.
CONFIGS: dict[str, tuple[type, ...]] = {
    "arm_controller": (SafetyLimits,),
    "trainer": (IterationConfig,),
    "teleop": (TeleopMapping,),
    "sim_operator": (TeleopMapping,),
}

SCHEMAS: dict[str, tuple[ParamSpec, ...]] = {
    "sim_cell": SIM_CELL,
    "camera": CAMERA,
    "arm_controller": ARM_CONTROLLER,
    "policy": POLICY,
    "episode_manager": EPISODE_MANAGER,
    "trainer": TRAINER,
    "teleop": TELEOP,
    "sim_operator": SIM_OPERATOR,
}
