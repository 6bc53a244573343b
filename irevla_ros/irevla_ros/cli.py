"""`irevla <verb>`: the command-line tool for people. Every verb has --help."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from irevla_ros.bringup.graph import (
    DEFAULT_CAMERAS,
    GRAPHS,
    HARDWARE_PROFILES,
    KNOWN_CAMERAS,
    SESSIONS,
    GraphSpec,
    validate_graph,
)
from irevla_ros.param_spec import ConfigError

Verb = Callable[[argparse.Namespace], int]


def _add_graph_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--graph", default="collect", choices=sorted(GRAPHS), help="node graph (default: collect)"
    )
    parser.add_argument(
        "--hardware", default="sim", choices=HARDWARE_PROFILES, help="hardware profile (default: sim)"
    )
    parser.add_argument(
        "--cameras",
        default=",".join(DEFAULT_CAMERAS),
        help=f"camera nodes, comma-separated: {', '.join(KNOWN_CAMERAS)} or cameras your --params-file defines "
        f"as /<name>/<name> (default: {','.join(DEFAULT_CAMERAS)})",
    )
    parser.add_argument(
        "--session",
        default="profile",
        choices=sorted(SESSIONS),
        help="demonstrate: record demonstrations (robot profiles: teleoperated); policy: run the VLA (Stage 1 "
        "live, takeovers); profile: the hardware profile's choice (sim: demonstrate, robot profiles: policy)",
    )
    parser.add_argument(
        "--params-file",
        dest="params_files",
        action="append",
        default=[],
        metavar="YAML",
        help="your cell's parameter file, read after the package's (its values win; repeatable); "
        "ros2 launch: params_file:=",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NODE.PARAM=VALUE",
        help="override a parameter, e.g. --set /policy.action_noise=0.2 (repeatable)",
    )


def _graph(args: argparse.Namespace) -> GraphSpec:
    cameras = tuple(c for c in args.cameras.split(",") if c)
    return GRAPHS[args.graph](args.hardware, cameras, tuple(args.params_files), args.session)


def cmd_graph(args: argparse.Namespace) -> int:
    graph = _graph(args)
    print(f"graph {graph.title}: {graph.description}")
    print(f"{'process (executable)':<24} {'node':<22} {'parameter files'}")
    for process in graph.processes:
        for node in process.nodes:
            print(
                f"{process.executable:<24} {node.fully_qualified_name:<22} {', '.join(node.parameter_files)}"
            )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from irevla_ros.bringup.graph import with_overrides

    with TemporaryDirectory() as tmp:
        graph = with_overrides(_graph(args), args.overrides, Path(tmp))
        effective = validate_graph(graph)
    for node, values in effective.items():
        print(node)
        for key, value in sorted(values.items()):
            print(f"  {key}: {value!r}")
    print(f"configuration of graph {graph.title} is valid")
    return 0


def cmd_bringup(args: argparse.Namespace) -> int:
    from irevla_ros.bringup.launcher import run_graph

    return run_graph(_graph(args), args.overrides, duration=args.duration)


def cmd_demo(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from irevla_ros.bringup.demo import demo_exit_code, run_demo

    summary = run_demo(
        episodes=args.episodes,
        store=Path(args.store) if args.store else None,
        noise=args.noise,
        timeout=args.timeout,
        overrides=args.overrides,
        cameras=tuple(c for c in args.cameras.split(",") if c),
        vla_episodes=args.vla_episodes,
        sft_steps=args.sft_steps,
    )
    print(json.dumps(summary), flush=True)
    for failure in summary["failed"]:  # type: ignore[attr-defined]
        print(f"irevla demo: {failure}", file=sys.stderr)
    expected = args.episodes + 2 * max(0, args.vla_episodes)  # the VLA runs a session before and after
    return demo_exit_code(summary, expected)


def cmd_eval(args: argparse.Namespace) -> int:
    from irevla_ros.train import evaluation

    try:
        return evaluation.cmd_eval(args)
    except ValueError as exc:  # unknown task or version, corrupt version, bad counts: named in the message
        print(f"irevla eval: {exc}", file=sys.stderr)
        return 2


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Verb]]:
    parser = argparse.ArgumentParser(
        prog="irevla",
        description="irevla_ros: improve a VLA policy on the robot with online RL and supervised fine-tuning.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs: dict[str, Verb] = {}

    p = sub.add_parser("bringup", help="start a node graph (what `ros2 launch` does, for pip-only machines)")
    _add_graph_args(p)
    p.add_argument(
        "--duration", type=float, default=0.0, help="stop after this many seconds (0: run until Ctrl-C)"
    )
    verbs["bringup"] = cmd_bringup

    p = sub.add_parser("demo", help="run a supervised session in the simulated cell and print a JSON summary")
    p.add_argument("--episodes", type=int, default=5, help="expert episodes to collect (default: 5)")
    p.add_argument(
        "--vla-episodes",
        type=int,
        default=3,
        help="VLA episodes per session, before and after the iteration (0: skip)",
    )
    p.add_argument(
        "--sft-steps", type=int, default=150, help="Stage 0 and Stage 2 gradient steps (default: 150)"
    )
    p.add_argument("--store", default="", help="episode store folder (default: runs/demo-<time>/store)")
    p.add_argument("--noise", type=float, default=0.1, help="std of the scripted expert's action noise")
    p.add_argument("--timeout", type=float, default=1200.0, help="give up after this many wall seconds")
    p.add_argument(
        "--cameras", default=",".join(DEFAULT_CAMERAS), help="camera nodes, e.g. camera,wrist_camera"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NODE.PARAM=VALUE",
        help="override a parameter of the graph (repeatable)",
    )
    verbs["demo"] = cmd_demo

    p = sub.add_parser("graph", help="print the node graph: processes, nodes, parameter files")
    _add_graph_args(p)
    verbs["graph"] = cmd_graph

    p = sub.add_parser(
        "check-config", help="validate the parameter files of a graph and print the effective values"
    )
    _add_graph_args(p)
    verbs["check-config"] = cmd_check_config

    p = sub.add_parser(
        "eval", help="success rate of a model version per task in the simulated cell (direct rollouts)"
    )
    from irevla_ros.train.evaluation import add_arguments as add_eval_arguments

    add_eval_arguments(p)
    verbs["eval"] = cmd_eval

    from irevla_ros.operator.verbs import add_verbs as add_operator_verbs

    add_operator_verbs(sub, verbs)  # label, reset, pause, resume, estop, clear-estop, iterate, status

    from irevla_ros.train.stage0 import add_verbs as add_stage0_verbs

    add_stage0_verbs(sub, verbs)  # train-stage0

    from irevla_ros.interop.verbs import add_verbs as add_interop_verbs

    add_interop_verbs(sub, verbs)  # export lerobot, import lerobot

    from irevla_ros.operator.replay_verb import add_verbs as add_replay_verbs

    add_replay_verbs(sub, verbs)  # replay

    # Listed for --help only: main() hands `irevla bench-sim ...` to the benchmark's own parser.
    sub.add_parser(
        "bench-sim", help="the iRe-VLA simulation benchmark (Stage 0, RL + SL iterations, baselines)"
    )
    return parser, verbs


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench-sim"]:  # its own parser takes every option (argparse.REMAINDER would not)
        from irevla_ros.bench import ire_vla_sim

        return ire_vla_sim.main(args_list[1:])
    parser, verbs = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 1
    try:
        return verbs[args.verb](args)
    except ConfigError as exc:
        print(f"irevla {args.verb}: configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
