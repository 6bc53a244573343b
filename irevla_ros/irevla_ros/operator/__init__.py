"""Operator verbs without ros2cli: thin rclpy clients of the graph's services, action and status topics.

`view` formats what they receive and says what to check when nothing answers (no ROS imports, tested without
DDS); `client` holds the rclpy part; `verbs` wires both into `irevla <verb>`.
"""
