"""The diagnostics rules without ROS: thresholds, windows, absent data, and what each node's status says."""

from __future__ import annotations

import math

import pytest

from irevla_ros import diagnostics as d
from irevla_ros.diagnostics import (
    AgeLimits,
    ArmSnapshot,
    CameraSnapshot,
    DiagnosticsConfigError,
    EventWindow,
    InputAge,
    IterationSnapshot,
    Level,
    PolicySnapshot,
    SessionSnapshot,
    StatusBuilder,
    StoreSnapshot,
    TeleopSnapshot,
)


def camera(**changes: object) -> CameraSnapshot:
    base = {
        "fps": 10.0,
        "rate": 10.0,
        "frame_age": 0.05,
        "since_start": 30.0,
        "frames": 300,
        "error": None,
        "ended": False,
    }
    return CameraSnapshot(**{**base, **changes})  # type: ignore[arg-type]


def policy(**changes: object) -> PolicySnapshot:
    base = {
        "policy": "random",
        "version": "random",
        "in_episode": True,
        "inputs": (InputAge("camera camera", 0.05, 0.25), InputAge("ee_pose", 0.02, 0.25)),
        "since_start": 30.0,
        "period": 0.1,
        "ticks": 50,
        "missed": 0,
        "overruns": 0,
        "slowest_tick": 0.01,
        "holds": 0,
        "hold_reason": None,
        "counters": {"missed_ticks": 3, "holds": 0},
    }
    return PolicySnapshot(**{**base, **changes})  # type: ignore[arg-type]


def arm(**changes: object) -> ArmSnapshot:
    base = {
        "backend": "franky",
        "connected": True,
        "estop_reason": None,
        "state_age": 0.05,
        "state_rate": 10.0,
        "since_start": 30.0,
        "rejected": 0,
        "last_rejection": "",
        "holding": "",
        "homing": False,
        "counters": {"commands_sent": 7, "commands_rejected": 1, "holds": 2},
    }
    return ArmSnapshot(**{**base, **changes})  # type: ignore[arg-type]


def store(**changes: object) -> StoreSnapshot:
    base = {
        "path": "/data/store",
        "stored": 4,
        "incomplete": 1,
        "pending": 0,
        "free_bytes": 50e9,
        "disk_error": None,
        "warn_free_gb": 10.0,
        "error_free_gb": 2.0,
        "write_latency": 0.3,
        "write_failure": None,
    }
    return StoreSnapshot(**{**base, **changes})  # type: ignore[arg-type]


# --- building blocks ---------------------------------------------------------------------------------------------
def test_builder_takes_the_worst_level_and_lists_every_problem_worst_first():
    b = StatusBuilder("camera: frames", "123")
    assert b.build("fine").level is Level.OK and b.build("fine").message == "fine"
    b.problem(Level.OK, "ignored")
    b.problem(Level.WARN, "slow")
    b.problem(Level.ERROR, "dead")
    b.problem(Level.WARN, "odd")
    b.add("rate", 0.123456)
    b.add("age", None)
    b.add("flag", True)
    status = b.build("fine")
    assert status.level is Level.ERROR
    assert status.message == "dead; slow; odd"
    assert status.hardware_id == "123"
    assert dict(status.values) == {"rate": "0.1235", "age": "n/a", "flag": "true"}


def test_format_value_of_absent_and_infinite_numbers():
    assert d.format_value(float("nan")) == "n/a"
    assert d.format_value(math.inf) == "inf"
    assert d.format_value(12.34567) == "12.346"
    assert d.format_value(3) == "3"


def test_age_limits_refuse_what_cannot_work():
    with pytest.raises(DiagnosticsConfigError, match="beyond error"):
        AgeLimits(2.0, 1.0)
    with pytest.raises(DiagnosticsConfigError, match="warn"):
        AgeLimits(float("nan"), 1.0)
    with pytest.raises(DiagnosticsConfigError, match="error"):
        AgeLimits(0.1, -1.0)
    with pytest.raises(DiagnosticsConfigError, match="period"):
        AgeLimits.from_period(0.0, 3, 0.5, 10, 1.0)
    with pytest.raises(DiagnosticsConfigError, match="staleness"):
        AgeLimits.from_limit(-0.1)
    with pytest.raises(DiagnosticsConfigError, match="fps"):
        d.camera_limits(float("inf"))


