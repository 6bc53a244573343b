"""The iRe-VLA loop as the on-robot trainer runs it, one iteration after another, without anyone at a terminal:

    session (the cell collects; Stage 1 online RL on the heads, VLM frozen, head updates pushed to the policy)
      --end of session: operator (RunIteration action), episode budget, or plateau-->
    supervised (Stage 2: LoRA + action head on D_e ∪ D_RL, locally or on a remote GPU host)
      --> validating (finite outputs, ONNX vs torch; in simulation an evaluation against the running version)
      --> announcing (the policy node hot-swaps it) --> session of the next iteration
    (a candidate that fails validation is not announced: the running version stays, the report says why)

The state lives in `<run_dir>/iteration.json`, rewritten atomically at every transition, and every stage keeps
its own checkpoints under `<run_dir>/iteration-NNN/`, so a trainer killed at any moment restarts in the phase it
was in and resumes that phase's work: Stage 1 from its last checkpoint (episodes stored since are fed again),
Stage 2 from its job folder's checkpoints, validation and announcement from the start. Episodes are never lost:
the episode store owns them and this module only reads it.

Plain Python (no rclpy): the trainer node feeds it stored episodes and operator requests and publishes what it
announces; tests and the benchmark drive it directly.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from irevla_ros import durable
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import StoredEpisode
from irevla_ros.train.config import IterationConfig, SFTConfig
from irevla_ros.train.datasets import DatasetError, expert_set, rl_set
from irevla_ros.train.metrics import MetricsLog
from irevla_ros.vla.model_store import InvalidVersionError, ModelStore, VersionInfo

PHASES = ("session", "supervised", "validating", "announcing")
END_REASONS = ("operator", "episode_budget", "plateau", "schedule")
STATE_FILE = "iteration.json"


class IterationError(RuntimeError):
    """An iteration could not run (no expert data, Stage 2 failed...); the running version stays."""


class IterationCancelled(IterationError):
    """The operator cancelled the iteration; the session goes on with the running version."""


def session_end_reason(successes: Sequence[bool], config: IterationConfig) -> str | None:
    """Why the session should end now (episode_budget, plateau), or None. `successes`: this session's episodes."""
    if config.episode_budget and len(successes) >= config.episode_budget:
        return "episode_budget"
    w = config.plateau_window
    if w and len(successes) >= 2 * w:
        recent = sum(successes[-w:]) / w
        before = sum(successes[-2 * w : -w]) / w
        if recent - before < config.plateau_delta:
            return "plateau"
    return None


@dataclass
class IterationRecord:
    """What survives a restart (iteration.json)."""

    iteration: int = 1
    phase: str = "session"
    base_version: str = ""  # the full version this iteration started from
    running_version: str = ""  # what the policy runs now: the base or a Stage 1 heads update of it
    session_versions: list[str] = field(
        default_factory=list
    )  # versions whose episodes belong to this session
    session_episodes: list[str] = field(default_factory=list)  # fed to Stage 1, in order
    session_successes: list[bool] = field(default_factory=list)
    session_interventions: list[int] = field(default_factory=list)  # operator takeovers per session episode
    end_reason: str = ""
    candidate: str = ""
    # The promoted version with the best simulated validation so far (empty: none measured yet). Candidates are
    # held to it as well as to the running version, so that losses each within the margin cannot add up.
    best_version: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished iteration

    @classmethod
    def load(cls, path: Path) -> IterationRecord | None:
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in fields(cls)}
            record = cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise IterationError(
                f"{path}: unreadable iteration state ({exc}); move it away to start over"
            ) from exc
        if record.phase not in PHASES:
            raise IterationError(f"{path}: unknown phase {record.phase!r}")
        return record

    def save(self, path: Path) -> None:
        durable.write_json(path, asdict(self), indent=2)


@dataclass
class IterationRequest:
    """An operator's (or a schedule's) request to end the session and iterate now; the action server waits on it."""

    reason: str = "operator"
    max_supervised_steps: int = 0
    announce: bool = True
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] = field(default_factory=dict)


Announce = Callable[[VersionInfo], None]
Progress = Callable[[str, float, str], None]  # stage, progress 0..1, message


