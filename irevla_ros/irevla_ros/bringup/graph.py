"""The node graph: the single description that `launch/collect.launch.py` and `irevla bringup` both start.

Neither holds a node list of its own. A graph is a list of processes; each process is one installed executable
that creates one or more nodes with fixed names; each node reads its parameter files from `config/`.
In simulation the simulated cell, the camera and the arm controller share one process, because the camera's
`sim` backend renders and the arm's `sim` backend steps the same MuJoCo world; on a robot they are separate
driver processes, exactly like realsense2_camera and a Franka/UR driver.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from irevla_ros.entry_points import NODE_EXECUTABLES
from irevla_ros.node_parameters import CONFIGS, GRAPH_WIDE, SCHEMAS
from irevla_ros.param_spec import (
    ConfigError,
    ParamSpec,
    defaults,
    from_parameters,
    load_parameter_file,
    node_key_matches,
    validate_parameters,
)
from irevla_ros.paths import config_dir

# Each profile is config/<profile>.yaml: "robot" a Franka through franky, "robot_ur" a UR arm through ur_rtde,
# "robot_servo" an arm run by its own ROS 2 driver + MoveIt Servo.
HARDWARE_PROFILES = ("sim", "robot", "robot_ur", "robot_servo")
# Camera nodes the package configures (camera.yaml); "camera" alone by default. Any other name is a camera the
# user's own parameter file (params_file) configures as /<name>/<name>.
KNOWN_CAMERAS = ("camera", "wrist_camera")
DEFAULT_CAMERAS = ("camera",)
# A driver process with `respawn` (a camera) is restarted after RESPAWN_DELAY s, at most RESPAWN_MAX_RETRIES
# times (ros2 launch: respawn, respawn_delay, respawn_max_retries); then its death stops the graph.
RESPAWN_DELAY = 2.0
RESPAWN_MAX_RETRIES = 3
# What a session's episodes are, on any profile: "demonstrate" records demonstrations (D_e: the scripted expert,
# which on the robot profiles follows the operator's /teleop/command), "policy" runs the VLA (policy episodes,
# Stage 1 live, takeovers), "profile" leaves it to the profile (sim: demonstrations; robot profiles: the VLA).
SESSIONS: dict[str, tuple[str, ...]] = {
    "profile": (),
    "demonstrate": ("/policy.policy=scripted_expert", "/episode_manager.source=expert"),
    "policy": ("/policy.policy=vla", "/episode_manager.source=policy"),
}
# A camera name is both the node's name and its namespace (realsense-ros camera_name = camera_namespace).
_CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    kind: str  # key of parameters.SCHEMAS
    namespace: str = ""
    parameter_files: tuple[str, ...] = ()

    @property
    def fully_qualified_name(self) -> str:
        ns = self.namespace.strip("/")
        return f"/{ns}/{self.name}" if ns else f"/{self.name}"

    @property
    def schema(self) -> tuple[ParamSpec, ...]:
        return SCHEMAS[self.kind]


@dataclass(frozen=True)
class ProcessSpec:
    executable: str
    nodes: tuple[NodeSpec, ...]
    # Seconds a process may take to stop after SIGINT before it is terminated (ros2 launch: sigterm_timeout).
    stop_timeout: float = 10.0
    # A driver that may be restarted when it dies (a camera on USB); every other process is critical: its death
    # stops the whole graph (ros2 launch: on_exit=Shutdown()).
    respawn: bool = False

    @property
    def parameter_files(self) -> tuple[str, ...]:
        files: list[str] = []
        for node in self.nodes:
            files.extend(f for f in node.parameter_files if f not in files)
        return tuple(files)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    hardware: str
    processes: tuple[ProcessSpec, ...]
    description: str = ""
    # Parameter values the graph itself implies ("NODE.PARAM=VALUE", the syntax of `--set`), e.g. which camera
    # nodes the simulated cell hosts and which image topics the policy reads.
    settings: tuple[str, ...] = ()
    extra_parameter_files: tuple[Path, ...] = field(default=())
    cameras: tuple[str, ...] = ()
    # The user's own parameter files (params_file:=), read after the package's and before extra_parameter_files.
    user_parameter_files: tuple[Path, ...] = ()
    session: str = "profile"  # a key of SESSIONS

    @property
    def title(self) -> str:
        """'collect (robot)', 'collect (robot, session demonstrate)'."""
        session = "" if self.session == "profile" else f", session {self.session}"
        return f"{self.name} ({self.hardware}{session})"

    def nodes(self) -> Iterator[NodeSpec]:
        for process in self.processes:
            yield from process.nodes

    def executables(self) -> list[str]:
        return [p.executable for p in self.processes]


def _node(name: str, kind: str, hardware: str, namespace: str = "") -> NodeSpec:
    return NodeSpec(name, kind, namespace, (f"{kind}.yaml", f"{hardware}.yaml"))


def user_cameras(params_files: Sequence[Path]) -> list[str]:
    """Camera names the user's parameter files configure: every node key `/<name>/<name>`."""
    names: list[str] = []
    for path in params_files:
        for key in load_parameter_file(path):
            parts = key.strip("/").split("/")
            if len(parts) == 2 and parts[0] == parts[1] and _CAMERA_NAME.fullmatch(parts[0]):
                names.append(parts[0])
    return names


