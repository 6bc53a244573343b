"""Episode assembly: steps of many concurrent episodes collected in memory and judged at END.

An episode is complete when every step index up to the producer's count arrived, without conflicting duplicates,
and its steps keep time: stamps strictly increasing, one control period apart (when the assembler knows the
period), and no step acting on an observation newer than itself. Anything else is stored too, as incomplete, with
the reasons (and the number of timing errors in the catalogue), so it never reaches training unnoticed.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from irevla_ros.store.errors import EpisodeStateError, LateStepError, UnknownEpisodeError
from irevla_ros.store.records import AssembledEpisode, EpisodeMeta, StepData

# A step stamp may differ from its slot on the control grid by this share of a period (wall timers on a robot).
PERIOD_TOLERANCE = 0.5


@dataclass
class _OpenEpisode:
    meta: EpisodeMeta
    steps: dict[int, StepData] = field(default_factory=dict)
    duplicates_dropped: int = 0
    conflicting: set[int] = field(default_factory=set)
    out_of_order: int = 0
    max_index: int = -1


def _ranges(indices: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7' so a long gap stays a short message."""
    parts: list[str] = []
    start = prev = None
    for i in indices:
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(parts)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:+.1f} ms"


def timing_problems(
    steps: list[StepData], control_period_ns: int | None, tolerance: float = PERIOD_TOLERANCE
) -> tuple[int, list[str]]:
    """(number of timing errors, one reason per kind) for steps sorted by index.

    A step's stamp must be later than the previous step's, by (index difference) control periods within
    `tolerance` of a period when the period is known (a missing step is reported as missing, not here; a hold is
    a recorded step at its own tick). No image may have been captured after the step it was acted on."""
    not_later: list[tuple[int, int]] = []
    off_grid: list[tuple[int, int]] = []
    future: list[tuple[int, str, int]] = []
    for previous, step in itertools.pairwise(steps):
        gap = step.stamp_ns - previous.stamp_ns
        if gap <= 0:
            not_later.append((step.step_index, gap))
        elif control_period_ns:
            expected = (step.step_index - previous.step_index) * control_period_ns
            if abs(gap - expected) > tolerance * control_period_ns:
                off_grid.append((step.step_index, gap - expected))
    for step in steps:
        for camera, stamp in sorted(step.image_stamps_ns.items()):
            if stamp > step.stamp_ns:
                future.append((step.step_index, camera, stamp - step.stamp_ns))
    reasons = []
    if not_later:
        index, gap = not_later[0]
        reasons.append(
            f"timing: {len(not_later)} step(s) not stamped after the previous step "
            f"(first: step {index}, {_ms(gap)})"
        )
    if off_grid:
        index, off = off_grid[0]
        reasons.append(
            f"timing: {len(off_grid)} step(s) not one control period ({control_period_ns / 1e6:g} ms) after "
            f"the previous one (first: step {index}, {_ms(off)} off the grid)"
        )
    if future:
        index, camera, ahead = future[0]
        reasons.append(
            f"timing: {len(future)} image(s) captured after the step that acted on them "
            f"(first: step {index}, camera {camera!r}, {_ms(ahead)})"
        )
    return len(not_later) + len(off_grid) + len(future), reasons


