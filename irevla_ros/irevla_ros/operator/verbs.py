"""`irevla label|reset|pause|resume|estop|clear-estop|iterate|status`: the operator verbs on the command line.

Exit codes: 0 done; 1 nothing answered within --timeout (the message says what to check); 3 the node answered
and refused (its message is printed, e.g. a reset while no session runs); 130 interrupted (Ctrl-C).
rclpy is imported only when a verb runs, so the other verbs of `irevla` never load it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from irevla_ros import topics
from irevla_ros.operator.view import format_feedback, format_result, format_status, no_answer_message

EXIT_NO_ANSWER = 1
EXIT_REFUSED = 3
EXIT_INTERRUPTED = 130
STATUS_SETTLE = 3.0  # s: `status --once` waits this long after the newest source for the others
# verb -> (Trigger service, help)
TRIGGERS: dict[str, tuple[str, str]] = {
    "reset": (topics.RESET_EPISODE, "end the running episode (aborted) and reset the scene for the next one"),
    "pause": (topics.PAUSE, "pause the session (a running episode ends aborted); `irevla resume` goes on"),
    "resume": (topics.RESUME, "resume a paused session"),
    "estop": (topics.ESTOP, "latch the arm controller's e-stop: the arm holds until `irevla clear-estop`"),
    "clear-estop": (
        topics.CLEAR_ESTOP,
        "clear the e-stop (the arm backend recovers first, or it stays latched)",
    ),
}
LABELS = {"success": topics.LABEL_SUCCESS, "failure": topics.LABEL_FAILURE}


def _domain(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"ROS domain id must be an integer 0..232, got {raw!r} (from --domain or ROS_DOMAIN_ID)"
        ) from None
    if not 0 <= value <= 232:  # the DDS port mapping's limit
        raise argparse.ArgumentTypeError(f"ROS domain id must be 0..232, got {value}")
    return value


def _positive(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


def _add_graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--domain",
        type=_domain,
        # A string: argparse converts it with _domain when the verb runs, so a bad ROS_DOMAIN_ID is named.
        default=os.environ.get("ROS_DOMAIN_ID", "").strip() or "0",
        help="ROS domain id of the graph (default: ROS_DOMAIN_ID from the environment, else 0)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=5.0,
        help="seconds to wait for the graph to answer before giving up with exit code 1 (default: 5)",
    )


def _run(verb: str, args: argparse.Namespace, body: Callable[[object], int]) -> int:
    from irevla_ros.operator.client import NoAnswer, operator_client

    try:
        with operator_client(args.domain, args.timeout) as client:
            return body(client)
    except NoAnswer as exc:
        print(f"irevla {verb}: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except KeyboardInterrupt:
        print(f"irevla {verb}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _trigger(verb: str, service: str) -> Callable[[argparse.Namespace], int]:
    def cmd(args: argparse.Namespace) -> int:
        def body(client: object) -> int:
            ok, message = client.trigger(service)  # type: ignore[attr-defined]
            if ok:
                print(f"{service}: {message}")
                return 0
            print(f"irevla {verb}: {service} refused: {message}", file=sys.stderr)
            return EXIT_REFUSED

        return _run(verb, args, body)

    return cmd


def cmd_label(args: argparse.Namespace) -> int:
    return _trigger("label", LABELS[args.outcome])(args)


def cmd_iterate(args: argparse.Namespace) -> int:
    from irevla_interfaces.action import RunIteration

    goal = RunIteration.Goal(
        reason=args.reason, max_supervised_steps=args.max_supervised_steps, announce=not args.no_announce
    )

    def body(client: object) -> int:
        outcome = client.iterate(  # type: ignore[attr-defined]
            goal,
            on_feedback=lambda stage, progress, message: print(
                format_feedback(stage, progress, message), flush=True
            ),
            on_accepted=lambda: print(
                f"{topics.RUN_ITERATION}: goal accepted (reason {goal.reason}); Ctrl-C cancels it", flush=True
            ),
            on_cancel=lambda: print("cancelling the iteration ...", flush=True),
        )
        print(format_result(outcome.status, outcome.promoted, outcome.new_version, outcome.message,
                            outcome.metrics), flush=True)  # fmt: skip
        if outcome.status == "succeeded":
            return 0
        return EXIT_INTERRUPTED if outcome.status.startswith("cancel") else EXIT_REFUSED

    return _run("iterate", args, body)


def cmd_status(args: argparse.Namespace) -> int:
    def body(client: object) -> int:
        snap = client.watch_status()  # type: ignore[attr-defined]
        if not args.watch:
            deadline = time.monotonic() + args.timeout
            client.spin_until(lambda: not snap.empty(), deadline)  # type: ignore[attr-defined]
            # The rest publish at least once a second (or are latched): a graph without a policy node, say,
            # should not cost the whole timeout. Discovery is not simultaneous, though (one node's topics can come
            # seconds after another's on a loaded machine): the settle restarts with each new source, and a status
            # topic with a publisher already discovered is waited for until the timeout.
            newest = {"sources": len(snap.received), "at": time.monotonic()}

            def settled() -> bool:
                now = time.monotonic()
                if snap.complete():
                    return True
                if len(snap.received) != newest["sources"]:
                    newest.update(sources=len(snap.received), at=now)
                if now - newest["at"] < STATUS_SETTLE:
                    return False
                return not client.silent_sources(snap)  # type: ignore[attr-defined]

            client.spin_until(settled, deadline)  # type: ignore[attr-defined]
            if snap.empty():
                raise_no_answer(args)
            print(format_status(snap), flush=True)
            return 0
        clear = "\033[H\033[2J" if sys.stdout.isatty() else ""
        while True:  # until Ctrl-C, like `watch`
            next_frame = time.monotonic() + args.period
            client.spin_until(lambda: False, next_frame)  # type: ignore[attr-defined]
            frame = format_status(snap, time.monotonic())
            if snap.empty():
                frame += (
                    f"\n(nothing received yet on ROS_DOMAIN_ID {args.domain}: is the graph running, on this"
                    " domain? Ctrl-C stops)"
                )
            print(f"{clear}{frame}\n", flush=True)

    code = _run("status", args, body)
    return 0 if args.watch and code == EXIT_INTERRUPTED else code


def raise_no_answer(args: argparse.Namespace) -> None:
    from irevla_ros.operator.client import NoAnswer

    names = "/episode_manager/status, /trainer/status, /trainer/policy_version, /policy/status, /diagnostics"
    raise NoAnswer(no_answer_message("status topic", f"({names})", args.domain, args.timeout))


def add_verbs(sub: argparse._SubParsersAction, verbs: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the operator verbs to `irevla`'s subparsers."""
    p = sub.add_parser("label", help="label the current (or just ended) episode: success or failure")
    p.add_argument("outcome", choices=sorted(LABELS))
    _add_graph_args(p)
    verbs["label"] = cmd_label
    for verb, (service, help_text) in TRIGGERS.items():
        p = sub.add_parser(verb, help=f"{help_text} ({service})")
        _add_graph_args(p)
        verbs[verb] = _trigger(verb, service)
    p = sub.add_parser(
        "iterate",
        help=f"end the session and run one iRe-VLA iteration ({topics.RUN_ITERATION}); live feedback, Ctrl-C cancels",
    )
    p.add_argument("--reason", default="operator", help="why the session ends (default: operator)")
    p.add_argument(
        "--max-supervised-steps", type=int, default=0, help="Stage 2 steps (0: the trainer's configuration)"
    )
    p.add_argument("--no-announce", action="store_true", help="do not announce the new version if it passes")
    _add_graph_args(p)
    verbs["iterate"] = cmd_iterate
    p = sub.add_parser(
        "status", help="session, episode, trainer phase, version, success rate and interventions, in one view"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="print one view and exit (the default)")
    mode.add_argument("--watch", action="store_true", help="refresh the view until Ctrl-C, like `watch`")
    p.add_argument(
        "--period", type=_positive, default=1.0, help="--watch refresh period in seconds (default: 1)"
    )
    _add_graph_args(p)
    verbs["status"] = cmd_status