def _check_cameras(cameras: Sequence[str], params_files: Sequence[Path]) -> None:
    if not cameras or len(set(cameras)) != len(cameras):
        raise ConfigError(f"cameras: {list(cameras)} must be one or more distinct names")
    bad = [c for c in cameras if not _CAMERA_NAME.fullmatch(c)]
    if bad:
        raise ConfigError(f"cameras: {bad} are not ROS node names (a letter, then letters, digits or _)")
    configured = set(KNOWN_CAMERAS) | set(user_cameras(params_files))
    missing = [c for c in cameras if c not in configured]
    if missing:
        where = ", ".join(str(p) for p in params_files) or "no params_file given"
        raise ConfigError(
            f"cameras: {missing} configured nowhere: the package configures {', '.join(KNOWN_CAMERAS)}; "
            f"define each other camera as /<name>/<name> in your params_file ({where})"
        )


def collect_graph(
    hardware: str = "sim",
    cameras: Sequence[str] = DEFAULT_CAMERAS,
    params_files: Sequence[Path | str] = (),
    session: str = "profile",
) -> GraphSpec:
    """The collection graph of `ros2 launch irevla_ros collect.launch.py` / `irevla bringup`.

    `cameras` names the camera nodes (each `/<name>/<name>`, realsense-ros style); their parameters are in
    camera.yaml, the hardware profile and `params_files` (the user's cell files, read last, so they win; a
    camera the package does not know must be defined there). The policy reads the colour image of every one.
    """
    if hardware not in HARDWARE_PROFILES:
        raise ConfigError(f"hardware: {hardware!r} is not one of {', '.join(HARDWARE_PROFILES)}")
    if session not in SESSIONS:
        raise ConfigError(f"session: {session!r} is not one of {', '.join(SESSIONS)}")
    user_files = tuple(Path(p).expanduser().resolve() for p in params_files)
    _check_cameras(cameras, user_files)
    camera_nodes = tuple(_node(c, "camera", hardware, namespace=c) for c in cameras)
    arm = _node("arm_controller", "arm_controller", hardware)
    if hardware == "sim":
        drivers: tuple[ProcessSpec, ...] = (
            ProcessSpec("sim_cell_node", (_node("sim_cell", "sim_cell", hardware), *camera_nodes, arm)),
        )
    else:
        drivers = (
            *(ProcessSpec("camera_node", (c,), respawn=True) for c in camera_nodes),
            ProcessSpec("arm_controller_node", (arm,)),
        )
    # Teleop: /joy (joy_node or the node's own device reader) to /teleop/command. In simulation the simulated
    # operator, which publishes /joy from the scripted expert, shares its process (one process fewer to start).
    teleop = _node("teleop", "teleop", hardware)
    operator = (
        # teleop first: a process reads its nodes' files in order, and sim.yaml must come after teleop.yaml
        ProcessSpec("sim_operator_node", (teleop, _node("sim_operator", "sim_operator", hardware)))
        if hardware == "sim"
        else ProcessSpec("teleop_node", (teleop,))
    )
    image_topics = ",".join(f"/{c}/{c}/color/image_raw" for c in cameras)
    settings = [f"/policy.cameras=[{image_topics}]"]
    if hardware == "sim":
        settings.append(f"/sim_cell.camera_nodes=[{','.join(cameras)}]")
    settings.extend(SESSIONS[session])
    return GraphSpec(
        settings=tuple(settings),
        session=session,
        cameras=tuple(cameras),
        user_parameter_files=user_files,
        name="collect",
        hardware=hardware,
        description="cameras, policy, arm controller, episode manager and the trainer's episode store",
        processes=(
            *drivers,
            ProcessSpec("policy_node", (_node("policy", "policy", hardware),)),
            ProcessSpec("episode_manager_node", (_node("episode_manager", "episode_manager", hardware),)),
            # Its close drains the episode writer (up to 30 s) and the iteration worker (up to 10 s): a
            # termination before that would drop the episode it is assembling.
            ProcessSpec("trainer_node", (_node("trainer", "trainer", hardware),), stop_timeout=45.0),
            operator,
        ),
    )


GRAPHS = {"collect": collect_graph}


