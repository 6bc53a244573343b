"""The trainer is SIGKILLed in the middle of an episode and restarted: nothing it acknowledged is lost or
damaged, and nothing it had not finished is passed off as complete (real graph, real DDS, real MuJoCo, real
files)."""

from __future__ import annotations

import signal
from pathlib import Path

from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from irevla_interfaces.msg import EpisodeEvent, EpisodeStored, StepRecord
from irevla_ros import topics
from irevla_ros.nodes.common import RELIABLE_QOS
from irevla_ros.store.episode_store import EpisodeStore

# Short episodes (simulated seconds at 10 Hz) so a few fit in the test's budget on 2 cores.
EPISODE_TIMEOUT = 4.0
MID_EPISODE_STEPS = 10  # the kill comes this far into an episode, well before its END


class GraphWatch:
    """What the test learns from the graph's topics: acknowledgements, episode lifecycle, step counts."""

    def __init__(self, node: Node) -> None:
        self.acks: dict[str, EpisodeStored] = {}
        self.ack_order: list[str] = []
        self.started: list[str] = []
        self.ended: set[str] = set()
        self.steps_done: dict[str, int] = {}
        self.steps_seen: dict[str, int] = {}
        node.create_subscription(EpisodeStored, topics.EPISODE_STORED, self._on_ack, RELIABLE_QOS)
        node.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, self._on_event, RELIABLE_QOS)
        node.create_subscription(StepRecord, topics.STEP_RECORDS, self._on_step, RELIABLE_QOS)

    def _on_ack(self, msg: EpisodeStored) -> None:
        if msg.episode_id not in self.acks:
            self.ack_order.append(msg.episode_id)
        self.acks[msg.episode_id] = msg

    def _on_event(self, msg: EpisodeEvent) -> None:
        if msg.type == EpisodeEvent.START:
            self.started.append(msg.episode_id)
        elif msg.type == EpisodeEvent.END:
            self.ended.add(msg.episode_id)
        elif msg.type == EpisodeEvent.STEPS_DONE:
            self.steps_done[msg.episode_id] = int(msg.num_steps)

    def _on_step(self, msg: StepRecord) -> None:
        if msg.episode_id:
            self.steps_seen[msg.episode_id] = self.steps_seen.get(msg.episode_id, 0) + 1

    def running_episode(self, min_steps: int) -> str | None:
        """The episode now running, once at least `min_steps` of its records have been seen; else None."""
        if not self.started or self.started[-1] in self.ended:
            return None
        current = self.started[-1]
        return current if self.steps_seen.get(current, 0) >= min_steps else None


def logs(runner: object, extra: list[Path]) -> str:
    parts = []
    for path in sorted(Path(runner.log_dir).glob("*.log")) + extra:  # type: ignore[attr-defined]
        parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts)


def test_acknowledged_episodes_survive_a_sigkilled_trainer(ros_context, sim_graph, child, spin, tmp_path):
    runner = sim_graph(f"/episode_manager.episode_timeout={EPISODE_TIMEOUT}")
    node = Node("sigkill_watch", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    watch = GraphWatch(node)
    trainer = next(c for c in runner.children if c.executable == "trainer_node")

    # 1. A normal session until the trainer has acknowledged an episode.
    assert spin(executor, lambda: len(watch.acks) >= 1, timeout=120), logs(runner, [])
    acked_before_kill = set(watch.acks)

    # 2. SIGKILL the trainer in the middle of the next episode: steps are flowing, its END has not come.
    mid_episode = spin(executor, lambda: watch.running_episode(MID_EPISODE_STEPS) is not None, timeout=60)
    assert mid_episode, logs(runner, [])
    in_progress = watch.running_episode(MID_EPISODE_STEPS)
    assert in_progress is not None
    trainer.popen.send_signal(signal.SIGKILL)
    assert trainer.popen.wait(timeout=10) == -signal.SIGKILL
    killed_at_steps = watch.steps_seen[in_progress]
    acked_by_killed = set(watch.acks)

    # 3. Restart it exactly as the graph started it; the session goes on meanwhile.
    restarted = child(runner.command("trainer_node"), name="trainer-restarted")

    def complete_acks_since_restart() -> int:
        return sum(1 for e in set(watch.acks) - acked_by_killed if watch.acks[e].complete)

    assert spin(executor, lambda: complete_acks_since_restart() >= 2, timeout=120), logs(
        runner, [restarted.log]
    )
    assert restarted.popen.poll() is None, restarted.output()
    others = [c for c in runner.children if c.executable != "trainer_node"]
    assert all(c.popen.poll() is None for c in others), logs(runner, [restarted.log])
    assert restarted.stop() == 0, restarted.output()
    runner.stop()
    node.destroy_node()

    # 4. The store, as a reader sees it afterwards.
    with EpisodeStore(tmp_path / "store", read_only=True) as store:
        rows = {row.episode_id: row for row in store.list()}
        for episode_id, ack in watch.acks.items():
            assert episode_id in rows, f"acknowledged episode {episode_id} is not in the catalogue"
            row = rows[episode_id]
            record = store.read(episode_id)  # verifies the file's sha256 against the catalogue
            assert record.sha256 == ack.sha256 == row.sha256
            assert row.num_steps == ack.num_steps == len(record.steps)
            assert row.complete == ack.complete == record.complete and not row.corrupt
            if ack.complete:
                assert [s.step_index for s in record.steps] == list(range(ack.num_steps)), episode_id
                assert ack.num_steps == watch.steps_done.get(episode_id, ack.num_steps) > 0
        # The episodes acknowledged before the kill (a calm graph) are complete and trainable.
        assert all(watch.acks[e].complete for e in acked_before_kill), {e: rows[e].reasons for e in rows}
        assert acked_before_kill <= {row.episode_id for row in store.trainable()}

        # No row claims completeness its file does not back, whatever the crash left behind.
        for episode_id, row in rows.items():
            record = store.read(episode_id)
            indices = [s.step_index for s in record.steps]
            if row.complete:
                assert indices == list(range(row.num_steps)), (episode_id, indices)
                assert record.meta.expected_steps == row.num_steps, episode_id
            else:
                assert row.reasons and record.reasons, episode_id

        # The episode cut by the kill is absent (the new trainer never saw its START) or kept as incomplete.
        if in_progress in rows:
            assert not rows[in_progress].complete, (in_progress, killed_at_steps, rows[in_progress])
    assert complete_acks_since_restart() >= 2
