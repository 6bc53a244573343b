"""The demo's verdict over its sessions: a process that dies in any session (by a signal or an error exit) is
named, the top-level exit codes keep the worst code per process, and the demo exits non-zero."""

from __future__ import annotations

from irevla_ros.bringup.demo import demo_exit_code, exit_summary

CLEAN = {"sim_cell_node": 0, "policy_node": 0, "episode_manager_node": 0, "trainer_node": 0}


def _session(codes: dict[str, int]) -> dict[str, object]:
    return {"episodes": 3, "lost_steps": 0, "exit_codes": codes}


def test_a_crash_in_a_later_session_is_not_merged_away():
    # what issue 12 saw: the expert session stopped cleanly, the VLA graph's policy node died by SIGSEGV
    crashed = {**CLEAN, "policy_node": -11}
    sessions = {"expert": _session(CLEAN), "vla": _session(crashed), "vla_after": _session(crashed)}
    result = exit_summary(sessions)
    assert result["exit_codes"] == {**CLEAN, "policy_node": -11}
    assert result["failed"] == [
        "vla/policy_node exited -11 (SIGSEGV)",
        "vla_after/policy_node exited -11 (SIGSEGV)",
    ]
    summary = {"episodes": 9, "lost_steps": 0, **result}
    assert demo_exit_code(summary, expected_episodes=9) == 1


def test_worst_code_per_process_whatever_the_session_order():
    sessions = {
        "a": _session({**CLEAN, "trainer_node": 1}),
        "b": _session({**CLEAN, "trainer_node": -9, "policy_node": 2}),
        "c": _session({**CLEAN, "trainer_node": 0}),
    }
    result = exit_summary(sessions)
    # a signal is worse than an error exit, an error exit worse than 0
    assert result["exit_codes"]["trainer_node"] == -9
    assert result["exit_codes"]["policy_node"] == 2
    assert result["failed"] == [
        "a/trainer_node exited 1",
        "b/policy_node exited 2",
        "b/trainer_node exited -9 (SIGKILL)",
    ]


def test_all_clean_passes_and_other_failures_still_count():
    sessions = {"expert": _session(CLEAN), "vla": _session(CLEAN)}
    result = exit_summary(sessions)
    assert result == {"exit_codes": CLEAN, "failed": []}
    assert demo_exit_code({"episodes": 6, "lost_steps": 0, **result}, expected_episodes=6) == 0
    assert demo_exit_code({"episodes": 5, "lost_steps": 0, **result}, expected_episodes=6) == 1
    assert demo_exit_code({"episodes": 6, "lost_steps": 2, **result}, expected_episodes=6) == 1


def test_two_processes_of_one_executable_keep_their_own_exit_code_and_log():
    from irevla_ros.bringup.graph import collect_graph
    from irevla_ros.bringup.launcher import GraphRunner

    runner = GraphRunner(collect_graph("robot", ("camera", "wrist_camera")))
    labels = [runner.label(p) for p in runner.graph.processes]
    assert labels[:2] == ["camera_node-camera", "camera_node-wrist_camera"]
    assert len(set(labels)) == len(labels) and "policy_node" in labels
