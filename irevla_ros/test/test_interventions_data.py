"""Operator takeovers (StepRecord.intervention) downstream of the policy node: catalogue counts (and the v2 -> v3
migration of a real catalogue), Stage 1 (SACfD's demo buffer holds exactly the takeover transitions, PPO's loss
leaves them out), Stage 2's data (every takeover segment is in D_e, D_RL has the policy's own steps only) and the
per-iteration report. Episodes go through the real collector, assembler and episode store; real SQLite, real
torch with the small random VLA of the Stage 1 tests."""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from stage1_tasks import small_model

from irevla_ros.store import catalog
from irevla_ros.store.assembler import EpisodeAssembler
from irevla_ros.store.collector import EpisodeCollector
from irevla_ros.store.episode_store import EpisodeStore
from irevla_ros.store.records import EpisodeMeta, StepData, intervention_segments
from irevla_ros.train.config import SFTConfig
from irevla_ros.train.datasets import expert_set, intervention_set, rl_set
from irevla_ros.train.latents import LatentCache, encoder_key, latent_episodes_from_store
from irevla_ros.train.ppo import PPOConfig, PPOLearner
from irevla_ros.train.report import write_report
from irevla_ros.train.sacfd import SACfDConfig
from irevla_ros.train.sft import batch_indices, prepare
from irevla_ros.train.stage1 import OnlineRL, Stage1Config

torch.set_num_threads(1)
PERIOD = 100_000_000
T0 = 1_767_000_000_000_000_000

# Who commanded each step: T = the operator (a takeover), . = the policy.
TAKEN_OVER = {
    "p-success": (".." + "TTT" + "..." + "TT" + "..", "success"),  # two takeovers, hand-back in between
    "p-failure": ("...." + "TTTT", "failure"),  # the operator took over until the end (truncated)
    "p-clean": ("......", "success"),  # no takeover
    "p-ends-taken": ("..TT", "success"),  # success while the operator held it (terminal)
}


def _step(eid: str, i: int, operator: bool, rng: np.random.Generator) -> StepData:
    stamp = T0 + i * PERIOD
    return StepData(
        episode_id=eid,
        step_index=i,
        stamp_ns=stamp,
        images={"camera": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)},
        image_stamps_ns={"camera": stamp - 1_000_000},
        proprioception=rng.normal(size=4).astype(np.float32),
        proprioception_names=["x", "y", "z", "g"],
        instruction="press the button",
        action=rng.uniform(-1, 1, 4).astype(np.float32),
        log_prob=None if operator else float(rng.normal()),
        value=None,
        policy_version="v1",
        intervention=operator,
        hold=False,
    )


def _collect(
    store: EpisodeStore, eid: str, pattern: str, outcome: str, source: str = "policy", seed: int = 0
):
    """One episode through the trainer's closing protocol (START, steps, END, STEPS_DONE) into the store."""
    collector = EpisodeCollector(EpisodeAssembler(control_period_ns=PERIOD))
    collector.start(EpisodeMeta(eid, "button-press-v3", "press the button", "v1", source, started_ns=T0))
    rng = np.random.default_rng([seed, len(eid)])
    steps = [_step(eid, i, c == "T", rng) for i, c in enumerate(pattern)]
    for step in steps:
        collector.add_step(step)
    collector.end(eid, outcome, "operator")
    collector.steps_done(eid, len(steps))
    (assembled,) = collector.poll()
    assert assembled.complete, assembled.reasons
    return store.write(assembled), steps


@pytest.fixture
def stored(tmp_path: Path):
    store = EpisodeStore(tmp_path / "store")
    steps = {}
    for seed, (eid, (pattern, outcome)) in enumerate(TAKEN_OVER.items()):
        steps[eid] = _collect(store, eid, pattern, outcome, seed=seed)[1]
    steps["e-demo"] = _collect(store, "e-demo", ".....", "success", source="expert", seed=9)[1]
    yield store, steps
    store.close()


def test_segments_are_maximal_runs():
    assert intervention_segments([]) == []
    assert intervention_segments([True, True, False, True]) == [(0, 2), (3, 4)]
    assert intervention_segments([False, True, True, True, False, False]) == [(1, 4)]


def test_catalogue_counts_takeovers_per_episode(stored):
    store, _ = stored
    counts = {r.episode_id: (r.interventions, r.intervention_steps) for r in store.list()}
    assert counts == {
        "p-success": (2, 5),
        "p-failure": (1, 4),
        "p-clean": (0, 0),
        "p-ends-taken": (1, 2),
        "e-demo": (0, 0),
    }
    # what the store returns on write (the acknowledgement) carries them too
    assert store.get("p-success").interventions == 2


