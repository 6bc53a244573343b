"""The VLA in the policy slot: a model-store version run by ONNX Runtime (torch as fallback), with the model's
own Gaussian exploration (or its mean, deterministic, for evaluation).

A heads-only version (Stage 1 pushes) goes through the same path (validated in a child process, warmed,
swapped at a tick) but shares the text/encoder sessions of a loaded runtime on the same base version, so the
node loads only its heads graph."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from irevla_ros.policies.base import Observation, PolicyError, PolicyOutput
from irevla_ros.vla.model_store import InvalidVersionError, ModelStore
from irevla_ros.vla.preprocess import VLAInputError
from irevla_ros.vla.runtime import make_runtime
from irevla_ros.vla.validation import probe_observation, validate_heads


class VLAPolicy:
    name = "vla"

    def __init__(self, runtime: object, version: str, *, deterministic: bool = False, seed: int = 0) -> None:
        self.runtime = runtime
        self.version = version
        self.deterministic = deterministic
        self._rng = np.random.default_rng(seed)
        self._instruction = ""
        # The full version whose backbone runs (== version unless this is a heads-only version).
        self.encoder_version = str(getattr(runtime, "encoder_version", None) or version)
        self.load_note = ""  # how it was loaded, for the node's log

    def close(self) -> None:
        """Release the runtime's sessions now, not at interpreter exit (PolicySlot.close calls this)."""
        close = getattr(self.runtime, "close", None)
        if callable(close):
            close()

    def reset(self, instruction: str) -> None:
        self._instruction = instruction
        self.runtime.encode_instruction(instruction)  # type: ignore[attr-defined]  # once per episode (cached)

    def act(self, observation: Observation) -> PolicyOutput:
        instruction = observation.instruction or self._instruction
        try:
            mean, value, _ = self.runtime.act(  # type: ignore[attr-defined]
                observation.images, instruction, observation.proprioception
            )
        except VLAInputError as exc:
            raise PolicyError(f"VLA input: {exc}") from exc
        if not (np.all(np.isfinite(mean)) and np.isfinite(value)):
            raise PolicyError(
                f"VLA {self.version} produced non-finite output: action mean {np.asarray(mean).tolist()}, "
                f"value {float(value)}"
            )
        action, log_prob = self.runtime.sample(mean, self._rng, deterministic=self.deterministic)  # type: ignore[attr-defined]
        return PolicyOutput(action, log_prob=None if self.deterministic else log_prob, value=float(value))


# Run first in the validator child: SCHED_IDLE (the CPU only when the control loop does not want it) when asked,
# SCHED_OTHER otherwise, set by the child itself so the parent can spawn it without a preexec_fn (which forces a
# full fork of this large process); likewise the parent-death signal, so a node that is killed or crashes takes its
# validator with it.
_VALIDATE = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != int(sys.argv[3]):
    sys.exit("the policy node is gone")
try:  # never the real-time policy a node's thread may have (libfranka sets one): it would block the control loop
    os.sched_setscheduler(0, os.SCHED_IDLE if sys.argv[4] == "idle" else os.SCHED_OTHER, os.sched_param(0))
except (AttributeError, OSError):
    if sys.argv[4] == "idle":
        os.nice(19)
