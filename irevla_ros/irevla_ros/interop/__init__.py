"""Episode exchange with the field's dataset formats (ROS-free)."""
