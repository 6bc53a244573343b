"""Child process for test_interfaces_dds: echoes every custom message, serves every custom service and action.

Not a test file: test_interfaces_dds.py starts it as a separate process so the exchange crosses DDS.
"""

from __future__ import annotations

import rclpy
from rclpy.action import ActionServer
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

from irevla_interfaces import msg
from irevla_interfaces.action import RunIteration
from irevla_interfaces.srv import ResetEpisode, SelectPolicyVersion
from irevla_ros.nodes.common import RELIABLE_QOS

MESSAGE_TYPES = [
    msg.StepRecord,
    msg.EpisodeEvent,
    msg.EpisodeStored,
    msg.PolicyVersion,
    msg.TrainerStatus,
    msg.SessionStatus,
    msg.Metric,
]


class Echo(Node):
    def __init__(self) -> None:
        super().__init__("interface_echo")
        self._pubs = {}
        for cls in MESSAGE_TYPES:
            name = cls.__name__
            self._pubs[name] = self.create_publisher(cls, f"/echo_out/{name}", RELIABLE_QOS)
            self.create_subscription(
                cls, f"/echo_in/{name}", lambda m, n=name: self._pubs[n].publish(m), RELIABLE_QOS
            )
        self.create_service(SelectPolicyVersion, "/echo/select_policy_version", self._select)
        self.create_service(ResetEpisode, "/echo/reset_episode", self._reset)
        ActionServer(self, RunIteration, "/echo/run_iteration", self._run_iteration)

    def _select(self, request, response):
        response.success = True
        response.active_version = request.version_id
        response.message = f"selected {request.version_id}"
        return response

    def _reset(self, request, response):
        response.success = True
        response.task = request.task
        response.instruction = f"seed {request.seed}"
        return response

    def _run_iteration(self, goal_handle):
        for i in range(3):
            goal_handle.publish_feedback(RunIteration.Feedback(stage="stage2", progress=(i + 1) / 3.0))
        goal_handle.succeed()
        return RunIteration.Result(
            success=True,
            new_version=f"v-{goal_handle.request.reason}",
            promoted=True,
            metrics=[msg.Metric(name="loss", value=0.5)],
        )


def main() -> None:
    rclpy.init()
    node = Echo()
    executor = MultiThreadedExecutor()
    executor.add_node(node)
    print("echo ready", flush=True)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
