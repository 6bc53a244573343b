"""Teleoperation without ROS: gamepad / SpaceMouse state (sensor_msgs/Joy layout) to arm commands and back."""
