"""irevla_ros: robot-side iRe-VLA (arXiv 2501.16664) for ROS 2."""

__version__ = "0.1.0"
