"""Executables this package installs: the one list that setup.py, the graph description and the tests read.

Plain data, no imports, so setup.py can read it before the package is installed.
"""

NODE_EXECUTABLES: dict[str, str] = {
    "camera_node": "irevla_ros.nodes.camera_node:main",
    "arm_controller_node": "irevla_ros.nodes.arm_controller_node:main",
    "policy_node": "irevla_ros.nodes.policy_node:main",
    "episode_manager_node": "irevla_ros.nodes.episode_manager_node:main",
    "trainer_node": "irevla_ros.nodes.trainer_node:main",
    "sim_cell_node": "irevla_ros.nodes.sim_cell_node:main",
    "teleop_node": "irevla_ros.nodes.teleop_node:main",
    "sim_operator_node": "irevla_ros.nodes.sim_operator_node:main",
}

TOOLS: dict[str, str] = {
    "irevla": "irevla_ros.cli:main",
}
