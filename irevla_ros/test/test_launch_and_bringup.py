"""Launch as ROS users expect, and the robot install path.

- collect.launch.py (launch/launch_ros have no wheel, so it cannot run here): read with ast, every argument is
  declared with a description (choices where the values are a closed set) and every declared one is used.
- The graph takes user-named cameras from the user's params_file, and the policy reads their image topics.
- `irevla bringup` of the robot_servo graph (its arm driver is the test's servo peer, a stand-in for MoveIt Servo;
  the camera plays a video file through the opencv backend): a camera process killed with SIGKILL is respawned,
  the arm controller killed with SIGKILL stops the whole graph with a message naming it and its exit code.
- requirements-robot.txt pins the versions requirements.lock (scripts/setup.sh) pins.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from irevla_ros.bringup.graph import KNOWN_CAMERAS, collect_graph, validate_graph
from irevla_ros.param_spec import ConfigError

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / "irevla_ros" / "launch" / "collect.launch.py"
IREVLA = shutil.which("irevla") or str(Path(sys.executable).parent / "irevla")


# ---- the launch file ------------------------------------------------------------------------------------------


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", None)) == name
    ]


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_launch_argument_is_declared_described_and_used():
    tree = ast.parse(LAUNCH_FILE.read_text())
    declared = {}
    for call in _calls(tree, "DeclareLaunchArgument"):
        assert isinstance(call.args[0], ast.Constant), ast.dump(call)
        declared[call.args[0].value] = call
    used = {
        c.args[0].value
        for c in _calls(tree, "LaunchConfiguration")
        if c.args and isinstance(c.args[0], ast.Constant)
    }
    expected = {"hardware", "cameras", "params_file", "session", "use_sim_time", "rviz", "joy"}
    assert set(declared) == expected, set(declared) ^ expected
    assert used == set(declared), (
        f"declared but unused: {set(declared) - used}; used undeclared: {used - set(declared)}"
    )
    for name, call in declared.items():
        description = _keyword(call, "description")
        assert description is not None and _keyword(call, "default_value") is not None, name
    for name in ("hardware", "session", "use_sim_time", "rviz", "joy"):
        assert _keyword(declared[name], "choices") is not None, f"{name} has no choices"
    # Critical processes shut the launch down, camera drivers respawn: both go through the graph's respawn flag.
    source = LAUNCH_FILE.read_text()
    assert "Shutdown(" in source and "respawn" in source and "on_exit" in source


def test_launch_argument_choices_match_the_graph():
    from irevla_ros.bringup.graph import HARDWARE_PROFILES

    tree = ast.parse(LAUNCH_FILE.read_text())
    hardware = next(c for c in _calls(tree, "DeclareLaunchArgument") if c.args[0].value == "hardware")
    choices = _keyword(hardware, "choices")
    # list(HARDWARE_PROFILES): the launch file offers exactly the profiles the graph knows
    assert ast.unparse(choices) == "list(HARDWARE_PROFILES)"
    assert HARDWARE_PROFILES == ("sim", "robot", "robot_ur", "robot_servo")
    for profile in HARDWARE_PROFILES:
        validate_graph(collect_graph(profile))


# ---- user-named cameras and params_file -------------------------------------------------------------------------

USER_CELL = """
/left/left:
  ros__parameters:
    backend: realsense
    serial_no: "123456789012"
    frame_id: left_color_optical_frame
/right/right:
  ros__parameters:
    backend: realsense
    serial_no: "210987654321"
    enable_depth: false
/arm_controller:
  ros__parameters:
    workspace_low: [0.35, -0.25, 0.05]