class IterationRunner:
    """Drives the phases. Call `start()` once, then `on_episode_stored()` from any thread; `work()` is the worker
    thread's loop (it does all the heavy lifting: latents, RL updates, Stage 2, evaluation)."""

    def __init__(
        self,
        run_dir: str | Path,
        store: EpisodeStore,
        models: ModelStore,
        config: IterationConfig,
        *,
        announce: Announce,
        progress: Progress | None = None,
        log: Callable[[str], None] = print,
        metrics: MetricsLog | None = None,
        evaluate: Callable[[str, Sequence[str], int, int], Any] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.models = models
        self.config = config
        self._announce = announce
        self._progress = progress or (lambda stage, value, message: None)
        self._log = log
        self.metrics = metrics
        self._evaluate = evaluate
        self._state_path = self.run_dir / STATE_FILE
        self.record = IterationRecord()
        self._stored: queue.Queue[StoredEpisode] = queue.Queue()
        self._requests: queue.Queue[IterationRequest] = queue.Queue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._online: Any = None  # OnlineRL of this session
        self._latents: Any = None  # LatentCache of the session's frozen encoder
        self._model: Any = None  # the torch model Stage 1 trains (the running version)
        self.last_error = ""
        self.cameras: tuple[str, ...] = ()

    # ---- set-up and inputs (any thread) ----
    def start(self, initial_version: str) -> IterationRecord:
        """Resume from iteration.json, or begin iteration 1 from `initial_version` ('' = the store's newest)."""
        record = IterationRecord.load(self._state_path)
        if record is None:
            if not initial_version:
                latest = self.models.latest()
                if latest is None:
                    raise IterationError(
                        f"model store {self.models.root} has no version: run Stage 0 first, "
                        f"`irevla train-stage0 --store {self.store.root} --models {self.models.root}`"
                    )
                initial_version = latest.version_id
            self.models.get(initial_version)  # raises UnknownVersionError with the store's message
            record = IterationRecord(
                base_version=initial_version,
                running_version=initial_version,
                session_versions=[initial_version],
            )
            record.save(self._state_path)
            self._log(f"iteration 1 begins with {initial_version}")
        else:
            self._log(
                f"resuming iteration {record.iteration} in phase {record.phase} (running {record.running_version})"
            )
        self.record = record
        # the datasets hold the cameras the model takes, in its order
        self.cameras = tuple(self.models.read_config(record.base_version).cameras)
        return record

    def on_episode_stored(self, row: StoredEpisode) -> None:
        self._stored.put(row)
        self._wake.set()

    def request_iteration(self, request: IterationRequest) -> IterationRequest:
        self._requests.put(request)
        self._wake.set()
        return request

    @property
    def phase(self) -> str:
        return self.record.phase

    # ---- the worker loop ----
    def work(self, stop: threading.Event, idle_wait: float = 0.5) -> None:
        """Runs until `stop` is set: resumes an interrupted phase, feeds Stage 1, iterates when a session ends."""
        while not stop.is_set():
            try:
                self.work_once()
            except Exception as exc:  # keep the trainer alive; the status shows the error, nothing is dropped
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._log(f"iteration error: {self.last_error}")
                stop.wait(5.0)
            self._wake.wait(idle_wait)
            self._wake.clear()

    def work_once(self) -> None:
        if self.record.phase != "session":  # a restart in the middle of an iteration
            self._finish_iteration(IterationRequest(reason=self.record.end_reason or "schedule"))
            return
        self._feed_session()
        request = self._next_request()
        if request is not None:
            self._finish_iteration(request)

    def _next_request(self) -> IterationRequest | None:
        try:
            return self._requests.get_nowait()
        except queue.Empty:
            pass
        cfg = self.config
        if cfg.max_iterations and self.record.iteration > cfg.max_iterations:
            return None
        reason = session_end_reason(self.record.session_successes, cfg)
        if reason is not None and cfg.auto_iterate:
            return IterationRequest(reason=reason)
        return None

    # ---- Stage 1 during the session ----
    def _session_rows(self) -> list[StoredEpisode]:
        rows = []
        while True:
            try:
                rows.append(self._stored.get_nowait())
            except queue.Empty:
                return rows

    def _belongs_to_session(self, row: StoredEpisode) -> bool:
        return (
            row.source == "policy"
            and row.trainable
            and row.policy_version in self.record.session_versions
            and row.episode_id not in self.record.session_episodes
        )

    def _ensure_stage1(self) -> Any:
        if self._online is not None:
            return self._online
        from irevla_ros.train.latents import LatentCache, encoder_key
        from irevla_ros.train.stage1 import OnlineRL

        cfg = self.config
        model, _, _ = self.models.load(self.record.running_version)
        self._model = model
        # a restart finds the checkpoint here and resumes: heads, optimiser, RNG, counters (never re-initialised)
        self._online = OnlineRL(model, cfg.stage1, self._iteration_dir() / "stage1")
        self._latents = LatentCache(self._latent_cache(), encoder_key(model))
        demos = self.store.trainable(source="expert", outcome="success")
        demos += self.store.trainable(source="intervention", outcome="success")
        demo_latents = self._latent_episodes(demos) if demos else None
        if demo_latents is not None:
            std = self._online.calibrate_exploration(demo_latents)  # a fresh start only
            if std is not None:
                self._log(f"stage 1: exploration std {std} (the running version's error on D_e)")
        if cfg.stage1.algorithm == "sacfd":
            if demo_latents is not None:
                self._online.add_demos(demo_latents)
            # The operator's takeovers in earlier sessions' policy episodes are demonstrations too (HIL-SERL
            # keeps every intervention in its demo buffer); this session's go in as they are stored.
            taken_over = [
                r
                for r in self.store.trainable(source="policy")
                if r.intervention_steps and r.episode_id not in self.record.session_episodes
            ]
            operator = self._latent_episodes(taken_over).by_commander()[0] if taken_over else None
            if operator is not None:
                self._online.add_demos(operator)
        # Episodes fed before a restart but after the last checkpoint: OnlineRL ignores those it already has.
        if self.record.session_episodes:
            rows = [self.store.get(e) for e in self.record.session_episodes]
            self._online.add_episodes(self._latent_episodes(rows))
        return self._online

    def _latent_episodes(self, rows: list[StoredEpisode]) -> Any:
        from irevla_ros.train.latents import latent_episodes_from_store

        return latent_episodes_from_store(
            self._model, self.store, rows, cache=self._latents, dataset_cache_dir=self._cache_dir()
        )

    def _feed_session(self) -> None:
        rows = [r for r in self._session_rows() if self._belongs_to_session(r)]
        if not rows:
            return
        record = self.record
        if self.config.stage1_enabled:
            self._ensure_stage1()  # before the record lists these rows: a resume re-adds only older ones
        for row in rows:
            record.session_episodes.append(row.episode_id)
            record.session_successes.append(row.outcome == "success")
            record.session_interventions.append(row.interventions)
        record.save(self._state_path)
        if self.config.stage1_enabled:
            self._stage1(rows)
        n = len(record.session_successes)
        rate = sum(record.session_successes) / n
        if self.metrics is not None:
            self.metrics.scalar("session/success_rate", rate, n, iteration=record.iteration)
            for row in rows:
                self.metrics.scalar("session/episode_length", row.num_steps, n, iteration=record.iteration)
                self.metrics.scalar("session/interventions", row.interventions, n, iteration=record.iteration)

    def _stage1(self, rows: list[StoredEpisode]) -> None:
        online = self._ensure_stage1()
        online.add_episodes(self._latent_episodes(rows))
        stats = online.step()
        if stats:
            self._progress("stage1", 0.0, f"RL update {stats.get('updates', 0)}: {_brief(stats)}")
            if self.metrics is not None:
                self.metrics.scalars(
                    "stage1", stats, int(stats.get("updates", 0)), iteration=self.record.iteration
                )
        now = time.monotonic()
        if online.should_push(now):
            info = self.models.save_heads(
                self._model,
                parent=self.record.running_version,
                stage="stage1_rl",
                data={"episodes": list(self.record.session_episodes)},
                metrics={k: v for k, v in (stats or {}).items() if isinstance(v, (int, float))},
            )
            online.mark_pushed(now)
            with self._lock:
                self.record.running_version = info.version_id
                self.record.session_versions.append(info.version_id)
            self.record.save(self._state_path)
            self._log(f"stage 1: pushing heads {info.version_id}")
            self._announce(info)

    # ---- the iteration proper ----
    def _finish_iteration(self, request: IterationRequest) -> None:
        record = self.record
        self.last_error = ""
        try:
            if record.phase == "session":
                record.end_reason = request.reason
                record.phase = "supervised"
                record.save(self._state_path)
                self._log(
                    f"iteration {record.iteration}: session ended ({request.reason}) after "
                    f"{len(record.session_episodes)} episodes; Stage 2 from {record.running_version}"
                )
            if record.phase == "supervised":
                record.candidate = self._stage2(request).version_id
                record.phase = "validating"
                record.save(self._state_path)
            if record.phase == "validating":
                verdict = self._validate(record.candidate, request)
                record.history.append(verdict)
                if verdict["promoted"] and request.announce:
                    record.phase = "announcing"
                else:
                    self._log(
                        f"iteration {record.iteration}: {record.candidate} not announced: {verdict['why']}"
                    )
                    self._next_session(promoted=None)
                    request.result = {**verdict, "new_version": verdict["candidate"], "promoted": False}
                record.save(self._state_path)
            if record.phase == "announcing":
                info = self.models.get(record.candidate)
                self._announce(info)
                self._log(f"iteration {record.iteration}: announced {info.version_id}")
                verdict = record.history[-1] if record.history else {}
                record.best_version = verdict.get("best_after", record.best_version)
                request.result = {**verdict, "new_version": info.version_id, "promoted": True}
                self._next_session(promoted=info.version_id)
                record.save(self._state_path)
            self._write_report()
        except IterationCancelled as exc:
            self._log(f"iteration {record.iteration} cancelled: {exc}")
            record.phase, record.candidate = "session", ""
            record.save(self._state_path)
            self._progress_session()
            request.result = {
                "promoted": False,
                "new_version": "",
                "why": f"cancelled: {exc}",
                "cancelled": True,
            }
        except Exception as exc:
            # The iteration failed (no expert data, a Stage 2 job that crashed, a remote host down...): it ends
            # unpromoted like a failed validation, so the cell goes on with the running version and an automatic
            # schedule does not retry in a loop; the operator can ask again with RunIteration.
            why = f"{type(exc).__name__}: {exc}"
            self._log(f"iteration {record.iteration} failed: {why}")
            record.history.append({**self._verdict_base(), "promoted": False, "why": f"failed: {why}"})
            self._next_session(promoted=None)
            record.save(self._state_path)
            self._write_report()
            request.result = {"promoted": False, "new_version": "", "why": f"failed: {why}"}
            self.last_error = why
        request.done.set()

    def _verdict_base(self) -> dict[str, Any]:
        record = self.record
        return {
            "iteration": record.iteration,
            "candidate": record.candidate,
            "running": record.running_version,
            "base": record.base_version,
            "end_reason": record.end_reason,
            "session_episodes": len(record.session_episodes),
            "session_success_rate": _rate(record.session_successes),
            "session_interventions": sum(record.session_interventions),
            "interventions_per_episode": _mean(record.session_interventions),
        }

    def _next_session(self, promoted: str | None) -> None:
        record = self.record
        record.iteration += 1
        record.phase = "session"
        if promoted is not None:
            record.base_version = record.running_version = promoted
        record.session_versions = [record.running_version]
        record.session_episodes, record.session_successes, record.session_interventions = [], [], []
        record.candidate, record.end_reason = "", ""
        self._online, self._model = None, None  # a fresh critic and RL state for the next session
        self._progress_session()

    def _progress_session(self) -> None:
        # Without it the last Stage 2 / validation line stayed in /trainer/status for the whole next session.
        record = self.record
        self._progress("session", 0.0, f"iteration {record.iteration}: session with {record.running_version}")

    def _stage2(self, request: IterationRequest) -> VersionInfo:
        from irevla_ros.train.stage2 import Stage2Runner

        cfg = self.config
        sft = cfg.stage2
        if request.max_supervised_steps:
            sft = SFTConfig(**{**asdict(sft), "steps": int(request.max_supervised_steps)})
        expert = expert_set(self.store, self.cameras, cache_dir=self._cache_dir())
        try:
            rl = rl_set(self.store, self.cameras, cache_dir=self._cache_dir())
        except DatasetError:
            rl = None  # no success yet: Stage 2 on D_e alone
        iteration = self.record.iteration

        def on_progress(step: int, total: int, loss: float) -> None:
            if request.cancel.is_set():
                raise IterationCancelled("during Stage 2")
            self._progress("stage2", step / max(1, total), f"step {step}/{total} loss {loss:.4f}")
            if self.metrics is not None:
                self.metrics.scalar("stage2/loss", loss, step, iteration=iteration)

        runner = Stage2Runner(launcher=cfg.stage2_launcher, nproc=cfg.stage2_nproc)
        self._progress("stage2", 0.0, f"D_e {len(expert)} steps, D_RL {0 if rl is None else len(rl)} steps")
        return runner.run(
            self.models.get(self.record.running_version),
            expert,
            rl,
            sft,
            self.models,
            job_dir=self._iteration_dir() / "stage2",
            progress=on_progress,
        )

    def _validate(self, candidate: str, request: IterationRequest) -> dict[str, Any]:
        self._progress("validation", 0.0, f"validating {candidate}")
        record = self.record
        verdict = {**self._verdict_base(), "stage2": self.models.get(candidate).metrics}
        from irevla_ros.vla.validation import validate

        try:
            verdict["checks"] = validate(self.models, candidate)
        except InvalidVersionError as exc:
            return {**verdict, "promoted": False, "why": f"validation failed: {exc}"}
        cfg = self.config
        if cfg.validation_episodes and cfg.validation_tasks and self._evaluate is not None:
            from irevla_ros.train.evaluation import newest_best, not_worse

            seed = cfg.validation_seed + 1000 * record.iteration  # the same scenes for every version
            roles = {"running": record.running_version, "candidate": candidate}
            if record.best_version and record.best_version != record.running_version:
                roles = {"best": record.best_version, **roles}
            reports = {}
            for i, (role, version) in enumerate(roles.items()):
                if request.cancel.is_set():
                    raise IterationCancelled("during validation")
                self._progress("validation", i / len(roles), f"evaluating {version} ({role}) in simulation")
                reports[role] = self._evaluate(version, cfg.validation_tasks, cfg.validation_episodes, seed)
            new = reports["candidate"]
            verdict["evaluation"] = {role: report.to_dict() for role, report in reports.items()}
            checks = [
                not_worse(new, reports[role], cfg.validation_margin) for role in roles if role != "candidate"
            ]
            why = "; ".join(w for _, w in checks)
            verdict["best_after"] = roles[newest_best({r: reports[r].success_rate for r in roles})]
            if not all(ok for ok, _ in checks):
                return {**verdict, "promoted": False, "why": f"evaluation: {why}"}
            return {**verdict, "promoted": True, "why": f"validation passed; evaluation: {why}"}
        return {**verdict, "promoted": True, "why": "validation passed"}

    # ---- files ----
    def _iteration_dir(self) -> Path:
        return self.run_dir / f"iteration-{self.record.iteration:03d}"

    def _cache_dir(self) -> Path:
        return self.run_dir / "dataset-cache"

    def _latent_cache(self) -> Path:
        return self.run_dir / "latent-cache"

    def _write_report(self) -> None:
        from irevla_ros.train.report import write_report

        try:
            write_report(self.run_dir, self.record.history)
        except Exception as exc:  # a report is for people; never let plotting stop the loop
            self._log(f"report not written: {exc}")


def simulation_evaluator(models_root: str | Path) -> Callable[[str, Sequence[str], int, int], Any]:
    """(version, tasks, episodes per task, seed) -> EvalReport: deterministic episodes in the simulated cell,
    run as the policy node runs the version (train/evaluation.py)."""

    def run(version: str, tasks: Sequence[str], episodes: int, seed: int) -> Any:
        from irevla_ros.train.evaluation import evaluate

        return evaluate(version, tasks, episodes, seed, models=models_root)

    return run


def _rate(values: Sequence[bool]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _mean(values: Sequence[int]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def _brief(stats: dict[str, Any]) -> str:
    keys = [k for k in ("policy_loss", "value_loss", "actor_loss", "critic_loss", "approx_kl") if k in stats]
    return ", ".join(f"{k} {float(stats[k]):.4f}" for k in keys)
