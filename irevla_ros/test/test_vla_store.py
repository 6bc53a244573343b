"""Model store: versions written atomically with checksums, verified loads that never unpickle, refusal of
corrupt / non-finite / mis-shaped versions with clear errors, and the ONNX and torch runtimes on stored versions."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from irevla_ros.vla.config import VLAConfig
from irevla_ros.vla.integrity import (
    CorruptVersionError,
    InvalidVersionError,
    UnknownVersionError,
    sha256_file,
)
from irevla_ros.vla.model import HEAD_GROUPS, VLAModel
from irevla_ros.vla.model_store import ModelStore
from irevla_ros.vla.onnx_export import ATOL, RTOL
from irevla_ros.vla.runtime import OnnxPolicyRuntime, TorchPolicyRuntime, make_runtime
from irevla_ros.vla.tiny_models import make_tiny_blip2
from irevla_ros.vla.validation import probe_observation, validate, validate_heads


def _perturb(model: VLAModel, seed: int) -> VLAModel:
    # Trained-looking weights: LoRA away from its zero start, heads away from their init.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith(("action_head", "critic_head", "token_learner")):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def compact() -> VLAModel:
    torch.manual_seed(0)
    return _perturb(VLAModel(VLAConfig(cameras=("front", "wrist"))), 0)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_blip2(tmp_path_factory.mktemp("blip2") / "model")


@pytest.fixture(scope="module")
def blip2(blip2_dir) -> VLAModel:
    cfg = VLAConfig(backbone="hf", hf_model_dir=str(blip2_dir), latent_dim=64, head_hidden=(64,), lora_rank=4)
    return _perturb(VLAModel(cfg), 1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, compact, blip2):
    """One store with a compact version and a BLIP-2 child version (saving is the slow part: do it once)."""
    store = ModelStore(tmp_path_factory.mktemp("store") / "models")
    v1 = store.save(
        compact, compact.config, parent=None, stage="stage0_sft", data={"episodes": 50}, metrics={"mse": 0.02}
    )
    v2 = store.save(blip2, blip2.config, parent=v1.version_id, stage="stage2_sft", metrics={"success": 0.8})
    return store, v1, v2


def _copy_version(store: ModelStore, version_id: str, tmp_path: Path) -> tuple[ModelStore, str]:
    other = ModelStore(tmp_path / "copy")
    shutil.copytree(store.root / version_id, other.root / version_id)
    return other, version_id


def _reseal(path: Path) -> None:
    """Recompute manifest and meta checksums, as a writer that saved bad content would have (so the checksum
    check passes and the content checks must catch it)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (path / "manifest.json").write_bytes(data)
    meta = json.loads((path / "meta.json").read_text())
    meta["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    (path / "meta.json").write_text(json.dumps(meta))


def _rewrite_tensor(path: Path, name: str, fn) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------- layout, metadata, round trip


def test_version_layout_and_metadata(saved):
    store, v1, v2 = saved
    assert v1.version_id == "v0001-stage0_sft" and v2.version_id == "v0002-stage2_sft"
    assert [v.version_id for v in store.versions()] == [v1.version_id, v2.version_id]
    assert store.latest().version_id == v2.version_id
    assert store.latest(stage="stage0_sft").version_id == v1.version_id
    files = {p.name for p in v1.path.iterdir()}
    assert {"model.safetensors", "config.json", "meta.json", "manifest.json", "tokenizer"} <= files
    assert {"text.onnx", "encoder.onnx", "heads.onnx"} <= files
    assert v2.parent == v1.version_id and v1.parent is None
    assert v1.data == {"episodes": 50} and v2.metrics == {"success": 0.8}
    assert v1.meta["manifest_sha256"] == sha256_file(v1.path / "manifest.json")
    manifest = json.loads((v1.path / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == sha256_file(v1.path / "model.safetensors")
    assert max(v1.onnx["max_abs_error"].values()) <= ATOL + RTOL
    assert not list(store.root.glob(".tmp-*"))
    # hf: only what is not the base model is stored; the base is pinned by checksum
    assert v2.meta["hf_base"]["files"]["model.safetensors"] == sha256_file(
        Path(v2.meta["hf_base"]["dir"]) / "model.safetensors"
    )
    stored = load_file(str(v2.path / "model.safetensors"))
    assert not any(k.startswith("backbone.vlm.") and "lora_" not in k for k in stored)


@pytest.mark.parametrize("which", ["compact", "blip2"])
def test_save_load_round_trip_is_bitwise(saved, compact, blip2, which):
    store, v1, v2 = saved
    original, info = (compact, v1) if which == "compact" else (blip2, v2)
    model, config, loaded_info = store.load(info.version_id)
    assert config == original.config and loaded_info.version_id == info.version_id
    want, got = original.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert want[key].dtype == got[key].dtype and torch.equal(want[key], got[key]), key


def test_load_never_unpickles(saved, monkeypatch):
    store, v1, _ = saved

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called while loading a model version")

    monkeypatch.setattr(torch, "load", no_pickle)
    store.load(v1.version_id)


def test_validate_reports_and_onnx_runtime_matches_torch(saved):
    store, v1, _ = saved
    report = validate(store, v1.version_id)
    assert report["checksums"] == "ok" and max(report["onnx_max_abs_error"].values()) <= ATOL + RTOL
    model, config, _ = store.load(v1.version_id)
    ort_rt, torch_rt = OnnxPolicyRuntime(v1.path, intra_op_threads=2), TorchPolicyRuntime(model)
    rng = np.random.default_rng(0)
    images = {c: rng.integers(0, 256, (120, 160, 3), dtype=np.uint8) for c in config.cameras}
    proprio = rng.normal(size=4).astype(np.float32)
    o_mean, o_value, o_latent = ort_rt.act(images, "open the drawer", proprio)
    t_mean, t_value, t_latent = torch_rt.act(images, "open the drawer", proprio)
    np.testing.assert_allclose(o_latent, t_latent, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(o_mean, t_mean, atol=ATOL, rtol=RTOL)
    assert o_value == pytest.approx(t_value, abs=ATOL, rel=RTOL)
    np.testing.assert_array_equal(ort_rt.log_std, model.log_std.detach().numpy())
    # RL split: heads on a cached latent give the same as the full step
    h_mean, _ = ort_rt.heads(o_latent)
    np.testing.assert_allclose(h_mean[0], o_mean, atol=1e-6)
    action, log_prob = ort_rt.sample(o_mean, np.random.default_rng(1), deterministic=True)
    np.testing.assert_allclose(action, o_mean, atol=1e-7)
    assert np.isfinite(log_prob)


def test_onnx_runtime_caches_the_instruction(saved):
    _, v1, _ = saved
    rt = OnnxPolicyRuntime(v1.path)
    runs = []
    session = rt.sessions["text"]

    class Counting:
        def run(self, *args, **kwargs):
            runs.append(1)
            return session.run(*args, **kwargs)

    rt.sessions["text"] = Counting()
    a = rt.encode_instruction("press the button")
    images = {c: np.zeros((48, 64, 3), np.uint8) for c in rt.config.cameras}
    for _ in range(3):
        rt.act(images, "press the button", np.zeros(4, np.float32))
    assert rt.encode_instruction("press the button") is a
    assert len(runs) == 1 and rt.text_encoder_calls == 1
    rt.encode_instruction("open the drawer")
    assert len(runs) == 2


def test_make_runtime_falls_back_to_torch_without_onnx(tmp_path, blip2):
    store = ModelStore(tmp_path / "models")
    info = store.save(blip2, parent=None, stage="stage1_rl", export_onnx=False)
    assert info.onnx is None and not (info.path / "encoder.onnx").exists()
    rt = make_runtime(info.path)
    assert isinstance(rt, TorchPolicyRuntime)
    mean, value, latent = rt.act(
        {"camera": np.zeros((32, 32, 3), np.uint8)}, "press", np.zeros(4, np.float32)
    )
    assert mean.shape == (4,) and latent.shape == (64,) and np.isfinite(value)
    with pytest.raises(InvalidVersionError, match="no ONNX export"):
        OnnxPolicyRuntime(info.path)


# ---------------------------------------------------------------- refusals


def test_checksum_mismatch_is_refused_naming_the_file(saved, tmp_path):
    store, _, v1 = saved  # the small BLIP-2 version: cheap to copy
    other, vid = _copy_version(store, v1.version_id, tmp_path)
    path = other.root / vid
    with open(path / "heads.onnx", "r+b") as f:  # one flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptVersionError, match=r"checksum mismatch for heads\.onnx"):
        other.load(vid)
    with pytest.raises(CorruptVersionError, match=r"heads\.onnx"):
        OnnxPolicyRuntime(path)
    with pytest.raises(InvalidVersionError, match=r"checksum mismatch for heads\.onnx"):
        validate(other, vid)


def test_tampered_manifest_and_unlisted_files_are_refused(saved, tmp_path):
    store, _, v1 = saved  # the small BLIP-2 version: cheap to copy
    other, vid = _copy_version(store, v1.version_id, tmp_path)
    path = other.root / vid
    (path / "tokenizer" / "added_tokens.json").write_text("{}")
    with pytest.raises(CorruptVersionError, match=r"tokenizer/added_tokens\.json is not listed"):
        other.load(vid)
    (path / "tokenizer" / "added_tokens.json").unlink()
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["model.safetensors"]["sha256"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptVersionError, match=r"checksum mismatch for manifest\.json"):
        other.load(vid)


def test_nan_weights_are_refused(saved, tmp_path, blip2):
    store, _, v1 = saved  # the small BLIP-2 version: cheap to copy
    other, vid = _copy_version(store, v1.version_id, tmp_path)
    path = other.root / vid

    def poison(t):
        t = t.clone()
        t.view(-1)[0] = float("nan")
        return t

    _rewrite_tensor(path, "action_head.0.weight", poison)
    _reseal(path)
    with pytest.raises(InvalidVersionError, match=r"non-finite.*action_head\.0\.weight"):
        validate(other, vid)
    with pytest.raises(InvalidVersionError, match="non-finite"):
        other.load(vid)
    # and a model with NaN weights is not saved in the first place
    bad = VLAModel(blip2.config)
    with torch.no_grad():
        bad.critic_head[0].weight[0, 0] = float("inf")
    with pytest.raises(InvalidVersionError, match=r"refusing to save.*critic_head"):
        ModelStore(tmp_path / "s2").save(bad, parent=None, stage="stage1_rl")
    assert not list((tmp_path / "s2").iterdir()) or [p.name for p in (tmp_path / "s2").iterdir()] == [".lock"]


def test_wrong_shapes_are_refused(saved, tmp_path):
    store, _, v1 = saved  # the small BLIP-2 version: cheap to copy
    other, vid = _copy_version(store, v1.version_id, tmp_path)
    path = other.root / vid
    _rewrite_tensor(path, "action_head.2.weight", lambda t: torch.zeros(5, t.shape[1]))
    _reseal(path)
    with pytest.raises(
        InvalidVersionError, match=r"wrong shape for tensor action_head\.2\.weight.*\(5, 64\).*\(4, 64\)"
    ):
        validate(other, vid)

    # a config that disagrees with the weights and the ONNX graphs (action_dim 5) is caught too
    other2, vid2 = _copy_version(store, v1.version_id, tmp_path / "b")
    path2 = other2.root / vid2
    cfg = json.loads((path2 / "config.json").read_text())
    cfg["action_dim"] = 5
    (path2 / "config.json").write_text(json.dumps(cfg))
    _reseal(path2)
    with pytest.raises(InvalidVersionError, match="wrong shape"):
        validate(other2, vid2)
    with pytest.raises(InvalidVersionError, match=r"heads\.onnx action_mean has shape"):
        OnnxPolicyRuntime(path2)


def test_onnx_graph_of_another_model_is_refused(saved, tmp_path, blip2):
    store, _, v1 = saved  # the small BLIP-2 version: cheap to copy
    other, vid = _copy_version(store, v1.version_id, tmp_path)
    path = other.root / vid
    # heads.onnx of a model whose heads differ (consistent checksums): torch and ONNX disagree on the probe
    from irevla_ros.vla.onnx_export import export_onnx

    changed = _perturb(VLAModel(blip2.config), 7)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    export_onnx(changed, export_dir, parts=("heads",))
    shutil.copy(export_dir / "heads.onnx", path / "heads.onnx")
    _reseal(path)
    with pytest.raises(InvalidVersionError, match="ONNX does not match torch"):
        validate(other, vid)


def test_unknown_versions_parents_and_stages(saved, blip2, tmp_path):
    store, _, _ = saved
    with pytest.raises(UnknownVersionError, match="no version v0099-stage0_sft"):
        store.load("v0099-stage0_sft")
    with pytest.raises(UnknownVersionError, match="not a version id"):
        store.get("../etc")
    s = ModelStore(tmp_path / "m")
    with pytest.raises(UnknownVersionError):
        s.save(blip2, parent="v0007-stage0_sft", stage="stage2_sft", export_onnx=False)
    with pytest.raises(InvalidVersionError, match="stage"):
        s.save(blip2, parent=None, stage="Stage 2!", export_onnx=False)
    with pytest.raises(InvalidVersionError, match="config does not match"):
        s.save(blip2, blip2.config.replace(lora_rank=2), parent=None, stage="x", export_onnx=False)


def test_failed_save_leaves_nothing_and_concurrent_saves_get_distinct_ids(tmp_path, blip2, monkeypatch):
    store = ModelStore(tmp_path / "models")
    import irevla_ros.vla.onnx_export as onnx_export

    def broken_export(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(onnx_export, "export_onnx", broken_export)
        with pytest.raises(RuntimeError, match="disk full"):
            store.save(blip2, parent=None, stage="stage0_sft")
    assert store.versions() == [] and not list(store.root.glob(".tmp-*"))

    ids: list[str] = []
    threads = [
        threading.Thread(
            target=lambda: ids.append(
                store.save(blip2, parent=None, stage="stage1_rl", export_onnx=False).version_id
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == ["v0001-stage1_rl", "v0002-stage1_rl", "v0003-stage1_rl"]


def test_changed_hf_base_model_is_refused(tmp_path):
    base = make_tiny_blip2(tmp_path / "base", seed=0)
    cfg = VLAConfig(backbone="hf", hf_model_dir=str(base), latent_dim=32, head_hidden=(32,), lora_rank=2)
    store = ModelStore(tmp_path / "models")
    info = store.save(VLAModel(cfg), parent=None, stage="stage0_sft", export_onnx=False)
    store.load(info.version_id)
    make_tiny_blip2(base, seed=1)  # someone replaced the base weights in place
    with pytest.raises(
        CorruptVersionError, match=r"checksum mismatch for base model file .*model\.safetensors"
    ):
        store.load(info.version_id)


# ---------------------------------------------------------------- heads-only versions (Stage 1 pushes)


def _new_heads(model: VLAModel, seed: int) -> VLAModel:
    """A copy of `model` whose heads moved, the rest frozen (a Stage 1 step); its action residual corrects by at
    most 0.3, so the versions, their ONNX heads and their loads carry one."""
    import copy

    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.split(".")[0] in HEAD_GROUPS:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out.action_residual.scale.fill_(0.3)
    return out


@pytest.fixture(scope="module")
def heads_saved(tmp_path_factory, blip2):
    """A full BLIP-2 version, heads on it, and heads on those heads (a chain of Stage 1 pushes)."""
    store = ModelStore(tmp_path_factory.mktemp("heads") / "models")
    base = store.save(blip2, parent=None, stage="stage0_sft")
    m1 = _new_heads(blip2, 11)
    h1 = store.save_heads(m1, base.version_id, data={"transitions": 500}, metrics={"return": 0.4})
    m2 = _new_heads(m1, 12)
    h2 = store.save_heads(m2, h1.version_id)
    return store, base, (h1, m1), (h2, m2)


def _heads_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "heads.safetensors"))


def test_save_heads_layout_chain_and_round_trip(heads_saved):
    store, base, (h1, m1), (h2, m2) = heads_saved
    assert h1.heads_only and h1.base_version == base.version_id and h1.parent == base.version_id
    assert (
        h2.heads_only and h2.base_version == base.version_id and h2.parent == h1.version_id
    )  # chain -> base
    assert not base.heads_only and base.base_version == base.version_id
    assert h1.stage == "stage1_rl" and h1.data == {"transitions": 500} and h1.metrics == {"return": 0.4}
    files = {p.name for p in h1.path.iterdir()}
    assert files == {"heads.safetensors", "config.json", "heads.onnx", "manifest.json", "meta.json"}
    assert (h1.path / "config.json").read_bytes() == (base.path / "config.json").read_bytes()
    assert h1.meta["base_manifest_sha256"] == base.manifest_sha256
    assert set(h1.onnx["files"]) == {"heads"} and max(h1.onnx["max_abs_error"].values()) <= ATOL + RTOL
    stored = _heads_tensors(h1.path)
    assert stored and all(k.split(".")[0] in HEAD_GROUPS for k in stored)
    assert float(stored["action_residual.scale"]) == pytest.approx(0.3)
    # a heads update is a small fraction of its base version
    assert sum(h1.meta["bytes"].values()) < 0.2 * sum(base.meta["bytes"].values())
    for info, model in ((h1, m1), (h2, m2)):
        loaded, config, got = store.load(info.version_id)
        assert got.version_id == info.version_id and config == model.config
        want, have = model.state_dict(), loaded.state_dict()
        assert want.keys() == have.keys()
        for key in want:
            assert torch.equal(want[key], have[key]), (info.version_id, key)
    report = validate(store, h2.version_id)
    assert report["heads_only"] and report["base_version"] == base.version_id
    assert max(report["onnx_max_abs_error"].values()) <= ATOL + RTOL
    # the light check (a node already running the base's encoder) agrees with the full one on the probe
    _, _, latent = OnnxPolicyRuntime(base.path).act(*probe_observation(m2.config))
    light = validate_heads(store, h2.version_id, latents=latent)
    np.testing.assert_allclose(
        light["probe_torch"]["action_mean"], report["probe_torch"]["action_mean"], atol=1e-5
    )
    assert max(light["onnx_max_abs_error"].values()) <= ATOL + RTOL
    with pytest.raises(InvalidVersionError, match="is a full version"):
        validate_heads(store, base.version_id)


def test_heads_runtime_reuses_the_base_encoder(heads_saved):
    store, base, (h1, _), (h2, m2) = heads_saved
    base_rt = OnnxPolicyRuntime(base.path)
    base_rt.encode_instruction("press the button")
    shared = make_runtime(h2.path, reuse=base_rt)
    alone = make_runtime(h2.path)
    assert isinstance(shared, OnnxPolicyRuntime) and isinstance(alone, OnnxPolicyRuntime)
    assert shared.reused_encoder and not alone.reused_encoder
    assert shared.encoder_version == alone.encoder_version == base.version_id
    assert shared.sessions["encoder"] is base_rt.sessions["encoder"]
    assert shared.sessions["text"] is base_rt.sessions["text"]
    assert shared.sessions["heads"] is not base_rt.sessions["heads"]
    assert alone.sessions["encoder"] is not base_rt.sessions["encoder"]
    rng = np.random.default_rng(3)
    images = {c: rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for c in m2.config.cameras}
    proprio = np.array([0.1, 0.6, 0.2, 1.0], np.float32)
    s_mean, s_value, s_latent = shared.act(images, "press the button", proprio)
    assert shared.text_encoder_calls == 0  # the base runtime's instruction cache came along
    a_mean, _, _ = alone.act(images, "press the button", proprio)
    np.testing.assert_array_equal(s_mean, a_mean)
    t_mean, t_value, _ = TorchPolicyRuntime(m2).act(images, "press the button", proprio)
    np.testing.assert_allclose(s_mean, t_mean, atol=ATOL, rtol=RTOL)
    assert s_value == pytest.approx(t_value, abs=ATOL, rel=RTOL)
    np.testing.assert_array_equal(shared.log_std, m2.log_std.detach().numpy())
    # the heads changed, the encoder did not: same latent as the base, other actions
    b_mean, _, b_latent = base_rt.act(images, "press the button", proprio)
    np.testing.assert_array_equal(s_latent, b_latent)
    assert not np.allclose(s_mean, b_mean)
    # a runtime on another base is not shared
    other = ModelStore(store.root)
    assert not make_runtime(h1.path, reuse=TorchPolicyRuntime(m2)).reused_encoder
    assert other.get(h1.version_id).heads_only


def test_save_heads_refuses_wrong_bases_and_moved_backbones(heads_saved, tmp_path):
    store, base, (h1, m1), _ = heads_saved
    with pytest.raises(UnknownVersionError, match="no version v0099"):
        store.save_heads(m1, "v0099-stage0_sft")
    with pytest.raises(InvalidVersionError, match="needs a parent"):
        store.save_heads(m1, "")
    with pytest.raises(InvalidVersionError, match="stage"):
        store.save_heads(m1, base.version_id, stage="Stage 1!")
    other = VLAModel(m1.config.replace(head_hidden=(32,)))
    with pytest.raises(InvalidVersionError, match=r"differs from its base .*head_hidden"):
        store.save_heads(other, h1.version_id)
    moved = _new_heads(m1, 13)
    with torch.no_grad():
        moved.token_learner.out_norm.weight.add_(0.01)
    with pytest.raises(InvalidVersionError, match=r"token_learner\.out_norm\.weight differs from base"):
        store.save_heads(moved, h1.version_id)
    bad = _new_heads(m1, 14)
    with torch.no_grad():
        bad.critic_head[0].weight[0, 0] = float("nan")
    with pytest.raises(InvalidVersionError, match=r"refusing to save.*critic_head"):
        store.save_heads(bad, h1.version_id)
    assert not list(store.root.glob(".tmp-*"))
    assert [v.version_id for v in store.versions()][-1] == "v0003-stage1_rl"  # nothing new was written


def _copy_store(store: ModelStore, tmp_path: Path) -> ModelStore:
    other = ModelStore(tmp_path / "copy")
    for version in store.versions():
        shutil.copytree(version.path, other.root / version.version_id)
    return other


def test_corrupt_heads_versions_are_refused(heads_saved, tmp_path):
    store, base, (h1, _), (h2, _) = heads_saved
    other = _copy_store(store, tmp_path / "a")
    path = other.root / h1.version_id
    data = bytearray((path / "heads.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (path / "heads.safetensors").write_bytes(bytes(data))
    for check in (
        other.load,
        lambda v: validate(other, v),
        lambda v: validate_heads(other, v),
        lambda v: OnnxPolicyRuntime(other.root / v),
    ):
        with pytest.raises(CorruptVersionError, match=r"checksum mismatch for heads\.safetensors"):
            check(h1.version_id)

    # NaN heads, resealed: the checksums pass, the content checks refuse it
    other = _copy_store(store, tmp_path / "b")
    path = other.root / h2.version_id
    tensors = _heads_tensors(path)
    tensors["action_head.0.weight"] = tensors["action_head.0.weight"].clone().fill_(float("nan"))
    save_file(tensors, str(path / "heads.safetensors"), metadata={"format": "pt"})
    _reseal(path)
    with pytest.raises(InvalidVersionError, match=r"non-finite.*action_head\.0\.weight"):
        validate(other, h2.version_id)
    with pytest.raises(InvalidVersionError, match=r"non-finite.*action_head\.0\.weight"):
        validate_heads(other, h2.version_id)
    # a heads file with a backbone tensor in it (heads-only versions hold only heads)
    tensors = _heads_tensors(store.root / h2.version_id)
    tensors["token_learner.out_norm.weight"] = torch.ones(64)
    save_file(tensors, str(path / "heads.safetensors"), metadata={"format": "pt"})
    _reseal(path)
    with pytest.raises(InvalidVersionError, match=r"unexpected \['token_learner\.out_norm\.weight'\]"):
        other.load(h2.version_id)

    # the base changed under its heads (resealed, so the base alone still verifies): heads are refused
    other = _copy_store(store, tmp_path / "c")
    _rewrite_tensor(other.root / base.version_id, "token_learner.out_norm.bias", lambda t: t + 0.5)
    _reseal(other.root / base.version_id)
    other.load(base.version_id)
    for check in (
        other.load,
        lambda v: validate(other, v),
        lambda v: validate_heads(other, v),
        lambda v: OnnxPolicyRuntime(other.root / v),
    ):
        with pytest.raises(CorruptVersionError, match=rf"base {base.version_id} has changed"):
            check(h2.version_id)

    # the base is gone
    other = _copy_store(store, tmp_path / "d")
    shutil.rmtree(other.root / base.version_id)
    with pytest.raises(UnknownVersionError, match=f"no version {base.version_id}"):
        other.load(h1.version_id)
    with pytest.raises(UnknownVersionError, match=f"base version {base.version_id} is not in the store"):
        OnnxPolicyRuntime(other.root / h1.version_id)
