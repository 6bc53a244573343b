"""Supervised stages (Stage 0 / Stage 2) and the Stage 2 job runner: loss goes down and D_RL is mixed in as set,
only the supervised trainable set changes, torchrun with 2 gloo processes follows the 1-process run, a SIGKILLed
worker resumes from its checkpoint to the uninterrupted result, and runners save validated versions with lineage.

Real torch, real torchrun and worker subprocesses, real model store; a small compact VLA (pretrained MiniLM and
EfficientNet-Lite0, 32 px images, narrow new layers).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from irevla_ros.train.checkpoint import Checkpointer
from irevla_ros.train.datasets import Transitions
from irevla_ros.train.sft import (
    SFTConfig,
    SFTConfigError,
    batch_indices,
    batch_sizes,
    supervised_parameters,
    train_supervised,
)
from irevla_ros.train.stage2 import Stage2JobError, Stage2Runner, Stage2TimeoutError
from irevla_ros.train.stage2_job import (
    ADAPTER_FILE,
    CHECKPOINTS_DIR,
    EXPERT_FILE,
    OUT_DIR,
    PARENT_DIR,
    Stage2Error,
    load_parent,
    load_transitions_npz,
    read_result,
)
from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.model import VLAModel
from irevla_ros.vla.model_store import ModelStore
from irevla_ros.vla.validation import validate

TINY = VLAConfig(
    image_size=32, latent_dim=32, fusion_heads=2, fusion_layers=1, token_learner_hidden=16, head_hidden=(32,),
    lora_rank=2,
)  # fmt: skip
E_TARGETS = {"press the button": (0.5, -0.3, 0.2, 0.6), "open the drawer": (-0.4, 0.4, -0.2, -0.6)}
RL_TARGETS = {"push the puck": (0.1, 0.6, -0.5, 0.3)}
# The job every runner test trains (long enough that a SIGKILL lands between two checkpoints).
JOB = SFTConfig(
    steps=16, batch_size=6, lr=1e-2, lr_lora=3e-3, threads=1, checkpoint_every=2, rl_fraction=1 / 3
)
# 2 processes vs 1: same samples, same global gradient; only float summation order and batch-size dependent kernels
# differ. Measured here over 16 steps: losses within 3e-5 relative, actions of the two models within 1.3e-5. Weights
# are compared through the actions: parameters the loss does not depend on (the token learner's score bias under a
# softmax, attention key biases) get float-noise gradients that Adam scales up to ~lr-sized, harmless, differences.
DDP_LOSS_RTOL, DDP_ACTION_ATOL = 2e-4, 2e-4


def _transitions(targets: dict[str, tuple[float, ...]], n: int, seed: int, prefix: str) -> Transitions:
    rng = np.random.default_rng(seed)
    ids = (np.arange(n) % len(targets)).astype(np.int32)
    actions = np.asarray(list(targets.values()), np.float32)[ids] + rng.normal(0, 0.02, (n, 4)).astype(
        np.float32
    )
    return Transitions(
        images=rng.integers(0, 255, (n, 1, 24, 24, 3), dtype=np.uint8),
        proprio=rng.normal(size=(n, 4)).astype(np.float32),
        actions=actions,
        log_probs=np.full(n, np.nan, np.float32),
        rewards=np.zeros(n, np.float32),
        dones=np.zeros(n, bool),
        instruction_ids=ids,
        instructions=list(targets),
        episode_ids=[f"{prefix}-0", f"{prefix}-1"],
        episode_starts=np.array([0, n // 2], np.int64),
    )


def _tiny(seed: int = 0) -> VLAModel:
    torch.manual_seed(seed)
    # Pretrained MiniLM (from its PyPI package) tells the instructions apart; a random one maps them all alike.
    return VLAModel(TINY)


@pytest.fixture(scope="module")
def data() -> tuple[Transitions, Transitions]:
    return _transitions(E_TARGETS, 24, 0, "expert"), _transitions(RL_TARGETS, 12, 1, "policy")


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelStore, str]:
    store = ModelStore(tmp_path_factory.mktemp("models"))
    info = store.save(
        _tiny(), parent=None, stage="stage0_sft", data={"expert_episodes": []}, export_onnx=False
    )
    return store, info.version_id


@pytest.fixture(scope="module")
def local_run(parent, data, tmp_path_factory):
    """The uninterrupted 1-process reference: Stage2Runner("local")."""
    store, parent_id = parent
    work = tmp_path_factory.mktemp("jobs-local")
    seen: list[tuple[int, int, float]] = []
    info = Stage2Runner("local", work_dir=work).run(
        parent_id, data[0], data[1], JOB, store, progress=lambda *a: seen.append(a)
    )
    return info, read_result(work / info.data["job"]), work / info.data["job"], seen


def _snapshot(model: VLAModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _predict(model: VLAModel, d: Transitions) -> torch.Tensor:
    from irevla_ros.vla.preprocess import preprocess_images

    images = torch.from_numpy(np.stack([preprocess_images(list(s), model.config) for s in d.images]))
    with torch.no_grad():
        text = model.encode_instruction(d.instructions)[torch.from_numpy(d.instruction_ids.astype(np.int64))]
        return model.action_mean(model.encode(images, text, torch.from_numpy(d.proprio)))


def _mse_on(model: VLAModel, d: Transitions) -> float:
    return float((_predict(model, d) - torch.from_numpy(d.actions)).pow(2).mean())


# ---------------------------------------------------------------- the loop in-process


def test_batches_mix_d_rl_as_configured_and_shard_over_ranks():
    cfg = SFTConfig(batch_size=8, rl_fraction=0.25, seed=3)
    assert batch_sizes(cfg, n_rl=10) == (6, 2) and batch_sizes(cfg, n_rl=0) == (8, 0)
    e, r = batch_indices(5, cfg, 20, 10)
    assert len(e) == 6 and len(r) == 2 and e.max() < 20 and r.max() < 10
    again = batch_indices(5, cfg, 20, 10)
    assert torch.equal(e, again[0]) and torch.equal(
        r, again[1]
    )  # a step's batch depends only on (seed, step)
    assert not torch.equal(e, batch_indices(6, cfg, 20, 10)[0])
    shards = [batch_indices(5, cfg, 20, 10, rank, 3) for rank in range(3)]
    assert all(len(se) + len(sr) >= 1 for se, sr in shards)
    assert sorted(torch.cat([s[0] for s in shards]).tolist()) == sorted(e.tolist())
    assert sorted(torch.cat([s[1] for s in shards]).tolist()) == sorted(r.tolist())
    with pytest.raises(SFTConfigError, match="trainable"):
        SFTConfig(trainable="everything")
    with pytest.raises(SFTConfigError, match=r"unknown SFTConfig key.*stpes"):
        SFTConfig.from_dict({"stpes": 3})


def test_stage0_then_stage2_reduce_loss_and_change_only_the_supervised_set(data):
    expert, rl = data
    model = _tiny()
    groups = {g: [n for n, _ in ps] for g, ps in model.named_parameter_groups().items()}
    fast = {"lr": 1e-2, "lr_lora": 3e-3, "threads": 1}
    stage0 = train_supervised(model, expert, config=SFTConfig(steps=15, batch_size=8, **fast), progress=False)
    assert np.mean(stage0["losses"][-5:]) < 0.5 * np.mean(stage0["losses"][:3]), stage0["losses"]

    before = _snapshot(model)
    rl_error_before = _mse_on(model, rl)  # Stage 0 never saw the RL instruction
    cfg = SFTConfig(steps=15, batch_size=8, rl_fraction=0.5, **fast)
    stage2 = train_supervised(model, expert, rl, cfg, progress=False)
    assert stage2["batch"] == {"expert": 4, "rl": 4} and stage2["samples"] == {"expert": 24, "rl": 12}
    assert np.mean(stage2["losses"][-5:]) < 0.5 * np.mean(stage2["losses"][:3]), stage2["losses"]
    assert _mse_on(model, rl) < 0.3 * rl_error_before  # D_RL really was in the batches

    after = model.state_dict()
    unchanged = groups["pretrained"] + groups["critic_head"] + groups["log_std"]
    unchanged += [
        k for k, _ in model.named_buffers() if k in after
    ]  # BatchNorm statistics of the frozen backbone
    for name in unchanged:
        assert torch.equal(before[name], after[name]), f"{name} changed in Stage 2"
    for group in ("lora", "backbone_new", "token_learner", "action_head"):
        assert any(not torch.equal(before[n], after[n]) for n in groups[group]), (
            f"no {group} parameter trained"
        )


def test_full_fine_tuning_trains_the_backbone_but_not_the_critic(data):
    model = _tiny()
    named = dict(supervised_parameters(model, "full"))
    groups = {g: [n for n, _ in ps] for g, ps in model.named_parameter_groups().items()}
    assert set(groups["pretrained"]) <= set(named) and not set(groups["critic_head"]) & set(named)
    before = _snapshot(model)
    cfg = SFTConfig(steps=2, batch_size=4, threads=1, trainable="full")
    report = train_supervised(model, data[0], config=cfg, progress=False)
    after = model.state_dict()
    assert report["trainable_parameters"] > sum(before[n].numel() for n in groups["pretrained"])
    assert any(not torch.equal(before[n], after[n]) for n in groups["pretrained"] if "text." in n)
    assert any(not torch.equal(before[n], after[n]) for n in groups["pretrained"] if "vision." in n)
    for name in groups["critic_head"] + groups["log_std"]:
        assert torch.equal(before[name], after[name])


# ---------------------------------------------------------------- jobs and runners


def test_local_runner_saves_a_validated_version_with_lineage(parent, data, local_run):
    store, parent_id = parent
    info, report, job, seen = local_run
    assert info.stage == "stage2_sft" and info.parent == parent_id
    assert info.data["expert_episodes"] == ["expert-0", "expert-1"]
    assert info.data["rl_episodes"] == ["policy-0", "policy-1"]
    assert info.metrics["world_size"] == 1 and info.metrics["final_loss"] == report["final_loss"]
    assert report["resumed_from"] == 0 and len(report["losses"]) == JOB.steps
    assert [s for s, _, _ in seen] == list(range(1, JOB.steps + 1)) and seen[-1][2] == report["losses"][-1]
    checks = validate(store, info.version_id)  # checksums, weights, probe through torch and ONNX Runtime
    assert checks["weights"] == "ok" and info.onnx and "onnx_max_abs_error" in checks
    validate(store, parent_id)  # the parent is untouched and still loads
    # What the job shipped back is what the version holds; the rest is the parent's, bitwise.
    model, _, _ = store.load(info.version_id)
    old, _, _ = store.load(parent_id)
    for d in data:
        assert _mse_on(model, d) < 0.6 * _mse_on(old, d)  # it learnt both D_e and D_RL
    adapter = load_file(str(job / OUT_DIR / ADAPTER_FILE))
    groups = {g: {n for n, _ in ps} for g, ps in model.named_parameter_groups().items()}
    assert (
        set(adapter)
        == groups["lora"] | groups["backbone_new"] | groups["token_learner"] | groups["action_head"]
    )
    for name, value in model.state_dict().items():
        expected = adapter.get(name, old.state_dict()[name])
        assert torch.equal(value, expected), name
    # The job folder is plain data: the dataset reads back without pickle, equal to what went in.
    shipped = load_transitions_npz(job / EXPERT_FILE)
    assert np.array_equal(shipped.images, data[0].images) and shipped.instructions == data[0].instructions


def test_torchrun_two_gloo_processes_follow_the_one_process_run(parent, data, local_run, tmp_path):
    store, parent_id = parent
    ref_info, reference, _, _ = local_run
    runner = Stage2Runner("torchrun", nproc=2, work_dir=tmp_path, timeout_s=300, export_onnx=False)
    seen: list[int] = []
    info = runner.run(parent_id, data[0], data[1], JOB, store, progress=lambda step, *_: seen.append(step))
    assert seen == list(range(1, JOB.steps + 1))  # rank 0's progress lines, through the launcher's stdout
    report = read_result(tmp_path / info.data["job"])
    assert report["world_size"] == 2 and report["backend"] == "gloo" and info.metrics["world_size"] == 2
    np.testing.assert_allclose(report["losses"], reference["losses"], rtol=DDP_LOSS_RTOL)
    ours, ref = store.load(info.version_id)[0], store.load(ref_info.version_id)[0]
    for d in data:
        torch.testing.assert_close(_predict(ours, d), _predict(ref, d), atol=DDP_ACTION_ATOL, rtol=0)
    assert info.parent == parent_id and validate(store, info.version_id)["weights"] == "ok"


def test_sigkilled_worker_resumes_from_its_checkpoint_to_the_uninterrupted_result(
    parent, data, local_run, tmp_path
):
    store, parent_id = parent
    _, reference, ref_job, _ = local_run
    runner = Stage2Runner("local", work_dir=tmp_path, export_onnx=False)
    job = runner.job_for(parent_id, data[0], data[1], JOB, store)
    checkpoints = Checkpointer(job / CHECKPOINTS_DIR)
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "irevla_ros.train.stage2", "--job", str(job)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while not any(s >= 4 for s in checkpoints.steps()):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "worker wrote no checkpoint in time"
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=30) == -signal.SIGKILL
    killed_at = max(checkpoints.steps())
    assert 4 <= killed_at < JOB.steps and not (job / OUT_DIR / "report.json").exists()
    kept = checkpoints.load(killed_at)
    np.testing.assert_allclose(kept["losses"], reference["losses"][:killed_at], rtol=1e-6)

    info = runner.run(parent_id, data[0], data[1], JOB, store)  # the same job folder: resumes
    report = read_result(job)
    assert report["resumed_from"] == killed_at and report["steps_run"] == JOB.steps - killed_at
    assert report["losses"][:killed_at] == kept["losses"] and len(report["losses"]) == JOB.steps
    np.testing.assert_allclose(report["losses"], reference["losses"], rtol=1e-5)
    ours = load_file(str(job / OUT_DIR / ADAPTER_FILE))
    ref = load_file(str(ref_job / OUT_DIR / ADAPTER_FILE))
    worst = max(float((ours[k] - ref[k]).abs().max()) for k in ours)
    assert worst < 1e-5, worst  # a re-initialised or restarted run would be far off
    assert info.metrics["resumed_from"] == killed_at and validate(store, info.version_id)["weights"] == "ok"


def test_failed_timed_out_and_empty_jobs_raise_with_their_log_and_leave_the_parent(parent, data, tmp_path):
    store, parent_id = parent
    versions = [v.version_id for v in store.versions()]
    small = SFTConfig(steps=2, batch_size=4, threads=1)
    fails = Stage2Runner("echo shipping {job} to nowhere && echo boom >&2 && exit 3", work_dir=tmp_path)
    with pytest.raises(Stage2JobError, match="exit status 3") as failed:
        fails.run(parent_id, data[0], None, small, store)
    assert "shipping" in failed.value.log_tail and "boom" in failed.value.log_tail
    with pytest.raises(Stage2TimeoutError, match=r"ran past 1.0 s"):
        Stage2Runner("sleep 60 # {job}", work_dir=tmp_path, timeout_s=1.0).run(
            parent_id, data[0], None, small, store
        )
    with pytest.raises(Stage2JobError, match=r"left no out/report.json"):
        Stage2Runner("test -d {job}", work_dir=tmp_path).run(parent_id, data[0], None, small, store)

    def cancel(step: int, total: int, loss: float) -> None:
        raise KeyboardInterrupt("operator cancelled")  # whatever the caller raises comes back unchanged

    with pytest.raises(KeyboardInterrupt, match="operator cancelled"):
        Stage2Runner("local", work_dir=tmp_path).run(parent_id, data[0], None, small, store, progress=cancel)
    assert [v.version_id for v in store.versions()] == versions
    validate(store, parent_id)

    job = Stage2Runner("local", work_dir=tmp_path).job_for(parent_id, data[0], None, small, store)
    tampered = job / PARENT_DIR / "config.json"
    tampered.write_text(tampered.read_text().replace('"latent_dim": 32', '"latent_dim": 64'))
    with pytest.raises(Stage2Error, match=r"checksum mismatch for config.json"):
        load_parent(job)
    with pytest.raises(Stage2Error, match=r"no {job} placeholder"):
        Stage2Runner("ssh gpu-host torchrun")
    with pytest.raises(Stage2Error, match="smaller than nproc"):
        Stage2Runner("torchrun", nproc=8).job_for(parent_id, data[0], None, small, store)
    assert json.loads((job / "job.json").read_text())["rl"] is None


def test_a_template_that_brings_back_out_gives_the_version_once(parent, data, local_run, tmp_path):
    store, parent_id = parent
    _, reference, ref_job, _ = local_run
    # Stand-in for "rsync to a GPU host, torchrun there, rsync back": out/ comes back from the finished local job.
    template = f"echo shipped {{job_name}} && cp -r {shlex.quote(str(ref_job / OUT_DIR))} {{job}}/"
    runner = Stage2Runner(template, work_dir=tmp_path / "a folder with spaces", export_onnx=False)
    info = runner.run(parent_id, data[0], data[1], JOB, store)
    job = tmp_path / "a folder with spaces" / info.data["job"]
    assert info.metrics["launcher"] == "template" and info.parent == parent_id
    assert (
        info.metrics["final_loss"] == reference["final_loss"] and "shipped" in (job / "log.txt").read_text()
    )
    assert runner.run(parent_id, data[0], data[1], JOB, store).version_id == info.version_id  # no duplicate
    adapter = job / OUT_DIR / ADAPTER_FILE
    good = adapter.read_bytes()
    adapter.write_bytes(good[:-8])  # a transfer cut short: the next run fetches it again
    assert runner.run(parent_id, data[0], data[1], JOB, store).version_id == info.version_id
    assert adapter.read_bytes() == good and "previous result unusable" in (job / "log.txt").read_text()
    adapter.write_bytes(good[:-8])
    with pytest.raises(Stage2Error, match=r"does not match report\.json"):
        Stage2Runner("true {job}", work_dir=job.parent).run(parent_id, data[0], data[1], JOB, store)
