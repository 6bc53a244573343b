"""Simulated operator (sim cell only): a person at the gamepad, played by Meta-World's scripted expert.

It publishes /joy, never commands: teleop_node maps it like a real gamepad's, so demonstrations and takeovers
go through the very path a person's do (/joy -> teleop_node -> /teleop/command -> policy node -> arm controller).
For each /sim/expert_action of time t it publishes one /joy stamped t (the policy's tick of t waits for the teleop
command of t under simulated time), the expert's action through the inverse of the teleop mapping:
- `demonstrate`: the deadman held all the time (teleoperated demonstrations: the policy node's
  expert_command_topic is /teleop/command);
- in a policy episode, a takeover (deadman/takeover held) of `takeover_steps` steps: from step `takeover_start`
  with probability `takeover_probability` per episode, and/or once the arm moved less than `stall_distance` over
  `stall_steps` steps; released otherwise, which hands back to the policy.
With neither configured it publishes nothing, so the policy waits on no teleop input.
"""

from __future__ import annotations

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.node import Node
from sensor_msgs.msg import Joy

from irevla_interfaces.msg import ArmCommand, EpisodeEvent
from irevla_ros import topics
from irevla_ros.node_parameters import SIM_OPERATOR
from irevla_ros.nodes.common import RELIABLE_QOS, declare_parameters, run_nodes, time_to_ns
from irevla_ros.param_spec import from_parameters
from irevla_ros.teleop.mapping import TeleopMapping, command_to_joy


class TakeoverRule:
    """When the simulated operator takes over a policy episode (plain Python: steps in, engaged out)."""

    def __init__(
        self, probability: float, start: int, stall_steps: int, stall_distance: float, steps: int, seed: int
    ) -> None:
        self.probability, self.start, self.steps = probability, start, steps
        self.stall_steps, self.stall_distance, self.seed = stall_steps, stall_distance, seed
        self.episodes = 0
        self._until = -1  # first step after the running takeover
        self._planned: int | None = None
        self._positions: list[np.ndarray] = []

    @property
    def enabled(self) -> bool:
        return self.probability > 0 or self.stall_steps > 0

    def begin_episode(self) -> None:
        rng = np.random.default_rng([self.seed, self.episodes])
        self.episodes += 1
        self._planned = self.start if rng.random() < self.probability else None
        self._until = -1
        self._positions = []

    def engaged(self, step: int, position: np.ndarray | None) -> bool:
        """Whether the operator holds the arm at `step` (called once per step, in order)."""
        if step < self._until:
            return True
        if self._planned is not None and step >= self._planned:
            self._planned = None
            self._until = step + self.steps
            return True
        if position is not None:
            self._positions.append(position)
        if self.stall_steps > 0 and len(self._positions) > self.stall_steps:
            window = self._positions[-self.stall_steps - 1 :]
            if float(np.linalg.norm(window[-1] - window[0])) < self.stall_distance:
                self._positions = []
                self._until = step + self.steps
                return True
        return False


class SimOperatorNode(Node):
    def __init__(self, name: str = "sim_operator", **kwargs: object) -> None:
        super().__init__(name, **kwargs)  # type: ignore[arg-type]
        p = declare_parameters(self, SIM_OPERATOR)
        self.mapping = from_parameters(TeleopMapping, p)
        self.period_ns = round(float(p["control_period"]) * 1e9)  # type: ignore[arg-type]
        self.demonstrate = bool(p["demonstrate"])
        self.rule = TakeoverRule(
            float(p["takeover_probability"]),  # type: ignore[arg-type]
            int(p["takeover_start"]),  # type: ignore[call-overload]
            int(p["stall_steps"]),  # type: ignore[call-overload]
            float(p["stall_distance"]),  # type: ignore[arg-type]
            int(p["takeover_steps"]),  # type: ignore[call-overload]
            int(p["seed"]),  # type: ignore[call-overload]
        )
        self._episode: tuple[str, int, str] | None = None  # id, start ns, source
        self._engaged_before = False
        self._position: np.ndarray | None = None
        self._joy_pub = self.create_publisher(Joy, topics.JOY, 10)
        self.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, self._on_event, RELIABLE_QOS)
        if self.demonstrate or self.rule.enabled:
            self.create_subscription(ArmCommand, topics.SIM_EXPERT_ACTION, self._on_expert, 10)
            self.create_subscription(PoseStamped, topics.EE_POSE, self._on_pose, 10)
        self.get_logger().info(
            f"simulated operator: demonstrate={self.demonstrate}, takeover p={self.rule.probability} "
            f"from step {self.rule.start}, stall_steps={self.rule.stall_steps}, for {self.rule.steps} steps"
        )

    def _on_event(self, msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.START:
            self._episode = (msg.episode_id, time_to_ns(msg.header.stamp), msg.source)
            if msg.source == "policy":
                self.rule.begin_episode()
        elif (
            msg.type == EpisodeEvent.END and self._episode is not None and msg.episode_id == self._episode[0]
        ):
            self._episode = None

    def _on_pose(self, msg: PoseStamped) -> None:
        p = msg.pose.position
        self._position = np.array([p.x, p.y, p.z])

    def _on_expert(self, msg: ArmCommand) -> None:
        stamp_ns = time_to_ns(msg.header.stamp)
        engaged = self.demonstrate
        if self._episode is not None and self._episode[2] == "policy" and self.rule.enabled:
            step = round((stamp_ns - self._episode[1]) / self.period_ns)
            if step >= 0:
                engaged = self.rule.engaged(step, self._position)
                if engaged != self._engaged_before:
                    what = "takes over" if engaged else "hands back"
                    self.get_logger().info(f"operator {what} at step {step} of {self._episode[0]}")
        self._engaged_before = engaged
        if engaged:
            axes, buttons = command_to_joy(
                self.mapping, list(msg.ee_delta), float(msg.gripper), enabled=True, engaged=True
            )
        else:
            axes, buttons = command_to_joy(self.mapping, [0.0, 0.0, 0.0], 0.0, enabled=False)
        joy = Joy(axes=axes, buttons=buttons)
        joy.header.stamp = msg.header.stamp
        self._joy_pub.publish(joy)


def main(args: list[str] | None = None) -> int:
    """The simulated operator and the teleop node that maps its /joy, in one process (as a gamepad and joy_node
    would be two, but neither does real-time work here)."""
    from irevla_ros.nodes.teleop_node import TeleopNode

    return run_nodes(lambda context: [SimOperatorNode(context=context), TeleopNode(context=context)], args)
