"""The robot half of `irevla replay --target robot`: a replay plan (`train/replay.py`) played through a running
graph's arm controller, whose own SafetyLayer converts every command, as it does the policy's.

The rules, in the order they are checked:
- the session must be PAUSED (`/episode_manager/status`): in any other state the episode manager may reset (a
  simulated reset, or homing on a robot) and start an episode, and the policy node then publishes on
  `/policy/action` every tick; paused, it publishes nothing (a pause ends a running episode) and a reset is
  refused. The replay watches the status while it plays and stops, holding the arm, if the session leaves PAUSED;
- the arm controller must be there: its `~/ee_pose` arrives and it subscribes to `/policy/action`;
- the caller confirms (the verb: a typed episode id, or --yes);
- the arm homes first (`/arm_controller/reset_home`, the controller's rate-limited move, answered when home);
- then one ArmCommand per recorded step, `period / speed` apart, filled as the policy node fills its own (episode
  id, step index, stamp, frame "base"; policy_version `replay:<the recorded version>`), recorded holds as holds;
- at the end, and on Ctrl-C, a hold. Ctrl-C during homing latches the e-stop: the controller ignores commands
  while it homes, and the e-stop is the one way to stop that move (`irevla clear-estop` goes on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from geometry_msgs.msg import PoseStamped
from std_srvs.srv import Trigger

from irevla_interfaces.msg import ArmCommand, SessionStatus
from irevla_ros import topics
from irevla_ros.nodes.common import LATCHED_QOS
from irevla_ros.operator.client import SESSION_STATES, NoAnswer, OperatorClient
from irevla_ros.operator.view import no_answer_message
from irevla_ros.train.replay import ReplayPlan

# The arm controller gives up homing after 60 s (its own limit); its answer may take that long, and a little.
HOMING_WAIT = 75.0
# After the last command: how long to wait for the pose that follows it.
SETTLE_WAIT = 3.0


class ReplayRefused(RuntimeError):
    """The graph is not in a state to replay into (session not paused, homing failed); str() says why."""


@dataclass
class RobotReplayResult:
    episode_id: str
    steps: int  # in the plan
    commands: int  # ArmCommands sent that move (not holds)
    holds: int  # recorded holds sent as holds
    stopped: str  # "" when every step was sent; otherwise why it stopped early
    interrupted: bool
    start_ee: np.ndarray | None  # ~/ee_pose after homing
    end_ee: np.ndarray | None  # ~/ee_pose after the final hold
    recorded_displacement: np.ndarray  # last recorded ee - first recorded ee
    poses: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (monotonic s, ee) during the replay

    @property
    def replayed_displacement(self) -> np.ndarray | None:
        if self.start_ee is None or self.end_ee is None:
            return None
        return self.end_ee - self.start_ee

    @property
    def largest_move(self) -> float:
        """The largest move between two consecutive ~/ee_pose messages during the replay (m)."""
        points = [p for _, p in self.poses]
        if len(points) < 2:
            return math.nan
        return float(np.max(np.linalg.norm(np.diff(np.stack(points), axis=0), axis=1)))

    def summary(self) -> str:
        moved = self.replayed_displacement
        lines = [
            f"replay of {self.episode_id} on the arm controller: {self.commands} commands and {self.holds} holds "
            f"of {self.steps} steps"
            + (" (interrupted: arm holding)" if self.interrupted else "")
            + (f" (stopped: {self.stopped})" if self.stopped and not self.interrupted else ""),
            f"  end effector displacement: replayed {_fmt(moved)} vs recorded {_fmt(self.recorded_displacement)}"
            + (
                f", off by {1000 * float(np.linalg.norm(moved - self.recorded_displacement)):.1f} mm"
                if moved is not None
                else ""
            ),
            "  largest move between two ~/ee_pose messages: "
            + ("-" if math.isnan(self.largest_move) else f"{1000 * self.largest_move:.1f} mm"),
            "  outcome: not judged on the robot (label it: the recorded outcome is the catalogue's)",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def vec(v: np.ndarray | None) -> list[float] | None:
            return None if v is None else [round(float(x), 6) for x in v]

        return {
            "target": "robot",
            "episode_id": self.episode_id,
            "steps": self.steps,
            "commands": self.commands,
            "holds": self.holds,
            "stopped": self.stopped,
            "interrupted": self.interrupted,
            "start_ee": vec(self.start_ee),
            "end_ee": vec(self.end_ee),
            "recorded_displacement": vec(self.recorded_displacement),
            "replayed_displacement": vec(self.replayed_displacement),
            "largest_pose_move": None if math.isnan(self.largest_move) else round(self.largest_move, 6),
        }


def _fmt(v: np.ndarray | None) -> str:
    return "-" if v is None else "[" + ", ".join(f"{1000 * float(x):+.1f}" for x in v) + "] mm"


class RobotReplay:
    """One replay through the graph on `client`'s domain: `check`, then `home`, then `play`."""

    def __init__(self, client: OperatorClient, plan: ReplayPlan, speed: float) -> None:
        if not (math.isfinite(speed) and speed > 0):
            raise ValueError(f"speed must be a positive number, got {speed}")
        self.client = client
        self.plan = plan
        self.speed = speed
        self.session: SessionStatus | None = None
        self.pose: tuple[float, np.ndarray] | None = None  # (monotonic s of arrival, ee position)
        self._recording: list[tuple[float, np.ndarray]] | None = None
        node = client.node
        node.create_subscription(SessionStatus, topics.SESSION_STATUS, self._on_session, LATCHED_QOS)
        node.create_subscription(PoseStamped, topics.EE_POSE, self._on_pose, 10)
        self._pub = node.create_publisher(ArmCommand, topics.ACTION, 10)

    def _on_session(self, msg: SessionStatus) -> None:
        self.session = msg

    def _on_pose(self, msg: PoseStamped) -> None:
        p = msg.pose.position
        self.pose = (time.monotonic(), np.array([p.x, p.y, p.z], dtype=np.float64))
        if self._recording is not None:
            self._recording.append(self.pose)

    def _unpaused(self) -> str:
        """The session's state when it is not PAUSED (the replay must not run then); '' when paused."""
        assert self.session is not None
        if self.session.state == SessionStatus.PAUSED:
            return ""
        return SESSION_STATES.get(self.session.state, str(self.session.state))

    @property
    def domain(self) -> int:
        return self.client.domain

    def check(self) -> np.ndarray:
        """Session paused, arm controller present and listening; returns its current ee position."""
        c = self.client
        deadline = time.monotonic() + c.timeout
        if not c.spin_until(lambda: self.session is not None, deadline):
            raise NoAnswer(
                no_answer_message(
                    "topic",
                    topics.SESSION_STATUS,
                    self.domain,
                    c.timeout,
                    "A replay on the robot needs the episode manager: it is how the replay knows the policy is "
                    "not commanding the arm.",
                )
            )
        state = self._unpaused()
        if state:
            raise ReplayRefused(
                f"the session is {state}, not paused: the episode manager may reset and start an episode, and "
                "the policy node would command the arm too; run `irevla pause` first (`irevla resume` after the "
                "replay)"
            )
        if not c.spin_until(lambda: self.pose is not None, deadline):
            raise NoAnswer(no_answer_message("topic", topics.EE_POSE, self.domain, c.timeout))
        if not c.spin_until(self._controller_listens, deadline):
            raise NoAnswer(
                no_answer_message(
                    "subscriber of", topics.ACTION, self.domain, c.timeout, "(the arm controller)"
                )
            )
        assert self.pose is not None
        return self.pose[1].copy()

    def _controller_listens(self) -> bool:
        """The arm controller's command subscription is discovered and every discovered subscription is matched.

        A bare `get_subscription_count() > 0` is also satisfied by any other subscriber (an observer, `ros2 topic
        echo`) matched before the controller, and the controller would then miss the first commands."""
        readers = self.client.node.get_subscriptions_info_by_topic(topics.ACTION)
        controller = any(r.node_name == topics.ARM_CONTROLLER_NODE for r in readers)
        return controller and self._pub.get_subscription_count() >= len(readers)

    def _call(self, service: str, wait: float) -> tuple[bool, str]:
        c = self.client
        client = c.node.create_client(Trigger, service)
        if not c.spin_until(client.service_is_ready, time.monotonic() + c.timeout):
            raise NoAnswer(no_answer_message("service", service, self.domain, c.timeout))
        future = client.call_async(Trigger.Request())
        if not c.spin_until(future.done, time.monotonic() + wait):
            raise NoAnswer(
                f"service {service} on ROS_DOMAIN_ID {self.domain} did not answer within {wait:g} s"
            )
        response = future.result()
        return bool(response.success), str(response.message)

    def home(self) -> None:
        """The arm controller's reset-to-home; Ctrl-C during it latches the e-stop (see the module doc)."""
        try:
            ok, message = self._call(topics.RESET_HOME, HOMING_WAIT)
        except KeyboardInterrupt:
            self._call(topics.ESTOP, self.client.timeout)
            raise
        if not ok:
            raise ReplayRefused(f"{topics.RESET_HOME} refused: {message}")

    def _command(self, k: int, hold: bool) -> ArmCommand:
        action = np.zeros(4, np.float32) if hold or k >= self.plan.steps else self.plan.actions[k]
        msg = ArmCommand(
            ee_delta=[float(x) for x in action[:3]],
            gripper=float(action[3]),
            hold=hold,
            episode_id=self.plan.episode_id,
            step_index=k,
            policy_version=f"replay:{self.plan.policy_version}",
        )
        msg.header.stamp = self.client.node.get_clock().now().to_msg()
        msg.header.frame_id = "base"
        return msg

    def hold(self) -> None:
        """Publish a hold (the controller then holds the arm where it is), numbered after the last step."""
        self._pub.publish(self._command(self.plan.steps, hold=True))
        self.client.executor.spin_once(timeout_sec=0.0)

    def _wait_until(self, moment: float) -> None:
        """Spin until the monotonic `moment`, never past it by more than a scheduler slice (the command rate)."""
        while (left := moment - time.monotonic()) > 0:
            self.client.executor.spin_once(timeout_sec=min(0.05, left))

    def play(self, progress: Callable[[int, int], None] | None = None) -> RobotReplayResult:
        """Send the plan's commands at `period / speed`; a hold at the end. Ctrl-C: hold, and the result says
        interrupted. A session that leaves PAUSED stops the replay (hold) with the reason in `stopped`."""
        plan, c = self.plan, self.client
        recorded = plan.proprio[:, :3]
        finite = recorded[np.all(np.isfinite(recorded), axis=1)]
        result = RobotReplayResult(
            episode_id=plan.episode_id,
            steps=plan.steps,
            commands=0,
            holds=0,
            stopped="",
            interrupted=False,
            start_ee=None,
            end_ee=None,
            recorded_displacement=(finite[-1] - finite[0]) if len(finite) else np.zeros(3),
        )
        # A pose from after the homing answer, so the start is where the arm is now.
        homed_at = time.monotonic()
        c.spin_until(lambda: self.pose is not None and self.pose[0] > homed_at, homed_at + c.timeout)
        result.start_ee = None if self.pose is None else self.pose[1].copy()
        self._recording = result.poses
        interval = plan.period / self.speed
        started = time.monotonic()
        try:
            for k in range(plan.steps):
                self._wait_until(started + k * interval)
                state = self._unpaused()
                if state:
                    result.stopped = (
                        f"the session was resumed during the replay (now {state}): the policy may command the "
                        f"arm; stopped after {k} of {plan.steps} steps"
                    )
                    break
                hold = bool(plan.holds[k])
                self._pub.publish(self._command(k, hold))
                result.holds += hold
                result.commands += not hold
                if progress is not None:
                    progress(k, plan.steps)
        except KeyboardInterrupt:
            result.interrupted = True
        self.hold()
        sent_at = time.monotonic()
        try:
            c.spin_until(lambda: self.pose is not None and self.pose[0] > sent_at, sent_at + SETTLE_WAIT)
        except KeyboardInterrupt:
            result.interrupted = True
        self._recording = None
        result.end_ee = None if self.pose is None else self.pose[1].copy()
        return result


def type_to_confirm(episode_id: str, ask: Callable[[str], str]) -> bool:
    """The operator types the episode id to confirm; anything else (or end of input) is a no."""
    try:
        answer = ask(f"type the episode id ({episode_id}) to confirm, anything else cancels: ")
    except EOFError:
        return False
    return answer.strip() == episode_id
