"""A session's first START waits until the nodes that record and carry out an episode are connected to its
producer: the trainer to the step records, the arm controller to the actions (real nodes, real DDS). Until then
they do not listen to the episode events, which is what the episode manager's required_nodes waits for."""

from __future__ import annotations

import time

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from irevla_interfaces.msg import ArmCommand, StepRecord
from irevla_ros import topics
from irevla_ros.nodes.common import RELIABLE_QOS, subscriber_nodes


def _listening(node: Node) -> set[str]:
    return subscriber_nodes(node, topics.EPISODE_EVENTS)


def test_the_trainer_and_the_arm_listen_to_episodes_once_their_producer_is_connected(
    tmp_path, ros_context, spin
):
    from irevla_ros.hardware.arm import make_arm
    from irevla_ros.nodes.arm_controller_node import ArmControllerNode
    from irevla_ros.nodes.episode_manager_node import EpisodeManagerNode
    from irevla_ros.nodes.trainer_node import TrainerNode
    from irevla_ros.sim.cell import MetaWorldCell

    cell = MetaWorldCell(tasks=("reach-v3",), width=32, height=32, seed=0)
    arm = ArmControllerNode(backend_factory=lambda params: make_arm("sim", cell=cell), context=ros_context)
    trainer = TrainerNode(
        context=ros_context,
        parameter_overrides=[
            Parameter("store_path", value=str(tmp_path / "store")),
            Parameter("iterate", value=False),
        ],
    )
    manager = EpisodeManagerNode(
        context=ros_context,
        parameter_overrides=[
            Parameter("required_nodes", Parameter.Type.STRING_ARRAY, ["/trainer", "/arm_controller"])
        ],
    )
    producer = Node("step_producer", context=ros_context)
    session: list[str] = []
    producer.create_subscription(
        DiagnosticArray,
        "/diagnostics",
        lambda m: session.extend(s.message for s in m.status if s.name == "episode_manager: session"),
        10,
    )
    executor = SingleThreadedExecutor(context=ros_context)
    for node in (arm, trainer, manager, producer):
        executor.add_node(node)
    try:
        # Well past discovery (which took well under a second here), nothing publishes steps or actions yet.
        assert spin(executor, lambda: any("waiting for" in m for m in session), timeout=20), session
        deadline = time.monotonic() + 3.0
        spin(executor, lambda: time.monotonic() > deadline, timeout=5)
        assert not _listening(producer) & {"/trainer", "/arm_controller"}, _listening(producer)
        assert "/arm_controller" in session[-1] and "/trainer" in session[-1], session[-1]

        steps = producer.create_publisher(StepRecord, topics.STEP_RECORDS, RELIABLE_QOS)
        assert spin(executor, lambda: "/trainer" in _listening(producer), timeout=20)
        assert spin(executor, lambda: steps.get_subscription_count() > 0, timeout=5)
        assert "/arm_controller" not in _listening(producer)

        producer.create_publisher(ArmCommand, topics.ACTION, 10)
        assert spin(executor, lambda: "/arm_controller" in _listening(producer), timeout=20)
        # With both listening, the session leaves its wait: it asks for its first reset (nobody serves one here).
        assert spin(executor, lambda: bool(session) and "waiting for" not in session[-1], timeout=20), (
            session[-1]
        )
    finally:
        executor.shutdown()
        trainer.close()
        arm.close()
        for node in (manager, producer, trainer, arm):
            node.destroy_node()
        cell.close()
