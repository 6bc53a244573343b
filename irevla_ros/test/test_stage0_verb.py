"""`irevla train-stage0`: the first VLA version from the stored demonstrations, as a robot user runs it between the
demonstration session and the first VLA session; and what the trainer and the policy say when there is none."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from irevla_ros.policies.scripted import ScriptedExpertPolicy
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.train.config import IterationConfig
from irevla_ros.train.iteration import IterationError, IterationRunner
from irevla_ros.train.rollout import RolloutSettings, make_cell, run_episode, write_to_store
from irevla_ros.vla.model_store import ModelStore

IREVLA = shutil.which("irevla") or str(Path(sys.executable).parent / "irevla")
TASK = "button-press-v3"


def _run(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([IREVLA, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demonstrations(tmp_path_factory) -> Path:
    """A store holding two successful scripted demonstrations and one failed one (not D_e)."""
    store_path = tmp_path_factory.mktemp("stage0") / "store"
    settings = RolloutSettings.from_graph(cameras=("camera",))
    cell = make_cell(settings, [TASK])
    try:
        with EpisodeStore(store_path) as store:
            for seed in (1, 2):
                episode = run_episode(cell, ScriptedExpertPolicy(), settings, TASK, seed, max_steps=60)
                assert episode.outcome == "success", episode.outcome
                write_to_store(store, episode, source="expert")
            failed = run_episode(cell, ScriptedExpertPolicy(), settings, TASK, 3, max_steps=3)
            assert failed.outcome != "success"
            write_to_store(store, failed, source="expert")
    finally:
        cell.close()
    return store_path


def test_train_stage0_makes_the_first_version_from_the_demonstrations(demonstrations, tmp_path):
    models = tmp_path / "models"
    done = _run("train-stage0", "--store", str(demonstrations), "--models", str(models), "--steps", "4",
                "--batch-size", "4", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    info = ModelStore(models).get(result["version"])
    assert info.stage == "stage0_sft" and info.parent is None
    assert result["cameras"] == ["camera"]  # taken from the stored demonstrations
    with EpisodeStore(demonstrations, read_only=True) as store:
        successes = {r.episode_id for r in store.list(source="expert", outcome="success")}
        steps = sum(r.num_steps for r in store.list(source="expert", outcome="success"))
    assert set(info.data["expert_episodes"]) == successes and result["samples"] == steps
    assert "[stage0 100%] step 4/4 loss" in done.stderr, done.stderr
    assert not (tmp_path / ".models-stage0-checkpoints").exists()  # removed once the version is saved
    # A second first version into a store that has one is refused (the trainer iterates from the newest).
    again = _run("train-stage0", "--store", str(demonstrations), "--models", str(models), "--steps", "2")
    assert again.returncode == 3 and "already has versions" in again.stderr, again.stderr
    assert [v.version_id for v in ModelStore(models).versions()] == [result["version"]]


def test_train_stage0_without_demonstrations_says_how_to_record_them(tmp_path):
    with EpisodeStore(tmp_path / "store"):
        pass
    done = _run("train-stage0", "--store", str(tmp_path / "store"), "--models", str(tmp_path / "models"))
    assert done.returncode == 2, done.stderr
    assert "no successful demonstration" in done.stderr and "irevla label success" in done.stderr, done.stderr
    missing = _run("train-stage0", "--store", str(tmp_path / "nowhere"), "--models", str(tmp_path / "models"))
    assert missing.returncode == 1 and "no episode store at" in missing.stderr


def test_an_empty_model_store_names_the_command_to_run(tmp_path):
    store = EpisodeStore(tmp_path / "store")
    try:
        runner = IterationRunner(
            tmp_path / "run",
            store,
            ModelStore(tmp_path / "models"),
            IterationConfig(),
            announce=lambda i: None,
        )
        with pytest.raises(IterationError) as info:
            runner.start("")
    finally:
        store.close()
    assert f"irevla train-stage0 --store {store.root} --models {tmp_path / 'models'}" in str(info.value)