"""


def test_user_named_cameras_come_from_params_file(tmp_path):
    cell = tmp_path / "my_cell.yaml"
    cell.write_text(USER_CELL)
    graph = collect_graph("robot", ("left", "right"), (cell,))
    names = {n.fully_qualified_name for n in graph.nodes()}
    assert {"/left/left", "/right/right"} <= names and "/camera/camera" not in names
    camera_processes = [p for p in graph.processes if p.executable == "camera_node"]
    assert len(camera_processes) == 2 and all(p.respawn for p in camera_processes)
    assert not any(p.respawn for p in graph.processes if p.executable != "camera_node")
    from irevla_ros.bringup.graph import with_overrides

    effective = validate_graph(with_overrides(graph, (), tmp_path))
    assert effective["/left/left"]["serial_no"] == "123456789012"
    assert effective["/right/right"]["enable_depth"] is False
    assert effective["/arm_controller"]["workspace_low"] == [0.35, -0.25, 0.05]  # the user's file wins
    assert effective["/policy"]["cameras"] == ["/left/left/color/image_raw", "/right/right/color/image_raw"]
    # One of the user's cameras only: the other is still validated, not refused as unknown.
    validate_graph(with_overrides(collect_graph("robot", ("left",), (cell,)), (), tmp_path))


@pytest.mark.parametrize("hardware", ["sim", "robot", "robot_ur"])
def test_the_session_argument_picks_demonstrations_or_the_vla_on_any_profile(hardware, tmp_path):
    from irevla_ros.bringup.graph import with_overrides

    def effective(session: str) -> dict:
        graph = collect_graph(hardware, session=session)
        return validate_graph(with_overrides(graph, (), tmp_path))

    demonstrate, policy, profile = effective("demonstrate"), effective("policy"), effective("profile")
    assert (demonstrate["/policy"]["policy"], demonstrate["/episode_manager"]["source"]) == (
        "scripted_expert",
        "expert",
    )
    assert (policy["/policy"]["policy"], policy["/episode_manager"]["source"]) == ("vla", "policy")
    # The profile's own choice: scripted demonstrations in sim, the VLA on a robot.
    assert profile["/policy"]["policy"] == ("scripted_expert" if hardware == "sim" else "vla")
    if hardware != "sim":  # a robot's demonstrations follow the operator's gamepad
        assert demonstrate["/policy"]["expert_command_topic"] == "/teleop/command"
    with pytest.raises(ConfigError, match="session: 'record' is not one of profile, demonstrate, policy"):
        collect_graph(hardware, session="record")


def test_cameras_nobody_configures_are_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"\['left'\] configured nowhere.*params_file"):
        collect_graph("robot", ("camera", "left"))
    with pytest.raises(ConfigError, match="not ROS node names"):
        collect_graph("robot", ("left-cam",))
    with pytest.raises(ConfigError, match="distinct"):
        collect_graph("robot", ("camera", "camera"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("/left/left:\n  ros__parameters:\n    serial: '1'\n")  # realsense-ros calls it serial_no
    with pytest.raises(ConfigError, match=r"serial: unknown parameter"):
        validate_graph(collect_graph("robot", ("left",), (bad,)))
    assert set(KNOWN_CAMERAS) == {"camera", "wrist_camera"}


# ---- the pip bring-up's failure policy ----------------------------------------------------------------------------


def _children(pid: int) -> dict[int, str]:
    # -ww: unlimited width. Without it ps cuts args at $COLUMNS (80 on CI), which can cut off the executable.
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return {int(line.split(None, 1)[0]): line.split(None, 1)[1] for line in out.splitlines() if line.strip()}


def _child_running(pid: int, executable: str) -> int | None:
    return next((p for p, args in _children(pid).items() if f"/{executable} " in args), None)


def test_pip_bringup_respawns_a_camera_and_stops_on_a_dead_arm_controller(ros_domain, child, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from robot_cell import write_cell_file, write_video
    from servo_peer import ServoPeer

    cell = write_cell_file(tmp_path, write_video(tmp_path / "camera.avi"))
    with ServoPeer(ros_domain) as peer:
        with peer._lock:
            peer.state.position = np.array([0.0, 0.45, 0.3])  # the profile's home, inside its box
        bringup = child(
            [IREVLA, "bringup", "--hardware", "robot_servo", "--params-file", str(cell)], "bringup"
        )
        pid = bringup.popen.pid

        def wait_for(predicate, timeout: float, what: str):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                value = predicate()
                if value:
                    return value
                assert bringup.popen.poll() is None, (
                    f"bringup exited while waiting for {what}:\n{bringup.output()}"
                )
                time.sleep(0.2)
            raise AssertionError(
                f"timed out waiting for {what}; children {_children(pid)}:\n{bringup.output()}"
            )

        def started(exe: str):
            return lambda: _child_running(pid, exe)

        camera = wait_for(started("camera_node"), 60, "camera_node")
        arm = wait_for(started("arm_controller_node"), 60, "arm_controller_node")
        wait_for(lambda: "[bringup] graph collect" in bringup.output(), 30, "the start message")
        time.sleep(3.0)  # let the nodes come up before killing one
        subprocess.run(["kill", "-KILL", str(camera)], check=True)
        wait_for(lambda: "camera_node (/camera/camera) died: killed by SIGKILL (-9); respawning" in bringup.output(),
                 30, "the respawn message")  # fmt: skip
        respawned = wait_for(lambda: (p := _child_running(pid, "camera_node")) not in (None, camera) and p,
                             30, "the respawned camera_node")  # fmt: skip
        assert "camera_node respawned (pid" in bringup.output()
        assert _child_running(pid, "arm_controller_node") == arm  # the rest of the graph was left alone
        subprocess.run(["kill", "-KILL", str(arm)], check=True)
        try:
            code = bringup.popen.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the graph did not stop after the arm controller died:\n{bringup.output()}")
        out = bringup.output()
        assert code == 1, out
        assert re.search(
            r"\[bringup\] arm_controller_node \(/arm_controller\) died: killed by SIGKILL \(-9\), a critical "
            r"process \(it is not respawned\): stopping the graph",
            out,
        ), out
        assert "[bringup] stopped:" in out, out
        # the stop report names the process that did not exit cleanly, and only it
        report = out.split("[bringup] not a clean stop:\n", 1)[-1]
        assert report.startswith("arm_controller_node: killed by SIGKILL (-9)"), out
        assert "camera_node:" not in report, out
        assert not _children(pid), "a process of the graph outlived the bring-up"
        assert respawned != camera


# ---- the robot install path ---------------------------------------------------------------------------------------


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^;\s]+).*", line)
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def test_robot_requirements_pin_what_setup_pins():
    robot = _pins(REPO / "requirements-robot.txt")
    lock = _pins(REPO / "requirements.lock")
    assert {"torch", "onnxruntime", "transformers", "peft", "tensorboard", "pyrealsense2"} <= set(robot)
    wrong = {name: (version, lock.get(name)) for name, version in robot.items() if lock.get(name) != version}
    assert not wrong, f"requirements-robot.txt pins differ from requirements.lock: {wrong}"
    lines = [
        line.split("#", 1)[0].strip() for line in (REPO / "requirements-robot.txt").read_text().splitlines()
    ]
    names = {re.split(r"[=<>;\s]", line, maxsplit=1)[0].lower() for line in lines if line}
    # apt ROS provides these; a pip copy would shadow what its compiled modules were built against
    assert not names & {"ros-rclpy", "opencv-python", "opencv-python-headless", "numpy"}, names


def test_package_xml_names_the_ros_packages_the_code_imports():
    import xml.etree.ElementTree as ET

    root = ET.parse(REPO / "irevla_ros" / "package.xml").getroot()
    keys = {e.text for e in root if e.tag in ("depend", "exec_depend")}
    imported = set()
    for path in (REPO / "irevla_ros" / "irevla_ros").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
    ros = {m for m in imported if m.endswith(("_msgs", "_srvs", "_interfaces")) or m in ("rclpy",)}
    assert ros <= keys, f"imported but not in package.xml: {ros - keys}"
    assert {"launch", "launch_ros", "joy", "python3-opencv", "python3-numpy", "python3-yaml"} <= keys
