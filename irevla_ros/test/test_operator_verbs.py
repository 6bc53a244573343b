"""The operator verbs (`irevla label|reset|pause|resume|estop|clear-estop|iterate|status`) run as the installed
`irevla` tool against real nodes over DDS: the sim cell process (cell, camera, arm controller with the sim
backend), the episode manager and the trainer with a tiny model store. Each verb's effect is observed on the
graph by an independent node. On a domain where nothing runs, every verb exits 1 within its timeout, naming what
did not answer and the domain."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from iteration_helpers import TINY, write_episode
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from irevla_interfaces.msg import EpisodeEvent, SessionStatus
from irevla_ros import topics
from irevla_ros.bringup.domains import leased_domain
from irevla_ros.bringup.graph import collect_graph
from irevla_ros.bringup.launcher import GraphRunner
from irevla_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS
from irevla_ros.operator.view import (
    DiagnosticView,
    SessionView,
    StatusSnapshot,
    TrainerView,
    VersionView,
    format_status,
)
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore

IREVLA = shutil.which("irevla") or str(Path(sys.executable).parent / "irevla")


def irevla(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IREVLA, *argv], capture_output=True, text=True, timeout=timeout)


def test_every_verb_on_a_domain_without_a_graph_exits_1_within_its_timeout_naming_what_and_where():
    with leased_domain() as domain:
        for argv, name in [
            (["label", "success"], topics.LABEL_SUCCESS),
            (["reset"], topics.RESET_EPISODE),
            (["estop"], topics.ESTOP),
            (["iterate"], topics.RUN_ITERATION),
            (["status", "--once"], topics.SESSION_STATUS),
        ]:
            # The same process start and imports without the verb, just before it: what the machine's load adds
            # to both is not the verb's waiting.
            started = time.monotonic()
            subprocess.run([sys.executable, "-c", "import rclpy, irevla_ros.cli, irevla_ros.operator.client"],
                           check=True, timeout=120)  # fmt: skip
            start_up = time.monotonic() - started
            started = time.monotonic()
            done = irevla(*argv, "--domain", str(domain), "--timeout", "1.5")
            elapsed = time.monotonic() - started
            assert done.returncode == 1, (argv, done.stdout, done.stderr)
            # gives up after its 1.5 s timeout (plus rclpy's init and shutdown), not later
            assert elapsed - start_up < 1.5 + 2.0, (argv, elapsed, start_up)
            assert name in done.stderr and f"ROS_DOMAIN_ID {domain}" in done.stderr, done.stderr
            assert "ROS_AUTOMATIC_DISCOVERY_RANGE" in done.stderr and "Traceback" not in done.stderr


def test_parsing_the_verbs_loads_no_torch_no_simulator():
    # An operator verb at the cell (label, estop) must not wait for torch or MuJoCo to import: the parser of every
    # verb is built without them; each verb loads what it needs when it runs.
    code = (
        "import sys; from irevla_ros.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'mujoco', 'metaworld', 'onnxruntime', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr)


def test_a_bad_domain_is_a_usage_error_naming_it(monkeypatch, capsys):
    from irevla_ros.cli import main

    monkeypatch.setenv("ROS_DOMAIN_ID", "abc")
    with pytest.raises(SystemExit) as exit_info:
        main(["reset"])
    assert (
        exit_info.value.code == 2 and "got 'abc' (from --domain or ROS_DOMAIN_ID)" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["estop", "--domain", "300"])
    assert exit_info.value.code == 2 and "must be 0..232, got 300" in capsys.readouterr().err


def test_status_view_names_every_field_and_every_missing_source():
    empty = format_status(StatusSnapshot(domain=7))
    assert "ROS_DOMAIN_ID 7" in empty
    for topic in ("/episode_manager/status", "/trainer/status", "/trainer/policy_version", "/policy/status"):
        assert f"nothing on {topic}" in empty
    snap = StatusSnapshot(
        domain=7,
        session=SessionView("running", "ep-3", 3, 12, 2, 1, 0.5, "button-press-v3", "press the button"),
        trainer=TrainerView(
            "supervised", 2, "stage2", 0.25, 10, 1, 0, "v1", metrics={"session_episodes": 4.0}
        ),
        version=VersionView("v2", "stage2_sft", "v1"),
        policy=DiagnosticView("ok", "vla v2", {"holds": "3", "missed_ticks": "0", "steps_published": "9"}),
        arm=DiagnosticView("error", "e-stop latched: e-stop service", {"holds": "5", "commands_sent": "8"}),
    )
    snap.received.update(session=100.0, version=0.0)
    stale = format_status(snap, now=110.0)
    assert "STALE (last message): /episode_manager/status 10 s ago" in stale, stale
    assert "policy_version" not in stale.split("STALE")[1]  # latched: published once, never stale
    full = format_status(snap)
    assert "STALE" not in full
    for text in (
        "running  episode ep-3 (#3, step 12)",
        "success rate 1/2 (50%)",
        "supervised  iteration 2  stage stage2 25%",
        "session episodes 4",
        "v2 (stage2_sft, parent v1)",
        "e-stop LATCHED  arm holds 5  policy holds 3",
    ):
        assert text in full, full
    # An arm in error for another reason (stale state) with its e-stop clear: the view says which.
    snap.arm = DiagnosticView("error", "robot state: newest 1.50 s old", {"estop": "clear", "holds": "5"})
    assert "e-stop clear  arm holds 5" in format_status(snap)


def test_the_status_view_and_the_cli_parser_load_no_rclpy():
    code = (
        "import sys\n"
        "from irevla_ros.operator import view\n"
        "from irevla_ros.cli import build_parser\n"
        "build_parser()\n"
        "loaded = [m for m in sys.modules if m.startswith(('rclpy', 'irevla_interfaces'))]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def operator_graph(tmp_path: Path, ros_domain: int):
    """Sim cell (with the arm controller), episode manager and an iterating trainer on a tiny model store."""
    torch.manual_seed(0)
    models = ModelStore(tmp_path / "models")
    v1 = models.save(VLAModel(TINY), parent=None, stage="stage0_sft").version_id
    with EpisodeStore(tmp_path / "store") as store:
        for i in range(2):
            write_episode(store, f"expert-{i}", "expert", "success", "", seed=i)
        write_episode(store, "policy-0", "policy", "success", v1, seed=5)
    full = collect_graph("sim")
    graph = replace(
        full,
        processes=tuple(p for p in full.processes if p.executable != "policy_node"),
        settings=tuple(s for s in full.settings if not s.startswith("/policy.")),
    )
    runner = GraphRunner(
        graph,
        [
            # No policy here, so the trainer and the arm controller, which listen to episodes only once a step
            # producer resp. an action publisher is connected, never do: the session waits for this test's observer.
            "/episode_manager.required_nodes=[/operator_observer]",
            "/episode_manager.episode_timeout=600.0",  # episodes end only by the operator's verbs
            f"/trainer.store_path={tmp_path / 'store'}",
            f"/trainer.run_dir={tmp_path / 'trainer'}",
            f"/trainer.model_store={tmp_path / 'models'}",
            f"/trainer.initial_version={v1}",
            "/trainer.stage1_enabled=false",
            "/trainer.validation_episodes=0",
            "/trainer.stage2.steps=3",
            "/trainer.stage2.batch_size=4",
            "/trainer.status_period=0.2",
        ],
        env=None,
        log_dir=tmp_path / "logs",
    )
    runner.env["OMP_NUM_THREADS"] = "1"
    runner.start()
    try:
        yield runner, v1
    finally:
        runner.stop()


def test_each_verb_against_the_running_graph(ros_context, ros_domain, operator_graph, spin, tmp_path):
    _, v1 = operator_graph
    observer = Node("operator_observer", context=ros_context)
    events: list[EpisodeEvent] = []
    session: list[SessionStatus] = []
    arm: list[DiagnosticStatus] = []
    observer.create_subscription(EpisodeEvent, topics.EPISODE_EVENTS, events.append, RELIABLE_QOS)
    observer.create_subscription(SessionStatus, topics.SESSION_STATUS, session.append, LATCHED_QOS)
    observer.create_subscription(
        DiagnosticArray,
        "/diagnostics",
        lambda m: arm.extend(s for s in m.status if s.name == "arm_controller: arm"),
        10,
    )
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(observer)

    def logs() -> str:
        return "\n".join(p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log"))

    def state() -> int | None:
        return session[-1].state if session else None

    def ends() -> list[EpisodeEvent]:
        return [e for e in events if e.type in (EpisodeEvent.END, EpisodeEvent.LABEL)]

    timings: dict[str, float] = {}

    def verb(*argv: str, code: int = 0, limit: float = 60.0) -> str:
        started = time.monotonic()
        done = irevla(*argv, "--timeout", "20", timeout=limit)
        timings[" ".join(argv)] = (
            time.monotonic() - started
        )  # the domain comes from ROS_DOMAIN_ID, as ros2cli's does
        assert done.returncode == code, (argv, done.returncode, done.stdout, done.stderr)
        spin(executor, lambda: False, timeout=0.1)
        return done.stdout + done.stderr

    assert spin(executor, lambda: state() == SessionStatus.RUNNING, timeout=120), logs()

    # label: the running episode ends with the operator's label; the session counts it.
    assert "labelled success" in verb("label", "success")
    assert spin(executor, lambda: bool(ends()), timeout=20), events
    end = ends()[0]
    assert (end.outcome, end.label_source) == (
        EpisodeEvent.OUTCOME_SUCCESS,
        EpisodeEvent.LABEL_SOURCE_OPERATOR,
    )
    assert spin(executor, lambda: session[-1].successes == 1 and session[-1].episodes_done == 1, timeout=20)

    # pause / resume; a reset while paused is refused with the session's reason (exit 3).
    assert spin(executor, lambda: state() == SessionStatus.RUNNING, timeout=60), logs()
    assert "paused" in verb("pause")
    assert spin(executor, lambda: state() == SessionStatus.PAUSED, timeout=20)
    assert "session is paused: resume first" in verb("reset", code=3)
    assert "resumed" in verb("resume")
    assert spin(executor, lambda: state() == SessionStatus.RUNNING, timeout=60), logs()

    # reset: the running episode ends aborted by the operator.
    before = len(ends())
    assert "reset requested" in verb("reset")
    assert spin(executor, lambda: len(ends()) > before, timeout=20)
    assert ends()[-1].outcome == EpisodeEvent.OUTCOME_ABORTED and "reset" in ends()[-1].note

    # estop latches in the arm controller (its diagnostics say so, and status shows it); clear-estop clears it.
    assert "e-stop latched" in verb("estop")
    assert spin(executor, lambda: bool(arm) and arm[-1].level == DiagnosticStatus.ERROR, timeout=20)
    assert "e-stop service" in arm[-1].message
    assert {kv.key: kv.value for kv in arm[-1].values}["estop"] == "latched"
    view = verb("status", "--once")
    assert "e-stop LATCHED" in view and "running" in view, view
    assert "e-stop cleared" in verb("clear-estop")
    assert spin(executor, lambda: arm[-1].level == DiagnosticStatus.OK, timeout=20), arm[-1]

    # status --watch refreshes until Ctrl-C, which ends it with exit 0 (like `watch`).
    watch = subprocess.Popen(
        [IREVLA, "status", "--watch", "--period", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    frames: list[str] = []
    reader = threading.Thread(target=lambda: frames.extend(iter(watch.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 60
    while sum("e-stop clear" in line for line in frames) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    watch.send_signal(signal.SIGINT)
    assert watch.wait(timeout=20) == 0, "".join(frames)
    reader.join(timeout=5)
    assert sum(line.startswith("irevla status") for line in frames) >= 2, "".join(frames)

    # iterate: Ctrl-C cancels the goal (exit 130); then a short iteration prints feedback and its result.
    long = subprocess.Popen(
        [IREVLA, "iterate", "--max-supervised-steps", "5000", "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(long.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    deadline = time.monotonic() + 180
    while not any(line.startswith("[stage2") for line in lines) and time.monotonic() < deadline:
        assert long.poll() is None, "".join(lines)
        time.sleep(0.2)
    assert any(line.startswith("[stage2") for line in lines), ("".join(lines), logs())
    long.send_signal(signal.SIGINT)
    assert long.wait(timeout=60) == 130, "".join(lines)
    reader.join(timeout=5)
    out = "".join(lines)
    assert "cancelling the iteration" in out and "iteration cancelled" in out, out

    # A hang guard, not a speed check: Stage 2, saving with the ONNX export and validation took 11-36 s here
    # under load, and did not finish within 60 s on a slower CI run (the whole test 110 s there, 72 s in another).
    out = verb("iterate", "--max-supervised-steps", "3", limit=300.0)
    assert "goal accepted" in out and "[stage2" in out, out
    assert "iteration succeeded: new version" in out and "(promoted)" in out, out
    new = out.split("new version ", 1)[1].split()[0]
    assert new.endswith("stage2_sft") and ModelStore(tmp_path / "models").get(new).parent == v1

    # status: every source the graph has, in one view (no policy node here: named as missing).
    view = verb("status", "--once")
    assert f"version   {new} (stage2_sft, parent {v1})" in view, view
    assert "trainer   collecting  iteration 2" in view and f"active {new}" in view, view
    # Done: the labelled episode, the one the pause aborted and the one the reset aborted.
    assert "success rate 1/3 (33%)  last outcome aborted" in view and "e-stop clear" in view, view
    assert "nothing on /policy/status" in view, view
    print("verb wall seconds:", {k: round(v, 2) for k, v in timings.items()})
    observer.destroy_node()


def test_status_once_waits_for_a_discovered_status_topic_that_has_not_delivered_yet(
    ros_context, ros_domain, spin
):
    """A node whose status publisher is discovered but speaks 6 s after the first source (longer than the 3 s
    settle): `status --once` shows its line instead of "nothing on", and still does not wait its whole timeout
    for the policy node, which is not running at all."""
    from irevla_interfaces.msg import TrainerStatus

    node = Node("late_graph", context=ros_context)
    executor = SingleThreadedExecutor(context=ros_context)
    executor.add_node(node)
    trainer = node.create_publisher(TrainerStatus, topics.TRAINER_STATUS, LATCHED_QOS)
    session = node.create_publisher(SessionStatus, topics.SESSION_STATUS, LATCHED_QOS)
    trainer.publish(TrainerStatus(state=TrainerStatus.COLLECTING, active_version="v0001-stage0_sft"))
    started = time.monotonic()
    view = subprocess.Popen(
        [IREVLA, "status", "--once", "--timeout", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert spin(executor, lambda: trainer.get_subscription_count() > 0, timeout=15)
    spin(executor, lambda: False, timeout=6.0)
    assert view.poll() is None, view.communicate()[0]  # still waiting for the discovered session publisher
    session.publish(SessionStatus(state=SessionStatus.PAUSED, episodes_done=3, successes=1))
    out, _ = view.communicate(timeout=60)
    took = time.monotonic() - started
    assert view.returncode == 0, out
    assert "session   paused" in out and "success rate 1/3" in out, out
    assert "active v0001-stage0_sft" in out and "nothing on /policy/status" in out, out
    assert took < 19.0, took  # not the whole timeout: the missing policy node has no publisher to wait for
    node.destroy_node()
