"""What the operator verbs print, without ROS: the status view, feedback and result lines, and the message when
no graph answers. The rclpy side (`operator.client`) turns messages into these plain values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class SessionView:
    """/episode_manager/status (irevla_interfaces/SessionStatus), state and outcome as names."""

    state: str
    episode_id: str = ""
    episode_index: int = 0
    step: int = 0
    episodes_done: int = 0
    successes: int = 0
    success_rate: float = 0.0
    task: str = ""
    instruction: str = ""
    last_outcome: str = ""
    message: str = ""


@dataclass
class TrainerView:
    """/trainer/status (irevla_interfaces/TrainerStatus), state as a name, metrics as a dict."""

    state: str
    iteration: int = 0
    stage: str = ""
    progress: float = 0.0
    episodes_stored: int = 0
    episodes_incomplete: int = 0
    episodes_pending: int = 0
    active_version: str = ""
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class VersionView:
    """/trainer/policy_version (latched): the newest announced version."""

    version_id: str
    stage: str = ""
    parent_version: str = ""
    heads_only: bool = False


@dataclass
class DiagnosticView:
    """One diagnostic_msgs/DiagnosticStatus (the policy's /policy/status, the arm controller's /diagnostics)."""

    level: str  # ok, warn, error, stale
    message: str = ""
    values: dict[str, str] = field(default_factory=dict)


@dataclass
class StatusSnapshot:
    """The newest of each source; None: nothing received from it (yet)."""

    domain: int
    session: SessionView | None = None
    trainer: TrainerView | None = None
    version: VersionView | None = None
    policy: DiagnosticView | None = None
    arm: DiagnosticView | None = None
    # Source -> monotonic time of its newest message: a node that stopped publishing shows as stale.
    received: dict[str, float] = field(default_factory=dict)

    def complete(self) -> bool:
        return None not in (self.session, self.trainer, self.version, self.policy, self.arm)

    def empty(self) -> bool:
        return (self.session, self.trainer, self.version, self.policy, self.arm) == (None,) * 5


# Which topic each line reads, to name it when it is missing.
SOURCES = {
    "session": "/episode_manager/status",
    "trainer": "/trainer/status",
    "version": "/trainer/policy_version",
    "policy": "/policy/status",
    "arm": "/diagnostics (arm_controller: arm)",
}


def _percent(rate: float) -> str:
    return f"{100 * rate:.0f}%"


def _missing(source: str) -> str:
    return f"-  (nothing on {SOURCES[source]})"


STALE_AFTER = 3.0  # s: every source but the latched version publishes at least once a second


def format_status(snap: StatusSnapshot, now: float | None = None) -> str:
    """The compact status view: one or two lines per source, fixed order, missing sources named, and (given the
    monotonic `now`) sources silent for longer than STALE_AFTER marked stale."""
    lines = [f"irevla status  (ROS_DOMAIN_ID {snap.domain})"]
    stale = [
        f"{SOURCES[source]} {now - at:.0f} s ago"
        for source, at in snap.received.items()
        if now is not None and source != "version" and now - at > STALE_AFTER
    ]
    s = snap.session
    if s is None:
        lines.append(f"session   {_missing('session')}")
    else:
        step = f", step {s.step}" if s.step else ""  # 0 from an episode manager that does not count steps
        episode = f"episode {s.episode_id} (#{s.episode_index}{step})" if s.episode_id else "no episode"
        task = f"  task {s.task}" + (f' "{s.instruction}"' if s.instruction else "") if s.task else ""
        lines.append(f"session   {s.state}  {episode}{task}" + (f"  [{s.message}]" if s.message else ""))
        lines.append(
            f"          success rate {s.successes}/{s.episodes_done} ({_percent(s.success_rate)})"
            f"  last outcome {s.last_outcome or '-'}"
        )
    t = snap.trainer
    if t is None:
        lines.append(f"trainer   {_missing('trainer')}")
    else:
        lines.append(
            f"trainer   {t.state}  iteration {t.iteration}  stage {t.stage or '-'} {_percent(t.progress)}"
            f"  active {t.active_version or '-'}"
        )
        rate = t.metrics.get("session_success_rate")
        session = f"  session episodes {int(t.metrics.get('session_episodes', 0))}" + (
            f" ({_percent(rate)} success)" if rate is not None else ""
        )
        lines.append(
            f"          stored {t.episodes_stored} ({t.episodes_incomplete} incomplete,"
            f" {t.episodes_pending} pending){session}" + (f"  [{t.message}]" if t.message else "")
        )
    v = snap.version
    if v is None:
        lines.append(f"version   {_missing('version')}")
    else:
        parent = f", parent {v.parent_version}" if v.parent_version else ""
        lines.append(
            f"version   {v.version_id} ({v.stage or '?'}{parent}{', heads only' if v.heads_only else ''})"
        )
    p = snap.policy
    if p is None:
        lines.append(f"policy    {_missing('policy')}")
    else:
        lines.append(
            f"policy    {p.level}  {p.message}  missed ticks {p.values.get('missed_ticks', '?')}"
            f"  steps {p.values.get('steps_published', '?')}"
        )
    a = snap.arm
    if a is None:
        lines.append(f"arm       {_missing('arm')}")
    else:
        sent, rejected = a.values.get("commands_sent", "?"), a.values.get("commands_rejected", "?")
        lines.append(f"arm       {a.level}  {a.message}  commands {sent} sent, {rejected} rejected")
    # What stopped or overrode the policy: the latched e-stop, the safety layer's holds, the policy's own holds.
    # The arm's own "estop" value: its status is an error for other reasons too (stale state, disconnected).
    latched = (
        a is not None and a.values.get("estop", "latched" if a.level == "error" else "clear") == "latched"
    )
    estop = "-" if a is None else ("LATCHED" if latched else "clear")
    arm_holds = "-" if a is None else a.values.get("holds", "?")
    policy_holds = "-" if p is None else p.values.get("holds", "?")
    lines.append(f"interventions  e-stop {estop}  arm holds {arm_holds}  policy holds {policy_holds}")
    if stale:
        lines.append("STALE (last message): " + ", ".join(stale))
    return "\n".join(lines)


def format_feedback(stage: str, progress: float, message: str) -> str:
    return f"[{stage or '-'} {_percent(progress):>4}] {message}".rstrip()


def format_result(
    status: str, promoted: bool, new_version: str, message: str, metrics: Mapping[str, float]
) -> str:
    lines = [
        f"iteration {status}: "
        + (f"new version {new_version}" if new_version else "no new version")
        + (" (promoted)" if promoted else " (not promoted)" if new_version else "")
    ]
    if message:
        lines.append(f"  {message}")
    lines += [f"  {name}: {value:g}" for name, value in metrics.items()]
    return "\n".join(lines)


def no_answer_message(what: str, name: str, domain: int, timeout: float, hint: str = "") -> str:
    """Why a verb gave up: the service/action/topics that did not answer, where it looked, and what to check."""
    discovery = os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE", "")
    peers = os.environ.get("ROS_STATIC_PEERS", "")
    if discovery == "OFF":
        range_hint = (
            f"ROS_AUTOMATIC_DISCOVERY_RANGE is OFF: only ROS_STATIC_PEERS ({peers or 'none'}) are found"
        )
    elif discovery == "LOCALHOST":
        range_hint = f"ROS_AUTOMATIC_DISCOVERY_RANGE is {discovery}: the graph must run on this host" + (
            f" or be one of ROS_STATIC_PEERS ({peers})" if peers else " (or be listed in ROS_STATIC_PEERS)"
        )
    else:
        range_hint = (
            f"ROS_AUTOMATIC_DISCOVERY_RANGE is {discovery or 'unset (SUBNET)'}: on another host, is it on this"
            " subnet, with multicast reaching it, and the same setting there?"
        )
    return (
        f"no {what} {name} answered within {timeout:g} s on ROS_DOMAIN_ID {domain}.\n"
        f"  Is the graph running (irevla bringup, or ros2 launch irevla_ros collect.launch.py)?"
        + (f" {hint}" if hint else "")
        + "\n"
        f"  Is it on the same ROS_DOMAIN_ID ({domain} here; set it or pass --domain N)?\n"
        f"  {range_hint}"
    )
