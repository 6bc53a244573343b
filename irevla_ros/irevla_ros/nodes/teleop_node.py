"""Teleop node: gamepad / SpaceMouse state to a stamped ArmCommand on /teleop/command.

device joy_topic: maps every /joy message (joy_node on an apt ROS machine, the simulated operator in the sim
cell), stamped with the message's own stamp (its time when it has none). device evdev / spacemouse: reads the
device itself (pip-only machines) and publishes /joy at `rate`, so the episode manager's label/reset/pause buttons
work the same, and maps each of those. The command is a hold while the deadman is released; its policy_version says
whether the takeover button is held (teleop:engaged / teleop:idle), which /teleop/engaged repeats on each change.
Status on /diagnostics ("<name>: device"): the device reader's error (ERROR), a /joy that cannot be mapped (WARN),
the newest /joy's age, deadman and takeover buttons (`irevla_ros.diagnostics`).
"""

from __future__ import annotations

from rclpy.node import Node
from sensor_msgs.msg import Joy
from std_msgs.msg import Bool

from irevla_interfaces.msg import ArmCommand
from irevla_ros import topics
from irevla_ros.diagnostics import Status, TeleopSnapshot, teleop_status
from irevla_ros.node_parameters import TELEOP
from irevla_ros.nodes.common import LATCHED_QOS, declare_parameters, run_nodes, time_to_ns
from irevla_ros.nodes.diagnostics_publisher import DiagnosticsPublisher
from irevla_ros.param_spec import from_parameters
from irevla_ros.teleop.devices import open_device
from irevla_ros.teleop.mapping import ENGAGED, IDLE, JoyLayoutError, TeleopMapping, joy_to_command


def command_msg(command: object, stamp: object) -> ArmCommand:
    msg = ArmCommand(
        ee_delta=[float(x) for x in command.ee_delta],  # type: ignore[attr-defined]
        gripper=float(command.gripper),  # type: ignore[attr-defined]
        hold=bool(command.hold),  # type: ignore[attr-defined]
        policy_version=ENGAGED if command.engaged else IDLE,  # type: ignore[attr-defined]
    )
    msg.header.stamp = stamp
    msg.header.frame_id = "base"
    return msg


class TeleopNode(Node):
    def __init__(self, name: str = "teleop", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        p = declare_parameters(self, TELEOP)
        self.mapping = from_parameters(TeleopMapping, p)
        self.device = str(p["device"])
        self.device_path = str(p["device_path"])
        self._gripper = -1.0  # open until a gripper button says otherwise
        self._engaged: bool | None = None
        self.commands = 0
        # Diagnostics: ROS time of the newest /joy handled, why it could not be mapped, the deadman's state.
        self._joy_at: float | None = None
        self._layout_error: str | None = None
        self._deadman = False
        self._command_pub = self.create_publisher(ArmCommand, topics.TELEOP_COMMAND, 10)
        self._engaged_pub = self.create_publisher(Bool, topics.TELEOP_ENGAGED, LATCHED_QOS)
        self._reader = None
        if self.device == "joy_topic":
            self.create_subscription(Joy, topics.JOY, self._on_joy, 10)
        else:
            self._reader = open_device(self.device, str(p["device_path"]))
            self._joy_pub = self.create_publisher(Joy, topics.JOY, 10)
            self.create_timer(1.0 / float(p["rate"]), self._poll)  # type: ignore[arg-type]
        self.diagnostics = DiagnosticsPublisher(self, self._statuses)
        self.get_logger().info(
            f"teleop from {self.device}: deadman button {self.mapping.enable_button}, "
            f"takeover button {self.mapping.takeover}"
        )

    def _poll(self) -> None:
        assert self._reader is not None
        if self._reader.error is not None:
            # The arm must not keep the last deflection: hold, and say why once a few seconds.
            self.get_logger().error(str(self._reader.error), throttle_duration_sec=5.0)
            axes, buttons = [], []
        else:
            axes, buttons = self._reader.snapshot()
        joy = Joy(axes=[float(a) for a in axes], buttons=[int(b) for b in buttons])
        joy.header.stamp = self.get_clock().now().to_msg()
        if axes:
            self._joy_pub.publish(joy)
        self._on_joy(joy)

    def _on_joy(self, msg: Joy) -> None:
        stamp = msg.header.stamp if time_to_ns(msg.header.stamp) > 0 else self.get_clock().now().to_msg()
        self._joy_at = self.get_clock().now().nanoseconds * 1e-9
        try:
            command = joy_to_command(self.mapping, list(msg.axes), list(msg.buttons), self._gripper)
        except JoyLayoutError as exc:
            self._layout_error, self._deadman = str(exc), False
            self.get_logger().error(f"/joy ignored, holding: {exc}", throttle_duration_sec=5.0)
            hold = ArmCommand(ee_delta=[0.0, 0.0, 0.0], gripper=self._gripper, hold=True, policy_version=IDLE)
            hold.header.stamp = stamp
            self._command_pub.publish(hold)
            self._set_engaged(False)
            return
        self._gripper = command.gripper
        self._layout_error, self._deadman = None, not command.hold
        self._command_pub.publish(command_msg(command, stamp))
        self.commands += 1
        self._set_engaged(command.engaged)

    def _set_engaged(self, engaged: bool) -> None:
        if engaged != self._engaged:
            self._engaged = engaged
            self._engaged_pub.publish(Bool(data=engaged))
            self.get_logger().info("teleop engaged" if engaged else "teleop released")

    def _statuses(self) -> list[Status]:
        reader = self._reader
        error = reader.error if reader is not None else None
        joy_at = self._joy_at
        snapshot = TeleopSnapshot(
            device=self.device,
            device_error=None if error is None else str(error),
            joy_age=None if joy_at is None else self.get_clock().now().nanoseconds * 1e-9 - joy_at,
            layout_error=self._layout_error,
            deadman=self._deadman,
            engaged=bool(self._engaged),
            commands=self.commands,
        )
        hardware_id = self.device if reader is None else f"{self.device}:{self.device_path or reader.name}"
        return [teleop_status(self.get_name(), hardware_id, snapshot)]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


def main(args: list[str] | None = None) -> int:
    return run_nodes(lambda context: [TeleopNode(context=context)], args)