def test_age_limits_boundaries_are_strict_and_a_future_stamp_is_fresh():
    limits = AgeLimits(0.5, 1.0)
    assert limits.level(0.5) is Level.OK  # at the limit: still fine
    assert limits.level(0.5001) is Level.WARN
    assert limits.level(1.0) is Level.WARN
    assert limits.level(1.0001) is Level.ERROR
    assert limits.level(-0.05) is Level.OK
    never = AgeLimits.from_limit(math.inf)  # a consumer that does not check staleness
    assert never.level(1e9) is Level.OK


def test_limits_derived_from_a_rate_and_from_a_consumers_limit():
    assert d.camera_limits(10.0) == AgeLimits(0.5, 1.0)  # floors win at 10 Hz
    assert d.camera_limits(2.0) == AgeLimits(1.5, 5.0)  # periods win at 2 Hz
    assert AgeLimits.from_limit(0.25) == AgeLimits(0.25, 1.0)
    assert AgeLimits.from_limit(0.5) == AgeLimits(0.5, 2.0)


def test_event_window_counts_values_and_rate_over_a_full_window():
    w = EventWindow(window=2.0)
    assert w.rate(0.0) is None and w.count(0.0) == 0 and w.newest() is None
    for i in range(30):  # 10 Hz for 3 s
        w.add(i * 0.1, float(i))
    assert w.newest() == pytest.approx(2.9)
    assert w.count(2.95) == 20
    assert w.rate(2.95) == pytest.approx(10.0)
    assert w.values(2.95)[0] == 10.0
    assert w.rate(10.0) == 0.0  # stopped: decays to nothing
    fresh = EventWindow(window=2.0)
    fresh.add(0.0)
    fresh.add(0.1)
    assert fresh.rate(1.0) is None  # not a full window yet: a partial one would read low
    fresh.add(0.05)  # the clock went back (a simulated-time reset): history starts over
    assert fresh.count(0.06) == 1
    with pytest.raises(DiagnosticsConfigError):
        EventWindow(window=0.0)


def test_status_names_follow_diagnostic_updater():
    assert d.status_name("arm_controller", d.ARM_TASK) == "arm_controller: arm"


# --- camera -------------------------------------------------------------------------------------------------------
def test_camera_ok_at_its_rate():
    status = d.camera_status("camera", "f1230", camera())
    assert status.level is Level.OK, status.message
    assert status.name == "camera: frames" and status.hardware_id == "f1230"
    assert status.value("rate") == "10.000" and status.value("age_warn") == "0.5"


@pytest.mark.parametrize(
    ("changes", "level", "words"),
    [
        ({"frame_age": 0.6}, Level.WARN, "0.60 s old"),
        ({"frame_age": 1.5}, Level.ERROR, "error beyond 1 s"),
        ({"rate": 7.0}, Level.WARN, "publishing 7.0 Hz, configured 10 Hz"),
        ({"rate": 8.0}, Level.OK, "8.0 Hz"),  # exactly RATE_WARN_FRACTION: fine
        ({"error": "device unplugged"}, Level.ERROR, "backend error: device unplugged"),
        ({"ended": True}, Level.ERROR, "has ended"),
        (
            {"frame_age": None, "frames": 0, "since_start": 2.0, "rate": None},
            Level.WARN,
            "nothing received yet",
        ),
        (
            {"frame_age": None, "frames": 0, "since_start": 12.0, "rate": 0.0},
            Level.ERROR,
            "nothing received in",
        ),
        ({"frame_age": float("nan"), "since_start": 1.0}, Level.WARN, "nothing received yet"),
        ({"rate": float("nan")}, Level.OK, ""),  # not measured yet: not judged
    ],
)
def test_camera_levels(changes, level, words):
    status = d.camera_status("camera", "", camera(**changes))
    assert status.level is level, status.message
    assert words in status.message


def test_camera_stopped_reports_rate_and_age_together():
    status = d.camera_status("wrist", "", camera(rate=0.0, frame_age=3.0))
    assert status.level is Level.ERROR
    assert status.message.startswith("frames: newest 3.00 s old")
    assert "publishing 0.0 Hz" in status.message


# --- policy -------------------------------------------------------------------------------------------------------
def test_policy_ok_and_its_counters_kept():
    status = d.policy_status("policy", policy())
    assert status.level is Level.OK, status.message
    assert status.name == "policy: control"
    assert status.message == "random random, in an episode"
    assert status.values[0] == ("missed_ticks", "3")  # what /policy/status readers look up
    assert status.value("age_ee_pose") == "0.02"
    assert status.value("age_camera_camera") == "0.05"


