"""`irevla replay EPISODE --store PATH [--target sim|robot]`: a stored episode's actions played again, open loop,
and compared with the recording (`train/replay.py`; the robot side is `operator/replay_robot.py`).

Exit codes, as the operator verbs': 0 replayed; 1 nothing answered, or the store or episode is missing or
unreadable; 2 bad input (a task the simulated cell does not know, actions it cannot take); 3 refused (an
incomplete episode without --allow-incomplete, no confirmation, the session not paused, homing refused, the
session resumed during the replay); 130 Ctrl-C (the arm holds). Heavy imports (MuJoCo, rclpy) happen only when
the verb runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from irevla_ros.operator.verbs import EXIT_INTERRUPTED, EXIT_NO_ANSWER, EXIT_REFUSED, _add_graph_args

EXIT_BAD_INPUT = 2
MAX_SPEED = 2.0  # the arm controller's step and speed limits still bind; this bounds a typo


def _speed(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"speed must be a number, got {raw!r}") from None
    if not 0 < value <= MAX_SPEED:
        raise argparse.ArgumentTypeError(f"speed must be in (0, {MAX_SPEED:g}], got {raw}")
    return value


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _list(store: Any) -> int:
    rows = store.list()
    print(
        f"{'episode id':<28} {'task':<24} {'source':<12} {'outcome':<9} {'steps':>5}  {'state':<10}  scene seed"
    )
    for r in rows:
        state = "corrupt" if r.corrupt else ("complete" if r.complete else "incomplete")
        seed = "-" if r.scene_seed is None else str(r.scene_seed)  # -: none recorded (robot, older store)
        print(
            f"{r.episode_id:<28} {r.task:<24} {r.source:<12} {r.outcome:<9} {r.num_steps:>5}  {state:<10}  {seed}"
        )
    _say(f"{len(rows)} episodes in {store.root}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from irevla_ros.store.episode_store import EpisodeStore
    from irevla_ros.store.errors import CorruptEpisodeError
    from irevla_ros.train import replay

    verb = "irevla replay"
    if args.target == "robot" and not args.list and not args.yes and not sys.stdin.isatty():
        # Decided before anything is loaded or contacted: no confirmation can come.
        _say(
            f"{verb}: refusing to move the arm without a confirmation: stdin is not a terminal, so nobody can "
            "type the episode id; pass --yes to confirm on the command line"
        )
        return EXIT_REFUSED
    try:
        store = EpisodeStore(args.store, read_only=True)
    except FileNotFoundError as exc:
        _say(f"{verb}: {exc} (is --store the folder that holds catalog.sqlite?)")
        return EXIT_NO_ANSWER
    try:
        if args.list:
            return _list(store)
        if not args.episode:
            _say(f"{verb}: name an episode id (irevla replay --list --store {args.store} lists them)")
            return EXIT_BAD_INPUT
        plan = replay.load_plan(store, args.episode, allow_incomplete=args.allow_incomplete)
    except (replay.EpisodeNotFoundError, CorruptEpisodeError) as exc:
        _say(f"{verb}: {exc}")
        return EXIT_NO_ANSWER
    except replay.IncompleteEpisodeError as exc:
        _say(f"{verb}: {exc}")
        return EXIT_REFUSED
    except replay.ReplayError as exc:
        _say(f"{verb}: {exc}")
        return EXIT_BAD_INPUT
    finally:
        store.close()
    if args.target == "sim":
        return _replay_sim(args, plan)
    return _replay_robot(args, plan)


def _replay_sim(args: argparse.Namespace, plan: Any) -> int:
    from irevla_ros.bringup.graph import DEFAULT_CAMERAS, KNOWN_CAMERAS
    from irevla_ros.train import replay
    from irevla_ros.train.rollout import RolloutSettings

    settings = RolloutSettings.from_graph(
        replay.sim_cameras(plan, KNOWN_CAMERAS, DEFAULT_CAMERAS), args.overrides
    )
    every = max(1, plan.steps // 10)

    def progress(step: int, steps: int, deviation: float) -> None:
        if step % every == 0 or step == steps - 1:
            _say(
                f"[replay] step {step + 1}/{steps}: end effector {1000 * deviation:.2f} mm from the recording"
            )

    seed, source = replay.layout_seed(plan, args.seed)
    layout = {
        "given": f"layout seed {seed} from --seed",
        "recorded": f"layout seed {seed} recorded with the episode",
        "none": "no layout seed recorded with the episode (a robot episode, or one stored before scene seeds "
        "were recorded): the task's first scene of a fresh cell; --seed names another",
    }[source]
    _say(f"[replay] {plan.episode_id}: {plan.steps} steps of {plan.task} in the simulated cell ({layout})")
    try:
        result = replay.replay_in_sim(plan, settings, seed=args.seed, progress=progress)
    except replay.SimTaskError as exc:
        _say(f"irevla replay: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _say("irevla replay: interrupted")
        return EXIT_INTERRUPTED
    print(result.summary(), flush=True)
    if args.json:
        print(json.dumps(result.to_dict()), flush=True)
    return 0


def _replay_robot(args: argparse.Namespace, plan: Any) -> int:
    from irevla_ros.operator.client import NoAnswer, operator_client
    from irevla_ros.operator.replay_robot import ReplayRefused, RobotReplay, type_to_confirm

    verb = "irevla replay"
    homing = False
    try:
        with operator_client(args.domain, args.timeout) as client:
            robot = RobotReplay(client, plan, args.speed)
            here = robot.check()
            seconds = plan.steps * plan.period / args.speed
            _say(
                f"[replay] {plan.episode_id} ({plan.task}, recorded {plan.outcome}) on the arm controller of "
                f"ROS_DOMAIN_ID {args.domain}: the arm goes home from {[round(float(x), 3) for x in here]}, then "
                f"{plan.steps} recorded commands over {seconds:.1f} s (speed {args.speed:g}) through its safety "
                "layer. Ctrl-C holds the arm."
            )
            if not args.yes and not type_to_confirm(plan.episode_id, input):
                _say(f"{verb}: not confirmed: the arm did not move")
                return EXIT_REFUSED
            _say("[replay] homing (the arm controller's reset_home; Ctrl-C latches the e-stop to stop it)")
            homing = True
            robot.home()
            homing = False
            every = max(1, plan.steps // 10)
            result = robot.play(
                lambda k, n: _say(f"[replay] step {k + 1}/{n} sent") if k % every == 0 or k == n - 1 else None
            )
            print(result.summary(), flush=True)
            if args.json:
                print(json.dumps(result.to_dict()), flush=True)
            if result.interrupted:
                _say(f"{verb}: interrupted: the arm holds")
                return EXIT_INTERRUPTED
            if result.stopped:
                _say(f"{verb}: stopped, the arm holds: {result.stopped}")
                return EXIT_REFUSED
            return 0
    except NoAnswer as exc:
        _say(f"{verb}: {exc}")
        return EXIT_NO_ANSWER
    except ReplayRefused as exc:
        _say(f"{verb}: refused: {exc}")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        _say(
            f"{verb}: interrupted"
            + (": the homing was stopped with the e-stop (irevla clear-estop to go on)" if homing else "")
        )
        return EXIT_INTERRUPTED


def add_verbs(sub: Any, verbs: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Register `replay`."""
    p = sub.add_parser(
        "replay",
        help="play a stored episode's actions again in the simulated cell (default) or on the robot, and compare",
    )
    p.add_argument("episode", nargs="?", help="episode id (--list shows the store's)")
    p.add_argument("--store", required=True, help="episode store root (the folder with catalog.sqlite)")
    p.add_argument("--list", action="store_true", help="list the store's episodes and exit")
    p.add_argument(
        "--target",
        choices=("sim", "robot"),
        default="sim",
        help="sim: a simulated cell of its own, no ROS (default); robot: the running graph's arm controller "
        "(/policy/action, its safety layer), after homing and a confirmation, with the session paused",
    )
    p.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        help=f"robot: playback rate relative to the recording, (0, {MAX_SPEED:g}] (default 1; below "
        "control_period / watchdog_timeout the controller holds between commands); sim runs unpaced",
    )
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="replay an incomplete episode too (missing steps become holds)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sim: the layout seed of the scene to reset (default: the one recorded with the episode; for an "
        "episode without one, a robot's or one stored before seeds were recorded, the task's first scene of "
        "a fresh cell, i.e. a fresh graph's first episode of that task)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NODE.PARAM=VALUE",
        help="sim: a parameter of the sim graph the replay's cell and safety layer are built from, as the "
        "episode's session ran (e.g. --set /sim_cell.seed=3); repeatable",
    )
    p.add_argument(
        "--yes", action="store_true", help="robot: confirm on the command line (no typed episode id)"
    )
    _add_graph_args(p)
    verbs["replay"] = cmd_replay
