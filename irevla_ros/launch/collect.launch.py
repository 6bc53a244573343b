"""ros2 launch irevla_ros collect.launch.py [hardware:=sim|robot]

Brings up the collection graph. The node list lives in irevla_ros.bringup.graph (shared with `irevla bringup`
on pip-only machines): this file only translates it into launch_ros actions.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from irevla_ros.bringup.graph import collect_graph, process_parameter_paths, validate_graph


def _nodes(context, *args, **kwargs):
    graph = collect_graph(LaunchConfiguration("hardware").perform(context))
    validate_graph(graph)  # fail before starting anything, naming the file and key
    return [
        Node(
            package="irevla_ros",
            executable=process.executable,
            parameters=[str(p) for p in process_parameter_paths(graph, process)],
            output="screen",
            emulate_tty=True,
        )
        for process in graph.processes
    ]


def generate_launch_description():
    return LaunchDescription(
        [
            DeclareLaunchArgument("hardware", default_value="sim", description="sim or robot"),
            OpaqueFunction(function=_nodes),
        ]
    )