def _downgrade_to_v2(root: Path) -> None:
    """Rewrite the catalogue as the code before schema v3 left it: the v2 tables, the same rows."""
    path = root / "catalog.sqlite"
    new = sqlite3.connect(path)
    rows = new.execute("SELECT * FROM episodes").fetchall()
    names = [d[0] for d in new.execute("SELECT * FROM episodes").description]
    labels = new.execute("SELECT episode_id, outcome, label_source, stamp_ns, applied FROM labels").fetchall()
    new.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    old = sqlite3.connect(path)
    catalog.MIGRATIONS[1](old)
    catalog.MIGRATIONS[2](old)
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version (version) VALUES (2)")
    # scene_seed came with v4; these episodes have none (None), which is what the migration gives back too
    keep = [i for i, n in enumerate(names) if n not in ("interventions", "intervention_steps", "scene_seed")]
    columns = ", ".join(names[i] for i in keep)
    for row in rows:
        old.execute(
            f"INSERT INTO episodes ({columns}) VALUES ({', '.join('?' * len(keep))})", [row[i] for i in keep]
        )
    old.executemany(
        "INSERT INTO labels (episode_id, outcome, label_source, stamp_ns, applied) VALUES (?, ?, ?, ?, ?)",
        labels,
    )
    old.commit()
    assert "interventions" not in {r[1] for r in old.execute("PRAGMA table_info(episodes)")}
    old.close()


def test_v2_catalogue_migrates_and_counts_from_the_files(stored, tmp_path: Path):
    store, _ = stored
    before = {r.episode_id: r for r in store.list()}
    store.close()
    root = tmp_path / "store"
    _downgrade_to_v2(root)
    with pytest.raises(RuntimeError, match="needs migration"):
        EpisodeStore(root, read_only=True)
    with EpisodeStore(root) as migrated:
        version = migrated._conn.execute("SELECT version FROM schema_version").fetchone()[0]
        assert version == catalog.SCHEMA_VERSION == 4
        after = {r.episode_id: r for r in migrated.list()}
        assert after == before  # every column, counts included (read back from the episode files)
        assert migrated.last_recovery.clean
        uncounted = migrated._conn.execute(catalog.SELECT_UNCOUNTED).fetchall()
        assert uncounted == []


def test_v2_row_whose_file_is_gone_stays_uncounted_and_reads_zero(stored, tmp_path: Path):
    store, _ = stored
    path = store.absolute_path(store.get("p-success"))
    store.close()
    root = tmp_path / "store"
    _downgrade_to_v2(root)
    path.rename(path.with_suffix(".moved"))
    with EpisodeStore(root) as migrated:
        assert migrated.get("p-success").corrupt
        assert migrated.get("p-success").interventions == 0
        assert migrated.get("p-failure").interventions == 1
    path.with_suffix(".moved").rename(path)
    with EpisodeStore(root) as again:  # the file is back: counted now
        assert again.get("p-success").interventions == 2


def _actions(steps: list[StepData], operator: bool | None = None) -> list[bytes]:
    return sorted(s.action.tobytes() for s in steps if operator is None or s.intervention == operator)


def test_stage2_data_takes_every_takeover_segment_into_d_e(stored):
    store, steps = stored
    d_e = expert_set(store)
    segments = intervention_set(store)
    taken = [s for eid in TAKEN_OVER for s in steps[eid] if s.intervention]
    # every segment of every policy episode, success or failure, one pseudo-episode each
    assert sorted(segments.episode_ids) == [
        "p-ends-taken/intervention-0",
        "p-failure/intervention-0",
        "p-success/intervention-0",
        "p-success/intervention-1",
    ]
    assert sorted(a.tobytes() for a in segments.actions) == _actions(taken)
    assert segments.interventions.all()
    # D_e = the expert episode + the takeovers, bitwise (images too)
    assert sorted(a.tobytes() for a in d_e.actions) == sorted(_actions(steps["e-demo"]) + _actions(taken))
    first = next(s for s in steps["p-failure"] if s.intervention)
    row = next(i for i, a in enumerate(d_e.actions) if a.tobytes() == first.action.tobytes())
    np.testing.assert_array_equal(d_e.images[row, 0], first.images["camera"])
    # D_RL: the policy's own steps of its successes, none of the operator's (no step in both sets)
    d_rl = rl_set(store)
    own = [s for eid in ("p-success", "p-clean", "p-ends-taken") for s in steps[eid] if not s.intervention]
    assert sorted(a.tobytes() for a in d_rl.actions) == _actions(own)
    assert not d_rl.interventions.any()

    # Stage 2's batches (sft.batch_indices over the prepared D_e, as train_supervised draws them) hold them.
    model = small_model()
    prepared = prepare(d_e, model, [])
    cfg = SFTConfig(batch_size=8, rl_fraction=0.25, seed=0)
    drawn = set()
    for step in range(200):
        e, _ = batch_indices(step, cfg, len(prepared), len(d_rl))
        drawn.update(row.tobytes() for row in prepared.actions[e].numpy())
    assert set(_actions(taken)) <= drawn


@pytest.fixture(scope="module")
def base_model():
    return small_model()


def _latents(store: EpisodeStore, model, tmp_path: Path):
    rows = store.trainable(source="policy")
    cache = LatentCache(tmp_path / "latents", encoder_key(model))
    return latent_episodes_from_store(model, store, rows, cache=cache), rows