def all_parameter_files() -> set[str]:
    """Every parameter file any graph, in any hardware profile, reads."""
    files: set[str] = set()
    for make in GRAPHS.values():
        for hardware in HARDWARE_PROFILES:
            for process in make(hardware).processes:
                files.update(process.parameter_files)
    return files


def all_executables() -> set[str]:
    exes: set[str] = set()
    for make in GRAPHS.values():
        for hardware in HARDWARE_PROFILES:
            exes.update(make(hardware).executables())
    return exes


def process_parameter_paths(graph: GraphSpec, process: ProcessSpec, config: Path | None = None) -> list[Path]:
    directory = config or config_dir()
    return [
        *(directory / f for f in process.parameter_files),
        *graph.user_parameter_files,
        *graph.extra_parameter_files,
    ]


def _every_node(graph: GraphSpec) -> list[NodeSpec]:
    """Every node of this graph's kind with every camera anything configures, in this hardware profile."""
    files = graph.user_parameter_files
    cameras = dict.fromkeys((*KNOWN_CAMERAS, *user_cameras(files), *graph.cameras))
    return list(GRAPHS[graph.name](graph.hardware, tuple(cameras), files, graph.session).nodes())


def with_overrides(graph: GraphSpec, overrides: Sequence[str], directory: Path) -> GraphSpec:
    """The graph with its own settings and `overrides` (NODE.PARAM=VALUE, later wins) as a parameter file."""
    items = [*graph.settings, *overrides]
    if not items:
        return graph
    return replace(graph, extra_parameter_files=(overrides_file(items, directory),))


def overrides_file(overrides: Sequence[str], directory: Path) -> Path:
    """Turn `NODE.PARAM=VALUE` strings into a ROS parameter file (values parsed as YAML scalars/lists)."""
    tree: dict[str, dict[str, dict[str, object]]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        # Node names hold no dots; parameter names may (`/trainer.stage1.ppo.lr`): the first dot ends the node.
        node, dot, param = key.partition(".")
        if not sep or not dot or not node or not param:
            raise ConfigError(f"--set {item!r}: expected NODE.PARAM=VALUE, e.g. /policy.action_noise=0.2")
        node = node if node.startswith("/") else "/" + node
        tree.setdefault(node, {"ros__parameters": {}})["ros__parameters"][param] = yaml.safe_load(raw)
    path = directory / "overrides.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def validate_graph(graph: GraphSpec, config: Path | None = None) -> dict[str, dict[str, object]]:
    """Check every parameter file of the graph against the schema of the nodes it addresses.

    Returns {fully qualified node name: {parameter: value}} as the nodes will see them: the schema's defaults,
    then the files in order (later wins). Raises ConfigError naming the file and the key on the first problem, or
    naming the nodes when a graph-wide setting (`GRAPH_WIDE`) would differ between them.
    """
    for exe in graph.executables():
        if exe not in NODE_EXECUTABLES:
            raise ConfigError(f"graph {graph.name}: executable {exe!r} is not installed by setup.py")
    effective: dict[str, dict[str, object]] = {
        n.fully_qualified_name: defaults(n.schema) for n in graph.nodes()
    }
    for process in graph.processes:
        for path in process_parameter_paths(graph, process, config):
            for node_key, values in load_parameter_file(path).items():
                targets = [n for n in graph.nodes() if node_key_matches(node_key, n.fully_qualified_name)]
                if not targets:
                    everyone = _every_node(graph)
                    inactive = [n for n in everyone if node_key_matches(node_key, n.fully_qualified_name)]
                    if not inactive:
                        known = ", ".join(n.fully_qualified_name for n in everyone)
                        raise ConfigError(
                            f"{path}: {node_key}: no node of graph {graph.name!r} has this name ({known})"
                        )
                    for node in inactive:  # configured but not started now: still checked
                        validate_parameters(path, node_key, values, node.schema)
                for node in targets:
                    if node not in process.nodes:
                        continue
                    checked = validate_parameters(path, node_key, values, node.schema)
                    effective[node.fully_qualified_name].update(checked)
    for node in graph.nodes():
        for config in CONFIGS.get(node.kind, ()):
            try:
                from_parameters(config, effective[node.fully_qualified_name])
            except ValueError as exc:
                raise ConfigError(f"graph {graph.name}: {node.fully_qualified_name}: {exc}") from exc
    for spec in GRAPH_WIDE:
        seen = {name: values[spec.name] for name, values in effective.items()}
        if len(set(seen.values())) > 1:
            each = ", ".join(f"{name}: {value!r}" for name, value in seen.items())
            raise ConfigError(
                f"graph {graph.name}: {spec.name} is one setting of the whole graph (set it under /**), "
                f"but the nodes would see different values ({each})"
            )
    return effective
