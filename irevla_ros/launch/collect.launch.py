"""ros2 launch irevla_ros collect.launch.py hardware:=robot cameras:=camera,wrist_camera params_file:=my_cell.yaml
    [session:=demonstrate|policy]

Brings up the collection graph. The node list lives in irevla_ros.bringup.graph (shared with `irevla bringup`
on pip-only machines): this file only translates it into launch_ros actions, with the same failure policy:
a camera driver that dies is respawned (at most RESPAWN_MAX_RETRIES times), any other node's death shuts the
whole launch down (`ros2 launch --show-args irevla_ros collect.launch.py` lists the arguments).
"""

import inspect
import tempfile
from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from irevla_ros.bringup.graph import (
    DEFAULT_CAMERAS,
    HARDWARE_PROFILES,
    KNOWN_CAMERAS,
    RESPAWN_DELAY,
    RESPAWN_MAX_RETRIES,
    SESSIONS,
    collect_graph,
    process_parameter_paths,
    validate_graph,
    with_overrides,
)
from irevla_ros.paths import config_dir

_BOOL = ["true", "false"]


def _joy_installed():
    try:
        from ament_index_python.packages import get_package_share_directory

        get_package_share_directory("joy")
    except Exception:  # PackageNotFoundError, or no ament index at all
        return False
    return True


def _critical_exit(label):
    def on_exit(event, _context):
        return Shutdown(reason=f"{label} died (exit code {event.returncode}): a critical process")

    return on_exit


def _camera_exit(label):
    # launch respawns by itself; this counts the deaths so that a camera that keeps dying ends the launch as
    # it ends `irevla bringup`, also on launch versions without respawn_max_retries.
    deaths = [0]

    def on_exit(event, _context):
        deaths[0] += 1
        if deaths[0] > RESPAWN_MAX_RETRIES:
            return Shutdown(
                reason=f"{label} died (exit code {event.returncode}) after {RESPAWN_MAX_RETRIES} respawns"
            )
        return LogInfo(
            msg=f"{label} died (exit code {event.returncode}); respawning in {RESPAWN_DELAY:g} s "
            f"({deaths[0]} of {RESPAWN_MAX_RETRIES})"
        )

    return on_exit


def _respawn_arguments(process, label):
    if not process.respawn:
        return {"on_exit": _critical_exit(label)}
    kwargs = {"respawn": True, "respawn_delay": RESPAWN_DELAY, "on_exit": _camera_exit(label)}
    from launch.actions import ExecuteProcess

    if "respawn_max_retries" in inspect.signature(ExecuteProcess.__init__).parameters:
        kwargs["respawn_max_retries"] = RESPAWN_MAX_RETRIES
    return kwargs


def _nodes(context, *args, **kwargs):
    hardware = LaunchConfiguration("hardware").perform(context)
    cameras = tuple(c for c in LaunchConfiguration("cameras").perform(context).split(",") if c)
    params_file = LaunchConfiguration("params_file").perform(context)
    session = LaunchConfiguration("session").perform(context)
    graph = collect_graph(hardware, cameras, (params_file,) if params_file else (), session)
    overrides = []
    use_sim_time = LaunchConfiguration("use_sim_time").perform(context)
    if use_sim_time != "profile":
        overrides.append(f"/**.use_sim_time={use_sim_time}")
    graph = with_overrides(graph, overrides, Path(tempfile.mkdtemp(prefix="irevla-launch-")))
    validate_graph(graph)  # fail before starting anything, naming the file and key
    actions = []
    for process in graph.processes:
        # one executable may serve several nodes (the sim cell): only single-node processes are named
        single = len(process.nodes) == 1
        label = f"{process.executable} ({', '.join(n.fully_qualified_name for n in process.nodes)})"
        actions.append(
            Node(
                package="irevla_ros",
                executable=process.executable,
                name=process.nodes[0].name if single else None,
                namespace=process.nodes[0].namespace if single else None,
                parameters=[str(p) for p in process_parameter_paths(graph, process)],
                output="screen",
                emulate_tty=True,
                sigterm_timeout=str(process.stop_timeout),  # after SIGINT (Ctrl-C), before SIGTERM
                **_respawn_arguments(process, label),
            )
        )
    joy = LaunchConfiguration("joy").perform(context)
    # In simulation the simulated operator publishes /joy: joy_node only when asked for explicitly.
    if joy == "true" or (joy == "auto" and hardware != "sim" and _joy_installed()):
        if not _joy_installed():
            raise RuntimeError(
                "joy:=true but the joy package is not installed (apt install ros-$ROS_DISTRO-joy)"
            )
        actions.append(Node(package="joy", executable="joy_node", name="joy_node", output="screen"))
    if LaunchConfiguration("rviz").perform(context) == "true":
        actions.append(
            Node(
                package="rviz2",
                executable="rviz2",
                arguments=["-d", str(config_dir() / "irevla.rviz")],
                output="screen",
            )
        )
    return actions


def generate_launch_description():
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "hardware",
                default_value="sim",
                choices=list(HARDWARE_PROFILES),
                description="hardware profile (config/<hardware>.yaml): sim = MuJoCo cell; robot = Franka "
                "(franky); robot_ur = UR (ur_rtde); robot_servo = an arm run by its own ROS 2 driver + MoveIt Servo",
            ),
            DeclareLaunchArgument(
                "cameras",
                default_value=",".join(DEFAULT_CAMERAS),
                description="camera nodes, comma-separated; each runs as /<name>/<name> and the policy reads "
                f"/<name>/<name>/color/image_raw. The package configures {', '.join(KNOWN_CAMERAS)}; "
                "other names must be defined in params_file",
            ),
            DeclareLaunchArgument(
                "params_file",
                default_value="",
                description="your cell's parameter file (ROS 2 YAML), read after the package's files so its "
                "values win: workspace box, home, camera serials, user-named cameras",
            ),
            DeclareLaunchArgument(
                "session",
                default_value="profile",
                choices=list(SESSIONS),
                description="demonstrate: record demonstrations (robot profiles: by teleoperation); policy: run "
                "the VLA (Stage 1 live, operator takeovers); profile: the hardware profile's choice (sim: "
                "demonstrate, robot profiles: policy)",
            ),
            DeclareLaunchArgument(
                "use_sim_time",
                default_value="profile",
                choices=["profile", *_BOOL],
                description="use /clock for every node; 'profile': the hardware profile decides (sim: true)",
            ),
            DeclareLaunchArgument(
                "rviz",
                default_value="false",
                choices=_BOOL,
                description="start rviz2 with config/irevla.rviz",
            ),
            DeclareLaunchArgument(
                "joy",
                default_value="auto",
                choices=["auto", *_BOOL],
                description="start joy_node for the gamepad; auto: on a robot profile when the joy package "
                "is installed (in sim the simulated operator publishes /joy)",
            ),
            OpaqueFunction(function=_nodes),
        ]
    )
