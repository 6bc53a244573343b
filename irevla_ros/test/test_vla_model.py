"""The VLA model core: config, preprocessing, compact backbone with real pretrained weights, hf backbones (tiny
random BLIP-2 and LLaVA built from transformers configs and loaded back from a local directory), LoRA and
trainable sets, exploration distribution, ONNX export agreement, instruction caching."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from irevla_ros.vla.config import COMPACT_IMAGE_SIZE, VLAConfig, VLAConfigError
from irevla_ros.vla.distribution import ClippedNormal, clipped_normal_log_prob, sample_action
from irevla_ros.vla.efficientnet_lite import load_lite0_state_dict
from irevla_ros.vla.model import STAGES, VLAModel
from irevla_ros.vla.onnx_export import ATOL, RTOL, export_onnx, verify_onnx
from irevla_ros.vla.preprocess import VLAInputError, preprocess_images
from irevla_ros.vla.runtime import TorchPolicyRuntime
from irevla_ros.vla.tiny_models import make_tiny_blip2, make_tiny_llava


@pytest.fixture(scope="module")
def compact() -> VLAModel:
    torch.manual_seed(0)
    return VLAModel(VLAConfig())


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_blip2(tmp_path_factory.mktemp("blip2") / "model")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "model")


def _hf_config(model_dir: Path, **kw) -> VLAConfig:
    return VLAConfig(backbone="hf", hf_model_dir=str(model_dir), latent_dim=64, head_hidden=(64, 64), **kw)


def _inputs(model: VLAModel, batch: int = 2, seed: int = 0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    images = torch.randn(batch, cfg.n_cameras, 3, s, s, generator=g)
    texts = ["press the button", "open the top drawer of the cabinet"][:batch]
    proprio = torch.randn(batch, cfg.proprio_dim, generator=g)
    return images, model.encode_instruction(texts), proprio


def _randomise_lora(model: VLAModel) -> None:
    # LoRA B starts at zero (no-op); give it values so exports and round trips exercise the adapters.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------- config and preprocessing


def test_config_round_trip_and_errors_name_the_key():
    cfg = VLAConfig(cameras=("front", "wrist"), head_hidden=(128, 64), lora_targets=("query",))
    assert VLAConfig.from_json(cfg.to_json()) == cfg
    assert VLAConfig.from_dict(cfg.to_dict()).resolved().image_size == COMPACT_IMAGE_SIZE
    with pytest.raises(VLAConfigError, match=r"unknown VLA config key.*lora_rnak"):
        VLAConfig.from_dict({**cfg.to_dict(), "lora_rnak": 4})
    with pytest.raises(VLAConfigError, match="backbone"):
        VLAConfig(backbone="blip3")
    with pytest.raises(VLAConfigError, match="hf_model_dir"):
        VLAConfig(backbone="hf")
    with pytest.raises(VLAConfigError, match="cameras"):
        VLAConfig(cameras=("front", "front"))
    with pytest.raises(VLAConfigError, match="lora_rank"):
        VLAConfig.from_dict({"lora_rank": -1})
    with pytest.raises(VLAConfigError, match="image_std"):
        VLAConfig(image_std=(0.5, 0.0, 0.5))


def test_preprocess_resizes_normalises_and_orders_cameras():
    cfg = VLAConfig(cameras=("front", "wrist"))
    front = np.full((480, 640, 3), 127, np.uint8)
    wrist = np.zeros((240, 320, 3), np.uint8)
    wrist[..., 0] = 255
    out = preprocess_images({"wrist": wrist, "front": front}, cfg)
    assert out.shape == (2, 3, 128, 128) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 0.0, atol=1e-6)  # EfficientNet-Lite: (x - 127) / 128
    np.testing.assert_allclose(out[1, 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1, 1:], -127 / 128, atol=1e-6)
    np.testing.assert_array_equal(preprocess_images([front, wrist], cfg), out)  # sequence in config order
    with pytest.raises(VLAInputError, match="missing \\['wrist'\\]"):
        preprocess_images({"front": front}, cfg)
    with pytest.raises(VLAInputError, match="uint8"):
        preprocess_images({"front": front.astype(np.float32), "wrist": wrist}, cfg)
    with pytest.raises(VLAInputError, match="HxWx3"):
        preprocess_images({"front": front[..., 0], "wrist": wrist}, cfg)


def test_preprocess_hf_uses_the_model_directory_defaults(blip2_dir):
    cfg = _hf_config(blip2_dir).resolved()
    assert cfg.image_size == 32 and cfg.lora_targets == ("q_proj", "v_proj")
    out = preprocess_images({"camera": np.full((64, 64, 3), 255, np.uint8)}, cfg)
    expected = (1.0 - np.array(cfg.image_mean)) / np.array(cfg.image_std)  # CLIP statistics
    np.testing.assert_allclose(out[0, :, 5, 5], expected, rtol=1e-5)


# ---------------------------------------------------------------- compact backbone: real pretrained weights


def test_compact_backbone_has_the_pretrained_weights(compact):
    file_state = load_lite0_state_dict()
    vision = compact.backbone.vision.state_dict()
    stem = vision["_conv_stem.weight"]
    assert torch.equal(stem, file_state["_conv_stem.weight"])
    assert torch.equal(
        vision["_blocks.15._project_conv.weight"], file_state["_blocks.15._project_conv.weight"]
    )
    # ImageNet-trained BatchNorm statistics, not the (0, 1) of a fresh init
    assert not torch.allclose(vision["_bn0.running_var"], torch.ones(32))
    random_init = VLAModel(VLAConfig(), load_pretrained=False)
    assert not torch.equal(random_init.backbone.vision.state_dict()["_conv_stem.weight"], stem)


def test_compact_image_encoder_recognises_imagenet_content():
    # The weights, TensorFlow SAME padding and (x-127)/128 normalisation together: Grace Hopper's portrait is
    # "military uniform" (ImageNet class 652) at the network's native 224x224.
    path = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    model = VLAModel(VLAConfig(image_size=224, lora_rank=0))
    x = torch.from_numpy(preprocess_images({"camera": image}, model.config))
    state = load_lite0_state_dict()
    with torch.no_grad():
        logits = model.backbone.vision(x).mean((2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]
    assert int(logits.argmax()) == 652


def test_compact_text_features_are_the_sentence_transformer_embedding(compact):
    st = pytest.importorskip("sentence_transformers")
    from irevla_ros.vla.backbones import minilm_dir

    texts = ["press the button", "push the button", "open the drawer"]
    reference = st.SentenceTransformer(str(minilm_dir()), device="cpu").encode(texts, convert_to_tensor=True)
    with torch.no_grad():
        ours = compact.encode_instruction(texts)[:, 0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] + 0.2  # pretrained semantics: press ~ push, not ~ open drawer


# ---------------------------------------------------------------- hf backbones (tiny BLIP-2, LLaVA)


def test_tiny_blip2_forward_backward_and_lora_trainable_sets(blip2_dir):
    model = VLAModel(_hf_config(blip2_dir, cameras=("front", "wrist"), lora_rank=4))
    images, text, proprio = _inputs(model)
    assert text.shape[0] == 2 and (text[0].abs().amax(-1) == 0).any()  # padded positions are zero vectors
    params = model.set_trainable("lora_and_action_head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n
        or n.startswith(("action_head.", "token_learner.", "backbone.camera_embed", "backbone.proprio"))
        for n in trainable
    )
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    assert not any(n.startswith("critic_head") or n == "log_std" for n in trainable)
    assert len(params) == len(trainable)

    model.train()
    latent = model.encode(images, text, proprio)
    assert latent.shape == (2, 64)
    loss = (model.action_mean(latent) - 0.3).pow(2).mean()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any("lora_B" in n for n in grads) and any(n.startswith("action_head") for n in grads)
    assert grads <= trainable  # frozen pretrained weights get no gradient
    # a LoRA step changes the latent: the backbone really is being adapted
    before = latent.detach().clone()
    torch.optim.SGD(params, lr=1.0).step()
    with torch.no_grad():
        assert not torch.allclose(model.eval().encode(images, text, proprio), before)


def test_heads_stage_freezes_everything_but_the_heads(blip2_dir):
    model = VLAModel(_hf_config(blip2_dir))
    model.set_trainable("heads")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(("action_head", "action_residual", "critic_head"))
    } | {"log_std"}
    assert set(STAGES) == {"heads", "lora_and_action_head"}
    with pytest.raises(VLAConfigError, match="unknown training stage"):
        model.set_trainable("everything")


def test_lora_targets_that_match_nothing_are_refused(blip2_dir):
    with pytest.raises(VLAConfigError, match="lora_targets"):
        VLAModel(_hf_config(blip2_dir, lora_targets=("no_such_layer",)))


def test_pretrained_modules_stay_in_eval_mode(compact):
    compact.train()
    try:
        assert not compact.backbone.vision.training and not compact.backbone.text.training
        assert compact.token_learner.training and compact.backbone.fusion.training
    finally:
        compact.eval()


def test_encode_rejects_wrong_shapes(compact):
    images, text, proprio = _inputs(compact)
    with pytest.raises(VLAInputError, match="images must have shape"):
        compact.encode(images[:, :, :, :64], text, proprio)
    with pytest.raises(VLAInputError, match="proprio"):
        compact.encode(images, text, proprio[:, :3])
    with pytest.raises(VLAInputError, match="text_features"):
        compact.encode(images, text[..., :10], proprio)


# ---------------------------------------------------------------- exploration


def test_exploration_log_prob_is_that_of_the_executed_clipped_action(compact):
    images, text, proprio = _inputs(compact)
    with torch.no_grad():
        latent = compact.encode(images, text, proprio)
    det = compact.act(images, text, proprio, deterministic=True, latent=latent)
    torch.testing.assert_close(det.action, compact.action_mean(latent))
    g = torch.Generator().manual_seed(0)
    out = compact.act(images, text, proprio, deterministic=False, generator=g, latent=latent)
    assert out.action.shape == (2, 4) and out.value.shape == (2,)
    assert out.action.abs().max() <= 1.0
    with torch.no_grad():
        dist = compact.distribution(latent)
        # reproducible from the stored action alone
        torch.testing.assert_close(out.log_prob, dist.log_prob(out.action))
    for i in range(2):
        np_lp = clipped_normal_log_prob(
            out.action[i].numpy(), dist.mean[i].numpy(), compact.log_std.detach().numpy()
        )
        assert np_lp == pytest.approx(float(out.log_prob[i]), abs=1e-4)
    # at a bound the log-probability is the tail mass P(x >= 1), not a density
    wide = ClippedNormal(torch.zeros(1, 1), torch.tensor([3.0]))
    tail = 0.5 * math.erfc(1.0 / (math.exp(3.0) * math.sqrt(2.0)))
    assert float(wide.log_prob(torch.ones(1, 1))) == pytest.approx(math.log(tail), abs=1e-5)
    action, lp = sample_action(np.zeros(4), np.full(4, 3.0), np.random.default_rng(0), deterministic=False)
    assert np.all(np.abs(action) <= 1) and np.isfinite(lp)


# ---------------------------------------------------------------- ONNX export agrees with torch


@pytest.mark.parametrize("backbone", ["compact", "blip2", "llava"])
def test_onnx_export_matches_torch(backbone, compact, blip2_dir, llava_dir, tmp_path):
    if backbone == "compact":
        model = compact
    else:
        model_dir = blip2_dir if backbone == "blip2" else llava_dir
        model = VLAModel(_hf_config(model_dir, cameras=("front", "wrist")))
    _randomise_lora(model)
    try:
        export_onnx(model, tmp_path)
        errors = verify_onnx(model, tmp_path, seed=3)  # raises beyond ATOL + RTOL*|x|
    finally:
        if backbone == "compact":  # module-scoped fixture: put LoRA back to its no-op start
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data.zero_()
    assert set(errors) == {"text_features", "latent", "action_mean", "value", "log_std"}
    assert max(errors.values()) <= ATOL + RTOL
    assert errors["latent"] < 5e-5


# ---------------------------------------------------------------- instruction cache


def test_torch_runtime_encodes_each_instruction_once(compact):
    rt = TorchPolicyRuntime(compact)
    calls = []
    original = compact.encode_instruction
    compact.encode_instruction = lambda texts: calls.append(texts) or original(texts)  # type: ignore[method-assign]
    try:
        a = rt.encode_instruction("press the button")
        b = rt.encode_instruction("press the button")
        image = {"camera": np.zeros((48, 64, 3), np.uint8)}
        for _ in range(3):
            rt.act(image, "press the button", np.zeros(4, np.float32))
        c = rt.encode_instruction("open the drawer")
    finally:
        del compact.encode_instruction
    assert a is b and not a.flags.writeable
    assert len(calls) == 2 and rt.text_encoder_calls == 2
    assert not np.array_equal(a, c)
    with torch.no_grad():
        np.testing.assert_array_equal(a, compact.encode_instruction(["press the button"]).numpy())