class EpisodeAssembler:
    """Collects steps of many concurrent episodes in memory and judges completeness at END.

    Thread-safe. Memory is held until `end` or `discard`; remembering ended ids (bounded) lets late steps
    be told apart from steps of never-started episodes. `control_period_ns`: the producer's control period,
    which consecutive step stamps must keep (None: only their order and the observation ages are checked).
    """

    def __init__(self, remember_ended: int = 10_000, *, control_period_ns: int | None = None) -> None:
        if control_period_ns is not None and control_period_ns <= 0:
            raise ValueError(f"control_period_ns must be positive, got {control_period_ns}")
        self._lock = threading.Lock()
        self._open: dict[str, _OpenEpisode] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._remember_ended = remember_ended
        self.control_period_ns = control_period_ns
        self.late_steps = 0
        self.unknown_steps = 0

    def start(self, meta: EpisodeMeta) -> None:
        """Open an episode. A repeated START with identical metadata is ignored (re-sent events)."""
        with self._lock:
            eid = meta.episode_id
            if eid in self._ended:
                raise EpisodeStateError(f"episode {eid!r} already ended; START ignored")
            current = self._open.get(eid)
            if current is not None:
                if current.meta != meta:
                    raise EpisodeStateError(
                        f"episode {eid!r} already started with different metadata: {current.meta} vs {meta}"
                    )
                return
            self._open[eid] = _OpenEpisode(meta=dataclasses.replace(meta))

    def add_step(self, step: StepData) -> None:
        with self._lock:
            eid = step.episode_id
            episode = self._open.get(eid)
            if episode is None:
                if eid in self._ended:
                    self.late_steps += 1
                    raise LateStepError(
                        f"step {step.step_index} of episode {eid!r} arrived after its END; not stored"
                    )
                self.unknown_steps += 1
                raise UnknownEpisodeError(
                    f"step {step.step_index} for episode {eid!r}, which was never started"
                )
            index = int(step.step_index)
            previous = episode.steps.get(index)
            if previous is not None:
                if previous.same_as(step):
                    episode.duplicates_dropped += 1
                else:
                    episode.conflicting.add(index)
                return
            if index < episode.max_index:
                episode.out_of_order += 1
            episode.max_index = max(episode.max_index, index)
            episode.steps[index] = step

    def end(
        self,
        episode_id: str,
        outcome: str,
        label_source: str,
        num_steps: int | None,
        ended_ns: int,
    ) -> AssembledEpisode:
        """Close an episode; `num_steps` is the count the producer says it emitted (None: unknown)."""
        with self._lock:
            episode = self._open.get(episode_id)
            if episode is None:
                if episode_id in self._ended:
                    raise EpisodeStateError(f"episode {episode_id!r} already ended")
                raise UnknownEpisodeError(f"END for episode {episode_id!r}, which was never started")
            # Validates outcome/label_source before the episode is taken out of the open set.
            meta = dataclasses.replace(
                episode.meta,
                outcome=outcome,
                label_source=label_source,
                ended_ns=ended_ns,
                expected_steps=num_steps,
            )
            del self._open[episode_id]
            self._ended[episode_id] = None
            while len(self._ended) > self._remember_ended:
                self._ended.popitem(last=False)
        indices = sorted(episode.steps)
        steps = [episode.steps[i] for i in indices]
        # The catalogue names the version that produced the actions (the step records say; START may not know).
        versions = [s.policy_version for s in steps if s.policy_version]
        if versions:
            meta = dataclasses.replace(meta, policy_version=versions[0])
        reasons: list[str] = []
        if not indices:
            reasons.append("no steps received")
        upper = max(num_steps or 0, episode.max_index + 1)
        missing = sorted(set(range(upper)) - set(indices))
        if missing:
            reasons.append(f"missing step indices {_ranges(missing)} ({len(missing)} of {upper})")
        if num_steps is not None and len(indices) != num_steps:
            reasons.append(f"received {len(indices)} distinct steps but the producer reported {num_steps}")
        if episode.conflicting:
            reasons.append(
                f"conflicting duplicates at step indices {_ranges(sorted(episode.conflicting))} "
                "(first arrival kept)"
            )
        timing_errors, timing_reasons = timing_problems(steps, self.control_period_ns)
        reasons.extend(timing_reasons)
        return AssembledEpisode(
            meta=meta,
            steps=steps,
            complete=not reasons,
            reasons=reasons,
            duplicates_dropped=episode.duplicates_dropped,
            conflicting_duplicates=len(episode.conflicting),
            out_of_order=episode.out_of_order,
            timing_errors=timing_errors,
        )

    def discard(self, episode_id: str) -> int:
        """Forget an open episode (e.g. its END will never come); returns the number of steps dropped."""
        with self._lock:
            episode = self._open.pop(episode_id, None)
            if episode is None:
                raise UnknownEpisodeError(f"episode {episode_id!r} is not open")
            return len(episode.steps)

    def is_open(self, episode_id: str) -> bool:
        with self._lock:
            return episode_id in self._open

    def has_ended(self, episode_id: str) -> bool:
        """Ended (among the remembered ones): a step for it now is late."""
        with self._lock:
            return episode_id in self._ended

    def open_episode_ids(self) -> list[str]:
        with self._lock:
            return list(self._open)

    def received_steps(self, episode_id: str) -> int:
        """Distinct step indices received so far for an open episode."""
        with self._lock:
            episode = self._open.get(episode_id)
            if episode is None:
                raise UnknownEpisodeError(f"episode {episode_id!r} is not open")
            return len(episode.steps)
