"""The graph description is the single source of truth, and bad configuration names the file and the key."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from catkin_pkg.package import parse_package

from irevla_ros.bringup.graph import all_executables, all_parameter_files, collect_graph, validate_graph
from irevla_ros.cli import build_parser, main
from irevla_ros.entry_points import NODE_EXECUTABLES
from irevla_ros.node_parameters import SCHEMAS
from irevla_ros.param_spec import ConfigError
from irevla_ros.paths import config_dir, launch_dir

REPO = Path(__file__).resolve().parents[2]


def test_description_names_every_installed_node_executable():
    assert all_executables() == set(NODE_EXECUTABLES)


def test_description_names_every_parameter_file_in_config():
    on_disk = {p.name for p in config_dir().glob("*.yaml")}
    assert all_parameter_files() == on_disk


def test_every_schema_is_used_by_a_node_of_the_graph():
    kinds = {n.kind for hw in ("sim", "robot") for n in collect_graph(hw).nodes()}
    assert kinds == set(SCHEMAS)


def test_launch_file_holds_no_node_list_of_its_own():
    source = (launch_dir() / "collect.launch.py").read_text()
    strings = {
        n.value
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    assert not strings & set(NODE_EXECUTABLES), "launch file names executables itself"
    assert "collect_graph" in source


@pytest.mark.parametrize("hardware", ["sim", "robot", "robot_ur", "robot_servo"])
def test_shipped_configuration_is_valid(hardware):
    effective = validate_graph(collect_graph(hardware))
    expected = {"sim": "sim", "robot": "franky", "robot_ur": "ur_rtde", "robot_servo": "servo"}[hardware]
    assert effective["/arm_controller"]["backend"] == expected


def _config_copy(tmp_path: Path) -> Path:
    target = tmp_path / "config"
    target.mkdir()
    for f in config_dir().glob("*.yaml"):
        (target / f.name).write_text(f.read_text())
    return target


def test_out_of_range_value_names_file_and_key(tmp_path):
    config = _config_copy(tmp_path)
    path = config / "arm_controller.yaml"
    path.write_text(path.read_text().replace("max_step: 0.01", "max_step: 5.0"))
    with pytest.raises(
        ConfigError, match=r"arm_controller\.yaml: /arm_controller\.ros__parameters\.max_step: 5\.0 is above"
    ):
        validate_graph(collect_graph("sim"), config)


def test_unknown_key_names_file_and_key(tmp_path):
    config = _config_copy(tmp_path)
    path = config / "policy.yaml"
    path.write_text(path.read_text().replace("action_noise:", "action_nosie:"))
    with pytest.raises(
        ConfigError, match=r"policy\.yaml: /policy\.ros__parameters\.action_nosie: unknown parameter"
    ):
        validate_graph(collect_graph("sim"), config)


def test_an_empty_list_is_refused_rather_than_read_as_the_default(tmp_path):
    config = _config_copy(tmp_path)
    path = config / "episode_manager.yaml"
    path.write_text(
        path.read_text().replace("required_nodes: [/policy, /trainer, /arm_controller]", "required_nodes: []")
    )
    with pytest.raises(
        ConfigError,
        match=r"episode_manager\.yaml: /episode_manager\.ros__parameters\.required_nodes: an empty list.*"
        r"keep its default \['/policy'",
    ):
        validate_graph(collect_graph("sim"), config)


def test_bad_yaml_names_file_and_line(tmp_path):
    config = _config_copy(tmp_path)
    (config / "trainer.yaml").write_text("/trainer:\n  ros__parameters:\n    store_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"trainer\.yaml: invalid YAML at line \d+"):
        validate_graph(collect_graph("sim"), config)


def test_missing_parameter_file_is_named(tmp_path):
    config = _config_copy(tmp_path)
    (config / "camera.yaml").unlink()
    with pytest.raises(ConfigError, match=r"camera\.yaml: parameter file not found"):
        validate_graph(collect_graph("sim"), config)


def test_wrong_type_and_bad_choice_and_unknown_node(tmp_path):
    config = _config_copy(tmp_path)
    path = config / "camera.yaml"
    path.write_text(path.read_text().replace("fps: 10.0", "fps: fast"))
    with pytest.raises(
        ConfigError, match=r"camera\.yaml: /camera/camera\.ros__parameters\.fps: expected double"
    ):
        validate_graph(collect_graph("sim"), config)
    path.write_text(path.read_text().replace("fps: fast", "fps: 10.0"))
    sim = config / "sim.yaml"
    sim.write_text(sim.read_text().replace("backend: sim\n/arm", "backend: kinect\n/arm"))
    with pytest.raises(
        ConfigError, match=r"sim\.yaml: /camera/camera\.ros__parameters\.backend: 'kinect' is not one of"
    ):
        validate_graph(collect_graph("sim"), config)
    sim.write_text(
        sim.read_text().replace("backend: kinect", "backend: sim")
        + "/polcy:\n  ros__parameters:\n    seed: 1\n"
    )
    with pytest.raises(ConfigError, match=r"sim\.yaml: /polcy: no node of graph"):
        validate_graph(collect_graph("sim"), config)


def test_cli_set_override_is_validated(capsys):
    assert main(["check-config", "--set", "/policy.action_noise=0.3"]) == 0
    assert "action_noise: 0.3" in capsys.readouterr().out
    assert main(["check-config", "--set", "/policy.control_period=-1"]) == 2
    assert (
        "overrides.yaml: /policy.ros__parameters.control_period: -1.0 is below the minimum"
        in capsys.readouterr().err
    )


def test_every_verb_has_help(capsys):
    parser, verbs = build_parser()
    for verb in verbs:
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([verb, "--help"])
        assert exit_info.value.code == 0
        assert verb in capsys.readouterr().out


@pytest.mark.parametrize("package", ["irevla_ros", "irevla_interfaces"])
def test_package_xml_is_valid(package):
    pkg = parse_package(str(REPO / package / "package.xml"))
    pkg.validate()
    assert pkg.name == package
    assert pkg.version == "0.1.0"


def test_rviz_config_shows_the_overlay_topics_the_graph_publishes():
    import yaml

    from irevla_ros import topics

    rviz = yaml.safe_load((config_dir() / "irevla.rviz").read_text())
    shown = {d["Topic"]["Value"] for d in rviz["Visualization Manager"]["Displays"] if "Topic" in d}
    assert {topics.OVERLAY_MARKERS, topics.OVERLAY_IMAGE} <= shown
    published = {v for k, v in vars(topics).items() if k.isupper()}
    assert shown <= published
