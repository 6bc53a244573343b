"""bringup."""
