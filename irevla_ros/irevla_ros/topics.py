"""Topic and service names of the graph, in one place (realsense-ros naming for cameras)."""

ARM_CONTROLLER_NODE = "arm_controller"  # subscribes to ACTION, offers the /arm_controller/* services
CAMERA_IMAGE = "/camera/camera/color/image_raw"
ACTION = "/policy/action"  # irevla_interfaces/ArmCommand
STEP_RECORDS = "/policy/step_records"  # irevla_interfaces/StepRecord
POLICY_STATUS = "/policy/status"  # diagnostic_msgs/DiagnosticArray (missed ticks, holds, version)
EPISODE_EVENTS = "/episode_manager/events"  # irevla_interfaces/EpisodeEvent
SESSION_STATUS = "/episode_manager/status"  # irevla_interfaces/SessionStatus
OVERLAY_MARKERS = "/episode_manager/overlay"  # visualization_msgs/MarkerArray
OVERLAY_IMAGE = "/episode_manager/overlay/image_raw"  # sensor_msgs/Image annotated with the outcome
EPISODE_STORED = "/trainer/episode_stored"  # irevla_interfaces/EpisodeStored
TRAINER_STATUS = "/trainer/status"  # irevla_interfaces/TrainerStatus
JOINT_STATES = "/joint_states"
EE_POSE = "/arm_controller/ee_pose"  # geometry_msgs/PoseStamped
GRIPPER_STATE = "/arm_controller/gripper_state"  # sensor_msgs/JointState "gripper_opening" (0 closed, 1 open)
TF = "/tf"  # tf2_msgs/TFMessage: base_frame -> ee_frame
JOY = "/joy"  # sensor_msgs/Joy (gamepad: labels, reset, pause, teleop)
TELEOP_COMMAND = (
    "/teleop/command"  # irevla_interfaces/ArmCommand (stamped); policy_version: teleop:engaged|idle
)
TELEOP_ENGAGED = "/teleop/engaged"  # std_msgs/Bool: the takeover button is held
SIM_SUCCESS = "/sim/success"  # std_msgs/Bool, the simulator's success signal
SIM_EXPERT_ACTION = (
    "/sim/expert_action"  # irevla_interfaces/ArmCommand (stamped), Meta-World's scripted expert
)
SIM_RESET = "/sim/reset_episode"  # irevla_interfaces/ResetEpisode
ESTOP = "/arm_controller/estop"
CLEAR_ESTOP = "/arm_controller/clear_estop"
RESET_HOME = "/arm_controller/reset_home"
LABEL_SUCCESS = "/episode_manager/label_success"
LABEL_FAILURE = "/episode_manager/label_failure"
RESET_EPISODE = "/episode_manager/reset"
PAUSE = "/episode_manager/pause"
RESUME = "/episode_manager/resume"
RUN_ITERATION = "/trainer/run_iteration"  # irevla_interfaces/RunIteration action: end the session, iterate
POLICY_VERSION = "/trainer/policy_version"  # irevla_interfaces/PolicyVersion (latched): versions to run
ROLLBACK = "/policy/rollback"  # std_srvs/Trigger: back to the previous version
SELECT_VERSION = "/policy/select_version"  # irevla_interfaces/SelectPolicyVersion