def test_sacfd_demo_buffer_holds_exactly_the_takeover_transitions(stored, base_model, tmp_path: Path):
    store, steps = stored
    model = copy.deepcopy(base_model)
    batch, rows = _latents(store, model, tmp_path)
    assert batch.interventions.sum() == sum(r.intervention_steps for r in rows) == 11
    # a cache hit (a restarted trainer) gives the same flags
    again, _ = _latents(store, model, tmp_path)
    np.testing.assert_array_equal(again.interventions, batch.interventions)

    config = Stage1Config(algorithm="sacfd", sacfd=SACfDConfig(batch_size=16, min_transitions=4))
    rl = OnlineRL(model, config)
    assert rl.add_episodes(batch) == 4
    learner = rl.learner
    demo = learner.demo
    sampleable = demo.actions[demo._valid]
    # every takeover step has a next state (or is a terminal success) except p-failure's truncated last one
    taken = [s for eid in TAKEN_OVER for s in steps[eid] if s.intervention]
    expected = [s for s in taken if not (s.episode_id == "p-failure" and s.step_index == 7)]
    assert sorted(a.tobytes() for a in sampleable) == _actions(expected)
    online = learner.online.actions[learner.online._valid]
    own = [s for eid in TAKEN_OVER for s in steps[eid] if not s.intervention]
    assert sorted(a.tobytes() for a in online) == _actions(own)
    # the next state of a takeover's last step is the policy's first step after the hand-back
    last = next(
        i for i, a in enumerate(demo.actions) if a.tobytes() == steps["p-success"][4].action.tobytes()
    )
    np.testing.assert_array_equal(
        demo.actions[demo.next_index[last]], steps["p-success"][5].action
    )  # stored as the closing state (its own action is never sampled from the demo buffer)
    # the success reward stays on the terminal step, whoever commanded it
    end = next(
        i for i, a in enumerate(demo.actions) if a.tobytes() == steps["p-ends-taken"][3].action.tobytes()
    )
    assert demo.rewards[end] == 1.0 and demo.terminals[end]
    # the batches: half from the demo buffer, i.e. from the takeovers
    sample = learner.demo.sample(64, torch.Generator().manual_seed(0))
    assert {a.tobytes() for a in sample["action"]} <= set(_actions(expected))
    stats = rl.step()
    assert stats is not None and stats["demo_transitions"] == len(expected)
    assert stats["online_transitions"] == len(own)


def test_ppo_loss_leaves_the_operators_steps_out(stored, base_model, tmp_path: Path):
    store, _ = stored
    batch, _ = _latents(store, copy.deepcopy(base_model), tmp_path)
    cfg = PPOConfig(minibatch_size=4, update_epochs=2, target_kl=0.0)

    def heads_after(data) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(base_model)
        torch.manual_seed(0)  # the same fresh critic for every run
        model.fresh_critic()
        learner = PPOLearner(model, cfg, seed=3)
        stats = learner.update(data)
        assert stats["samples"] == float((~data.interventions).sum())
        assert stats["intervention_steps"] == float(data.interventions.sum())
        return {
            k: v.clone()
            for k, v in model.state_dict().items()
            if k.split(".")[0] in ("action_head", "log_std")
        }

    reference = heads_after(batch)
    # What the operator commanded (action, recorded log-prob) cannot change PPO's update: not its actions.
    changed = copy.deepcopy(batch)
    rng = np.random.default_rng(5)
    changed.actions[changed.interventions] = rng.uniform(-1, 1, (int(changed.interventions.sum()), 4)).astype(
        np.float32
    )
    changed.log_probs[changed.interventions] = -3.0
    after = heads_after(changed)
    assert all(torch.equal(reference[k], after[k]) for k in reference)
    # ...while the policy's own actions do change it (the comparison can fail)
    own = copy.deepcopy(batch)
    own.actions[~own.interventions] *= -1.0
    assert not all(torch.equal(reference[k], v) for k, v in heads_after(own).items())


def test_report_plots_takeovers_per_episode_next_to_success(tmp_path: Path):
    history = [
        {"iteration": 1, "session_episodes": 4, "session_success_rate": 0.25, "session_interventions": 6,
         "interventions_per_episode": 1.5, "candidate": "v2", "promoted": True, "why": "ok"},
        {"iteration": 2, "session_episodes": 4, "session_success_rate": 0.75, "session_interventions": 2,
         "interventions_per_episode": 0.5, "candidate": "v3", "promoted": True, "why": "ok"},
    ]  # fmt: skip
    out = write_report(tmp_path, history)
    text = (out / "report.md").read_text()
    assert "takeovers (per episode)" in text and "| 6 (1.50) |" in text and "| 2 (0.50) |" in text
    assert (out / "success_rate.png").stat().st_size > 1000
    assert json.loads((out / "report.json").read_text())[1]["interventions_per_episode"] == 0.5
