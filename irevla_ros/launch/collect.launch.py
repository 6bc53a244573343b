"""ros2 launch irevla_ros collect.launch.py [hardware:=sim|robot|robot_ur|robot_servo]

Brings up the collection graph. The node list lives in irevla_ros.bringup.graph (shared with `irevla bringup`
on pip-only machines): this file only translates it into launch_ros actions.
"""

import tempfile
from pathlib import Path

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from irevla_ros.bringup.graph import (
    DEFAULT_CAMERAS,
    HARDWARE_PROFILES,
    collect_graph,
    process_parameter_paths,
    validate_graph,
    with_overrides,
)


def _nodes(context, *args, **kwargs):
    cameras = tuple(c for c in LaunchConfiguration("cameras").perform(context).split(",") if c)
    graph = collect_graph(LaunchConfiguration("hardware").perform(context), cameras)
    graph = with_overrides(graph, (), Path(tempfile.mkdtemp(prefix="irevla-launch-")))
    validate_graph(graph)  # fail before starting anything, naming the file and key
    return [
        Node(
            package="irevla_ros",
            executable=process.executable,
            # one executable may serve several nodes (two cameras): name single-node processes
            name=process.nodes[0].name if len(process.nodes) == 1 else None,
            namespace=process.nodes[0].namespace if len(process.nodes) == 1 else None,
            parameters=[str(p) for p in process_parameter_paths(graph, process)],
            output="screen",
            emulate_tty=True,
            sigterm_timeout=str(process.stop_timeout),  # after SIGINT (Ctrl-C), before SIGTERM
        )
        for process in graph.processes
    ]


def generate_launch_description():
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "hardware",
                default_value="sim",
                description="hardware profile: " + ", ".join(HARDWARE_PROFILES),
            ),
            DeclareLaunchArgument(
                "cameras",
                default_value=",".join(DEFAULT_CAMERAS),
                description="camera nodes, comma-separated",
            ),
            OpaqueFunction(function=_nodes),
        ]
    )