@pytest.mark.parametrize(
    ("changes", "level", "words"),
    [
        ({"inputs": (InputAge("camera camera", 0.3, 0.25),)}, Level.WARN, "camera camera: newest 0.30 s old"),
        ({"inputs": (InputAge("camera camera", 1.2, 0.25),)}, Level.ERROR, "error beyond 1 s"),
        (
            {"inputs": (InputAge("ee_pose", None, 0.25),), "since_start": 3.0},
            Level.WARN,
            "nothing received yet",
        ),
        ({"inputs": (InputAge("ee_pose", None, 0.25),), "since_start": 30.0}, Level.ERROR, "in 30 s"),
        ({"missed": 2}, Level.WARN, "2 control tick(s) missed"),
        (
            {"overruns": 3, "slowest_tick": 0.18},
            Level.WARN,
            "3 of 50 tick(s) took longer than the 0.1 s period",
        ),
        ({"holds": 5, "hold_reason": "camera 'camera': frame 0.4 s old"}, Level.WARN, "holding: camera"),
        # the last tick of a finished episode held: idle now, nothing holds
        ({"in_episode": False, "hold_reason": "deadman released"}, Level.OK, "idle"),
    ],
)
def test_policy_levels(changes, level, words):
    status = d.policy_status("policy", policy(**changes))
    assert status.level is level, status.message
    assert words in status.message


# --- arm ----------------------------------------------------------------------------------------------------------
def test_arm_estop_is_an_error_with_its_reason():
    ok = d.arm_status("arm_controller", "franky:172.16.0.2", arm())
    assert ok.level is Level.OK and ok.message == "following commands" and ok.value("estop") == "clear"
    latched = d.arm_status("arm_controller", "franky:172.16.0.2", arm(estop_reason="arm backend: reflex"))
    assert latched.level is Level.ERROR
    assert latched.message == "e-stop latched: arm backend: reflex"
    assert latched.value("estop") == "latched" and latched.value("commands_sent") == "7"


@pytest.mark.parametrize(
    ("changes", "level", "words"),
    [
        ({"connected": False}, Level.ERROR, "backend franky is not connected"),
        ({"state_age": 0.7}, Level.WARN, "robot state: newest 0.70 s old"),
        ({"state_age": 1.1}, Level.ERROR, "robot state"),
        ({"state_rate": 1.0, "state_age": 3.5}, Level.WARN, "stale beyond 3 s"),  # a slow rate's own periods
        ({"state_age": None, "since_start": 1.0}, Level.WARN, "nothing received yet"),
        ({"rejected": 2, "last_rejection": "action not finite"}, Level.WARN, "2 command(s) refused"),
        ({"holding": "no fresh action within the watchdog deadline"}, Level.OK, "holding: no fresh action"),
        ({"homing": True}, Level.OK, "moving home"),
    ],
)
def test_arm_levels(changes, level, words):
    status = d.arm_status("arm_controller", "", arm(**changes))
    assert status.level is level, status.message
    assert words in status.message


# --- episode manager ----------------------------------------------------------------------------------------------
def session(**changes: object) -> SessionSnapshot:
    base = {
        "state": "running",
        "finished": False,
        "waiting_for": (),
        "reset_running": None,
        "reset_timeout": 10.0,
        "reset_error": None,
        "reset_service": True,
        "wants_reset": False,
    }
    return SessionSnapshot(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "level", "words"),
    [
        ({}, Level.OK, "running"),
        ({"state": "idle", "finished": True}, Level.OK, "idle, finished"),
        ({"waiting_for": ("/trainer", "/policy")}, Level.WARN, "waiting for /policy, /trainer"),
        ({"state": "resetting", "wants_reset": True, "reset_running": 3.0}, Level.OK, "resetting"),
        (
            {"state": "resetting", "wants_reset": True, "reset_running": 12.0},
            Level.ERROR,
            "reset running for 12 s",
        ),
        (
            {"state": "resetting", "wants_reset": True, "reset_error": "home not reached"},
            Level.ERROR,
            "reset failed",
        ),
        (
            {
                "state": "resetting",
                "wants_reset": True,
                "reset_error": "e-stop latched",
                "reset_retry_in": 3.6,
            },
            Level.ERROR,
            "reset failed: e-stop latched (trying again in 4 s)",
        ),
        ({"state": "resetting", "wants_reset": True, "reset_service": False}, Level.WARN, "no reset service"),
    ],
)
def test_session_levels(changes, level, words):
    status = d.session_status("episode_manager", session(**changes))
    assert status.name == "episode_manager: session"
    assert status.level is level, status.message
    assert words in status.message


