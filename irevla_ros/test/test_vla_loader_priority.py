"""The policy node's loader validates a version announced during an episode in a SCHED_IDLE child, so the control
loop's ticks come first. On a machine whose every core is busy (a trainer, a benchmark) such a child gets no CPU
at all; the loader notices (less than a tenth of a core over a window) and restarts it at normal priority, so the
version loads instead of being refused at the timeout. Real validator children, real busy processes on every
core the test may use, a real tiny BLIP-2 version in a real model store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_vla_store import _perturb

from irevla_ros.policies.vla import _Validators, vla_loader
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.integrity import InvalidVersionError
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore
from irevla_ros.vla.tiny_models import make_tiny_blip2


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> tuple[ModelStore, str]:
    root = tmp_path_factory.mktemp("priority")
    cfg = VLAConfig(
        backbone="hf",
        hf_model_dir=str(make_tiny_blip2(root / "blip2")),
        latent_dim=64,
        head_hidden=(64,),
        lora_rank=4,
    )
    torch.manual_seed(0)
    store = ModelStore(root / "models")
    return store, store.save(_perturb(VLAModel(cfg), 0), parent=None, stage="stage0_sft").version_id


# SCHED_OTHER set explicitly: a child inherits its parent thread's policy, and a real-time one (libfranka gives
# the thread that runs franky one) would make these loops starve everything, the restarted validator included.
HOG = "import os; os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))\nwhile True: pass"


@pytest.fixture
def busy_cores():
    """One busy-looping process per core this process may run on, at normal priority."""
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(len(os.sched_getaffinity(0)))]
    yield len(hogs)
    for hog in hogs:
        hog.kill()
        hog.wait()


def test_a_starved_idle_validation_restarts_at_normal_priority(version, busy_cores, monkeypatch):
    store, version_id = version
    monkeypatch.setattr(_Validators, "STARVATION_WINDOW_S", 2.0)
    loader = vla_loader(str(store.root))
    try:
        policy = loader(version_id, idle=True)
    finally:
        loader.close()
    assert policy.version == version_id
    assert "validated at normal priority: at idle priority it got no CPU" in policy.load_note, (
        policy.load_note
    )


def test_without_the_restart_the_starved_validation_is_refused_at_its_timeout(
    version, busy_cores, monkeypatch
):
    # The same load with starvation never detected: the idle child waits behind the busy cores until the timeout
    # refuses the version (what the restart prevents).
    store, version_id = version
    monkeypatch.setattr(_Validators, "STARVATION_WINDOW_S", 2.0)
    monkeypatch.setattr(_Validators, "STARVED_CPU_SHARE", 0.0)
    validators = _Validators()
    try:
        with pytest.raises(InvalidVersionError, match="did not finish in 8 s"):
            validators.run(store.root, version_id, timeout=8.0, idle=True)
        assert (
            validators.run(store.root, version_id, timeout=120.0, idle=False) is None
        )  # normal priority: fine
    finally:
        validators.close()
