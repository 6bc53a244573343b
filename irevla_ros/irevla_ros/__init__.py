"""irevla_ros: robot-side iRe-VLA (arXiv 2501.16664) for ROS 2."""

from irevla_ros.dds_profile import use_default_profile

__version__ = "0.1.0"

# Before any rclpy.init of this process: every node, verb, benchmark and test imports the package first.
use_default_profile()