# --- trainer ------------------------------------------------------------------------------------------------------
def test_iteration_phase_and_error():
    running = d.iteration_status("trainer", IterationSnapshot(True, "session", 2, "v3", None, ""))
    assert running.level is Level.OK and running.message == "phase session, iteration 2"
    assert running.value("phase") == "session" and running.value("active_version") == "v3"
    failed = d.iteration_status(
        "trainer", IterationSnapshot(True, "supervised", 2, "v3", "OSError: disk", "")
    )
    assert failed.level is Level.ERROR and "iteration failed: OSError: disk" in failed.message
    store_only = d.iteration_status("trainer", IterationSnapshot(False, "", 0, "", None, ""))
    assert store_only.level is Level.OK and store_only.value("phase") == "store only"


@pytest.mark.parametrize(
    ("changes", "level", "words"),
    [
        ({}, Level.OK, "4 episodes stored, 0 pending"),
        ({"free_bytes": 5e9}, Level.WARN, "5.00 GB free at the store (warning below 10 GB)"),
        ({"free_bytes": 1e9}, Level.ERROR, "1.00 GB free at the store (error below 2 GB)"),
        ({"free_bytes": 2e9}, Level.WARN, "warning below"),  # exactly the error threshold: not below it
        (
            {"free_bytes": None, "disk_error": "No such file or directory"},
            Level.ERROR,
            "free disk space unknown",
        ),
        ({"free_bytes": float("nan")}, Level.ERROR, "not measured"),
        ({"write_failure": "ep1: disk full"}, Level.ERROR, "storing an episode failed: ep1: disk full"),
        ({"write_latency": 12.0}, Level.WARN, "took 12.0 s to store"),
        ({"write_latency": None}, Level.OK, "stored"),
    ],
)
def test_store_levels(changes, level, words):
    status = d.store_status("trainer", store(**changes))
    assert status.name == "trainer: episode store"
    assert status.level is level, status.message
    assert words in status.message


def test_store_fields_and_bad_thresholds():
    status = d.store_status("trainer", store())
    assert status.value("free_gb") == "50.000" and status.value("write_latency") == "0.3"
    assert status.value("episodes_incomplete") == "1"
    with pytest.raises(DiagnosticsConfigError, match="error"):
        d.store_status("trainer", store(warn_free_gb=1.0, error_free_gb=2.0))


# --- teleop -------------------------------------------------------------------------------------------------------
def test_teleop_levels():
    base = TeleopSnapshot("evdev", None, 0.02, None, True, False, 12)
    assert d.teleop_status("teleop", "evdev:/dev/input/event3", base).message == "deadman held"
    unplugged = d.teleop_status(
        "teleop",
        "",
        TeleopSnapshot(
            "evdev", "evdev: stopped reading: [Errno 19] No such device", 3.0, None, False, False, 12
        ),
    )
    assert unplugged.level is Level.ERROR and "No such device" in unplugged.message
    assert unplugged.value("connected") == "false"
    malformed = d.teleop_status(
        "teleop", "", TeleopSnapshot("joy_topic", None, 0.1, "2 axes, need 6", False, False, 0)
    )
    assert malformed.level is Level.WARN and "/joy ignored: 2 axes, need 6" in malformed.message
    assert malformed.value("connected") == "n/a"  # joy_node owns the device
    quiet = d.teleop_status("teleop", "", TeleopSnapshot("joy_topic", None, None, None, False, False, 0))
    assert quiet.level is Level.OK and quiet.message == "no /joy yet"


# --- simulated cell -----------------------------------------------------------------------------------------------
def test_sim_levels():
    running = d.SimSnapshot(True, False, 12.3, 123, 0, 2.0)
    assert d.sim_status("sim_cell", running).level is Level.OK
    assert d.sim_status("sim_cell", running).message == "t = 12.3 s, 123 periods"
    waited = d.sim_status("sim_cell", d.SimSnapshot(True, False, 12.3, 123, 2, 2.0))
    assert waited.level is Level.WARN and "2 period(s)" in waited.message and "after 2 s" in waited.message
    dead = d.sim_status("sim_cell", d.SimSnapshot(False, False, 12.3, 123, 0, 2.0))
    assert dead.level is Level.ERROR and "stepping thread has died" in dead.message
    stopped = d.sim_status("sim_cell", d.SimSnapshot(False, True, 12.3, 123, 0, 2.0))
    assert stopped.level is Level.OK  # asked to stop (shutdown): not a failure
