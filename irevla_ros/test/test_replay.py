"""`irevla replay` in the simulated cell (train/replay.py, operator/replay_verb.py): a scripted-expert episode
recorded by the direct rollout into a real episode store (MCAP + SQLite on disk), read back only through
EpisodeStore, replayed open loop in a fresh MuJoCo cell through the same SafetyLayer; incomplete, unknown-task,
unknown-id and tampered episodes; the verb's exit codes and JSON line. No ROS here (the robot path is
test_replay_robot.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from irevla_ros.bringup.domains import leased_domain
from irevla_ros.cli import main
from irevla_ros.policies.scripted import ScriptedExpertPolicy
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.errors import CorruptEpisodeError
from irevla_ros.store.records import AssembledEpisode
from irevla_ros.train import replay
from irevla_ros.train.rollout import RolloutSettings, make_cell, run_episode, write_to_store

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")

TASK, LAYOUT = "button-press-v3", 5
IREVLA = str(Path(sys.executable).parent / "irevla")


def _variant(store: EpisodeStore, source_id: str, new_id: str, keep: list[int], **meta: object) -> None:
    """Store some steps of a stored episode under another id (meta fields replaced): hand-made variants."""
    record = store.read(source_id)
    steps = [dataclasses.replace(s, episode_id=new_id) for s in record.steps if s.step_index in keep]
    incomplete = keep != list(range(len(keep)))
    store.write(
        AssembledEpisode(
            meta=dataclasses.replace(record.meta, episode_id=new_id, expected_steps=len(keep), **meta),
            steps=steps,
            complete=not incomplete,
            reasons=["gap: step 5 never arrived"] if incomplete else [],
        )
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RolloutSettings]:
    """A store with a noisy scripted-expert success (layout seed LAYOUT, recorded with it) and hand-made variants
    of it, one without a recorded seed (as a robot's, or one stored before seeds were recorded)."""
    root = tmp_path_factory.mktemp("replay") / "store"
    settings = RolloutSettings.from_graph()
    cell = make_cell(settings, [TASK])
    try:
        episode = run_episode(cell, ScriptedExpertPolicy(noise_std=0.1, seed=1), settings, TASK, seed=LAYOUT)
    finally:
        cell.close()
    assert episode.success and episode.steps > 20 and episode.seed == LAYOUT
    with EpisodeStore(root) as store:
        stored = write_to_store(
            store, episode, source="expert", episode_id="ep-expert", started_ns=1_700_000_000 * 10**9
        )
        assert stored.scene_seed == LAYOUT  # write_to_store keeps the episode's layout seed
        _variant(store, "ep-expert", "ep-gap", [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11])
        _variant(store, "ep-expert", "ep-unseeded", list(range(episode.steps)), scene_seed=None)
        _variant(store, "ep-expert", "ep-robot-task", [0, 1, 2], task="franka-pick-cup", scene_seed=None)
        _variant(store, "ep-expert", "ep-tampered", [0, 1, 2])
        path = store.absolute_path(store.get("ep-tampered"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the middle of the file
    path.write_bytes(bytes(data))
    return root, settings


def test_a_replayed_expert_episode_retraces_the_recording_and_succeeds_again(recorded):
    root, settings = recorded
    with EpisodeStore(root, read_only=True) as store:
        plan = replay.load_plan(store, "ep-expert")
        stored = store.read("ep-expert").steps
    assert plan.steps == len(stored) and not plan.missing.any() and not plan.holds.any()
    assert np.array_equal(plan.actions, np.stack([s.action for s in stored]))
    assert plan.period == pytest.approx(0.1) and plan.recorded_success and plan.cameras == ("camera",)
    assert plan.scene_seed == LAYOUT

    seen: list[tuple[int, float]] = []
    result = replay.replay_in_sim(plan, settings, progress=lambda k, n, d: seen.append((k, d)))
    # The recorded layout, the same actions, the same safety layer: MuJoCo retraces the recording.
    assert (result.seed, result.seed_source) == (LAYOUT, "recorded")
    assert result.steps_replayed == plan.steps
    assert result.max_deviation <= 1e-6 and result.max_gripper_deviation <= 1e-6, result.summary()
    assert [k for k, _ in seen] == list(range(plan.steps)) and max(d for _, d in seen) <= 1e-6
    assert result.replay_success and result.outcome_matches
    assert result.scene.same is True and result.scene.cameras == ("camera",)
    assert sum(result.safety.values()) == plan.steps  # every step went through the layer
    assert "max 0.00 mm" in result.summary() and "same first frame" in result.summary()
    assert f"layout seed {LAYOUT} recorded with the episode" in result.summary()

    # A given seed overrides the recorded one: another scene, and the first frames say so.
    other = replay.replay_in_sim(plan, settings, seed=LAYOUT + 1)
    assert (other.seed, other.seed_source) == (LAYOUT + 1, "given")
    assert other.scene.same is False and other.scene.changed_fraction > 0.001, other.scene
    assert "DIFFERENT first frame" in other.summary() and "not the episode's layout" in other.summary()


def test_an_episode_without_a_recorded_seed_replays_the_tasks_first_scene_and_says_so(recorded):
    root, settings = recorded
    with EpisodeStore(root, read_only=True) as store:
        assert store.get("ep-unseeded").scene_seed is None
        plan = replay.load_plan(store, "ep-unseeded")
    assert plan.scene_seed is None
    result = replay.replay_in_sim(plan, settings)
    # What replay did before seeds were recorded: a fresh cell's first scene of the task, not the recorded one.
    cell = make_cell(settings, [TASK])
    try:
        first_scene = cell.reset(TASK)
    finally:
        cell.close()
    assert (result.seed, result.seed_source) == (first_scene, "none") and first_scene != LAYOUT
    assert result.scene.same is False, result.summary()
    summary = result.summary()
    assert "no layout seed recorded" in summary and "first scene of a fresh cell" in summary
    assert "DIFFERENT first frame" in summary and "--seed" in summary
    # Its seed given by hand rebuilds the scene again.
    again = replay.replay_in_sim(plan, settings, seed=LAYOUT)
    assert again.scene.same is True and again.max_deviation <= 1e-6, again.summary()


def test_an_incomplete_episode_is_refused_unless_allowed_and_its_gap_is_held(recorded):
    root, settings = recorded
    with EpisodeStore(root, read_only=True) as store:
        with pytest.raises(replay.IncompleteEpisodeError) as refused:
            replay.load_plan(store, "ep-gap")
        plan = replay.load_plan(store, "ep-gap", allow_incomplete=True)
    assert "ep-gap" in str(refused.value) and "step 5 never arrived" in str(refused.value)
    assert "--allow-incomplete" in str(refused.value) and isinstance(refused.value, ValueError)
    assert plan.steps == 12 and plan.missing.tolist() == [i == 5 for i in range(12)]
    assert plan.holds[5] and math.isnan(plan.proprio[5, 0])

    result = replay.replay_in_sim(plan, settings, seed=LAYOUT)
    assert (result.holds, result.missing, result.steps_replayed) == (1, 1, 12)
    assert np.all(result.deviation[:5] <= 1e-6) and math.isnan(result.deviation[5])
    # The hold in place of step 5's move is felt afterwards: the replay is open loop.
    assert np.nanmax(result.deviation[6:]) > 1e-4
    assert result.safety.get("ok", 0) + result.safety.get("clipped", 0) == 11


def test_unknown_ids_tampered_files_and_unknown_tasks_are_named(recorded):
    root, settings = recorded
    with EpisodeStore(root, read_only=True) as store:
        for bad in ("ep-nope", "../../etc/passwd"):
            with pytest.raises(replay.EpisodeNotFoundError) as missing:
                replay.load_plan(store, bad)
            message = str(missing.value)
            assert repr(bad) in message and str(root) in message and "5 episodes" in message
            assert "ep-tampered" in message and f"irevla replay --list --store {root}" in message
            assert isinstance(missing.value, ValueError)
        with pytest.raises(CorruptEpisodeError, match=r"ep-tampered.*sha256"):
            replay.load_plan(store, "ep-tampered")
        plan = replay.load_plan(store, "ep-robot-task")
    with pytest.raises(replay.SimTaskError) as unknown:
        replay.replay_in_sim(plan, settings)
    assert "'franka-pick-cup'" in str(unknown.value) and "--target robot" in str(unknown.value)
    assert isinstance(unknown.value, ValueError)


def test_the_verb_exit_codes_and_json_line(recorded, capsys):
    root, _ = recorded
    store = str(root)

    # Without --seed: the layout seed recorded with the episode.
    assert main(["replay", "ep-expert", "--store", store, "--json"]) == 0
    out, err = capsys.readouterr()
    line = json.loads(out.strip().splitlines()[-1])
    assert line["target"] == "sim" and line["episode_id"] == "ep-expert" and line["seed"] == LAYOUT
    assert line["seed_source"] == "recorded"
    assert line["ee_deviation_max"] <= 1e-6 and line["outcome_match"] is True and line["scene_same"] is True
    assert len(line["ee_deviation_per_step"]) == line["steps_replayed"] == line["steps_recorded"]
    assert "replay of ep-expert (button-press-v3)" in out and "[replay] step" in err
    assert f"layout seed {LAYOUT} recorded with the episode" in err
    # --seed overrides it; an episode without one says so.
    assert main(["replay", "ep-expert", "--store", store, "--seed", str(LAYOUT + 1), "--json"]) == 0
    out, err = capsys.readouterr()
    line = json.loads(out.strip().splitlines()[-1])
    assert (line["seed"], line["seed_source"], line["scene_same"]) == (LAYOUT + 1, "given", False)
    assert f"layout seed {LAYOUT + 1} from --seed" in err
    assert main(["replay", "ep-unseeded", "--store", store, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["seed_source"] == "none"
    assert "no layout seed recorded with the episode" in err and "--seed" in err

    cases = [
        (["ep-nope"], 1, "not in the store"),
        (["ep-tampered"], 1, "sha256"),
        (["ep-gap"], 3, "--allow-incomplete"),
        (["ep-robot-task"], 2, "'franka-pick-cup'"),
        ([], 2, "name an episode id"),
    ]
    for argv, code, text in cases:
        assert main(["replay", *argv, "--store", store]) == code, argv
        assert text in capsys.readouterr().err, argv
    assert main(["replay", "ep-expert", "--store", str(root.parent / "elsewhere")]) == 1
    assert "no episode catalogue" in capsys.readouterr().err
    assert main(["replay", "--list", "--store", store]) == 0
    listing = capsys.readouterr().out
    assert all(i in listing for i in ("ep-expert", "ep-gap", "ep-robot-task")) and "incomplete" in listing
    seeds = {line.split()[0]: line.split()[-1] for line in listing.splitlines()[1:]}
    assert seeds["ep-expert"] == str(LAYOUT) and seeds["ep-unseeded"] == "-"
    with pytest.raises(SystemExit) as bad_speed:
        main(["replay", "ep-expert", "--store", store, "--speed", "0"])
    assert bad_speed.value.code == 2 and "speed must be in (0, 2]" in capsys.readouterr().err

    # The robot target without a terminal and without --yes: refused before anything is contacted.
    done = subprocess.run(
        [IREVLA, "replay", "ep-expert", "--store", store, "--target", "robot", "--timeout", "1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "stdin is not a terminal" in done.stderr and "--yes" in done.stderr

    # With --yes on a domain where no graph runs: nothing answered (exit 1), naming the topic and the domain.
    with leased_domain() as domain:
        argv = ["ep-expert", "--store", store, "--target", "robot", "--yes", "--domain", str(domain)]
        done = subprocess.run(
            [IREVLA, "replay", *argv, "--timeout", "1.5"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "/episode_manager/status" in done.stderr and f"ROS_DOMAIN_ID {domain}" in done.stderr


def test_the_typed_confirmation_takes_exactly_the_episode_id():
    from irevla_ros.operator.replay_robot import type_to_confirm

    prompts: list[str] = []

    def answer(text: str):
        def ask(prompt: str) -> str:
            prompts.append(prompt)
            return text

        return ask

    assert type_to_confirm("ep-expert", answer("ep-expert\n"))
    assert "ep-expert" in prompts[0] and "confirm" in prompts[0]
    for wrong in ("", "y", "yes", "ep-exper", "EP-EXPERT"):
        assert not type_to_confirm("ep-expert", answer(wrong)), wrong

    def closed(prompt: str) -> str:
        raise EOFError

    assert not type_to_confirm("ep-expert", closed)


def test_the_replay_core_loads_no_ros():
    code = (
        "import sys\n"
        "from irevla_ros.train import replay\n"
        "loaded = [m for m in sys.modules if m.startswith(('rclpy', 'irevla_interfaces'))]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