from irevla_ros.vla.model_store import ModelStore
from irevla_ros.vla.validation import validate
validate(ModelStore(sys.argv[1]), sys.argv[2])
"""


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a running process (Linux /proc), None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class LoaderClosedError(RuntimeError):
    """The loader was closed (the policy node is shutting down): the load stopped."""


class _Validators:
    """The validator child processes of one loader, so that closing the loader stops them: a validation takes
    up to minutes, and a child left running outlived its node (the thread waiting on it, too, kept running
    into interpreter exit)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[str]] = set()
        self.closed = False

    # An idle validator that got less than this share of one core over a window is starved: a busy machine (a
    # trainer, a benchmark) leaves a SCHED_IDLE process no CPU at all, and the version would wait until the
    # timeout refused it. It is then restarted at normal priority (an unprivileged process cannot raise its own).
    STARVATION_WINDOW_S = 10.0
    STARVED_CPU_SHARE = 0.1

    def run(self, store_root: Path, version_id: str, timeout: float = 600.0, idle: bool = True) -> str | None:
        """Checksums, weights, shapes, finite probe outputs and ONNX-vs-torch, in a child process: validation runs
        torch and holds the GIL for long stretches, which would delay the control loop's ticks. `idle`: the child
        runs SCHED_IDLE, the CPU only when nothing else wants it (while the control loop runs episodes), and is
        restarted at normal priority if it starves; not at start-up, where a SCHED_IDLE child behind any busy
        process of the machine (a trainer, a benchmark) waited for minutes and the node never came up. Returns a
        note when the priority changed, else None."""
        deadline = time.monotonic() + timeout
        note = None
        proc = self._start(store_root, version_id, idle)
        try:
            cpu_before = _cpu_seconds(proc.pid)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    proc.kill()
                    proc.communicate()
                    raise InvalidVersionError(f"validation of {version_id} did not finish in {timeout:.0f} s")
                window = min(self.STARVATION_WINDOW_S, remaining)
                try:
                    _, stderr = proc.communicate(timeout=window)
                    break
                except subprocess.TimeoutExpired:
                    if not idle:
                        continue
                    cpu = _cpu_seconds(proc.pid)
                    if (
                        cpu is None
                        or cpu_before is None
                        or cpu - cpu_before >= self.STARVED_CPU_SHARE * window
                    ):
                        cpu_before = cpu
                        continue
                    proc.kill()
                    proc.communicate()
                    self._forget(proc)
                    idle = False
                    waited = timeout - (deadline - time.monotonic())
                    note = f"validated at normal priority: at idle priority it got no CPU for {waited:.0f} s"
                    proc = self._start(store_root, version_id, idle)
        finally:
            self._forget(proc)
        if self.closed:
            raise LoaderClosedError(f"validation of {version_id} stopped: the loader is closed")
        if proc.returncode != 0:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"validation exited with {proc.returncode}"
            raise InvalidVersionError(reason.split(": ", 1)[-1] if "Error: " in reason else reason)
        return note

    def _start(self, store_root: Path, version_id: str, idle: bool) -> subprocess.Popen[str]:
        with self._lock:
            if self.closed:
                raise LoaderClosedError(f"not validating {version_id}: the loader is closed")
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _VALIDATE,
                    str(store_root),
                    version_id,
                    str(os.getpid()),
                    "idle" if idle else "normal",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                # one core at most: the control loop keeps the other
                env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ORT_NUM_THREADS": "1"},
            )
            self._running.add(proc)
        return proc

    def _forget(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._running.discard(proc)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            running = list(self._running)
        for proc in running:
            proc.kill()


class HeadsOnlyMismatchError(InvalidVersionError):
    """A version was announced as heads-only (or full) and the store says otherwise."""


class VLALoader:
    """What `vla_loader` returns: `loader(version_id, heads_only=None)` loads a version; `close()` stops a
    validation in progress and refuses further loads (PolicySlot.close calls it)."""

    def __init__(self, load: Callable[[str, bool | None, bool], VLAPolicy], validators: _Validators) -> None:
        self._load = load
        self._validators = validators

    def __call__(self, version_id: str, heads_only: bool | None = None, idle: bool = True) -> VLAPolicy:
        return self._load(version_id, heads_only, idle)

    def close(self) -> None:
        self._validators.close()


def vla_loader(store_root: str, *, deterministic: bool = False, seed: int = 0) -> VLALoader:
    """version id ('' = newest) -> a validated VLAPolicy; raises with the reason for a bad version.

    `load(version_id, heads_only=None)`: `heads_only` is what the announcement said; a version whose store
    metadata disagrees is refused."""
    # Loaded runtimes by the full version whose encoder they run; weak, so this never keeps a runtime alive
    # that the slot has let go of (active and previous are the ones that matter).
    runtimes: weakref.WeakValueDictionary[str, object] = weakref.WeakValueDictionary()
    probe_latents: dict[str, np.ndarray] = {}  # encoder version -> its latent of the probe observation
    lock = threading.Lock()
    validators = _Validators()

    def load(version_id: str, heads_only: bool | None = None, idle: bool = True) -> VLAPolicy:
        if validators.closed:
            raise LoaderClosedError(f"not loading {version_id or 'the newest version'}: the loader is closed")
        store = ModelStore(store_root)
        if not version_id:
            latest = store.latest()
            if latest is None:
                raise FileNotFoundError(
                    f"model store {store_root} has no version yet: train the first one from the stored "
                    f"demonstrations with `irevla train-stage0 --store <episode store> --models {store_root}` "
                    "(irevla demo does it in simulation)"
                )
            version_id = latest.version_id
        info = store.get(version_id)
        if heads_only is not None and bool(heads_only) != info.heads_only:
            said, is_ = ("heads-only", "a full version") if heads_only else ("full", "heads-only")
            raise HeadsOnlyMismatchError(f"{version_id} was announced as {said} but the store has {is_}")
        priority_note = None
        with lock:
            shared = runtimes.get(info.base_version) if info.heads_only else None
            latent = probe_latents.get(info.base_version)
        if (
            shared is not None
            and latent is not None
            and getattr(shared, "encoder_manifest_sha256", None) == info.meta.get("base_manifest_sha256")
        ):
            # A heads update on the encoder this node already runs (verified when it was loaded): the light
            # check, here and in milliseconds, instead of a child process that loads the whole model.
            validate_heads(store, version_id, latents=latent)
            how = "shared, heads validated in-process"
        else:
            priority_note = validators.run(store.root, version_id, idle=idle)
            shared, how = None, "loaded"
        runtime = make_runtime(info.path, reuse=shared)  # type: ignore[arg-type]
        probe = probe_observation(runtime.config)
        if getattr(runtime, "reused_encoder", False):
            # warm-up of the only new graph; the shared encoder is warm and busy with the control ticks
            runtime.heads(latent)  # type: ignore[attr-defined]
            runtime.encode_instruction(probe[1])  # type: ignore[attr-defined]
        else:
            _, _, probe_latent = runtime.act(*probe)  # type: ignore[attr-defined]  # warm-up: allocates now
        encoder = str(getattr(runtime, "encoder_version", None) or info.base_version)
        with lock:
            runtimes[encoder] = runtime  # any runtime on this encoder shares the same sessions
            if not getattr(runtime, "reused_encoder", False):
                probe_latents[encoder] = probe_latent
        policy = VLAPolicy(runtime, version_id, deterministic=deterministic, seed=seed)
        if info.heads_only:
            policy.load_note = f"heads-only on {info.base_version} (encoder {how})"
        if priority_note:
            policy.load_note = "; ".join(n for n in (policy.load_note, priority_note) if n)
        return policy

    return VLALoader(load, validators)


def vla_slot(params: Mapping[str, object]) -> tuple[VLAPolicy, VLALoader]:
    """Registry factory `vla` (see irevla_ros.policies): `version` of `model_store` ('' = newest), and the loader
    of the versions announced later."""
    loader = vla_loader(
        str(params["model_store"]),
        deterministic=bool(params["deterministic"]),
        seed=int(params["seed"]),  # type: ignore[call-overload]
    )
    return loader(
        str(params["version"]), idle=False
    ), loader  # the node starts: no control loop to protect yet
