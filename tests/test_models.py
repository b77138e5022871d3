"""Class-Encoder, ResNet20 variants, the diffusion base (tiny models, loading, errors)."""

import json

import numpy as np
import pytest
import torch

from raysd.errors import RaysdError
from raysd.core.imaging import model_to_uint8, resize_bilinear, uint8_to_model, upsample_uint8
from raysd.core.models import ClassEncoder, resnet20
from raysd.core.models.diffusion import build_tiny
from raysd.data.models import load_base_model, save_base_model
from raysd.core.models.resnet import _same_pads


def test_class_encoder_shapes_and_parameter_count():
    enc = ClassEncoder(10, 77, 1024)
    assert enc(torch.eye(10)).shape == (10, 77, 1024)
    assert enc.encode(torch.tensor([3, 4])).shape == (2, 77, 1024)
    n = sum(p.numel() for p in enc.parameters())
    assert n == 10 * 500 + 500 + 500 * 77 * 1024  # Linear(C,500,bias) + Linear(500,L*D,no bias)
    assert enc.fc2.bias is None


def test_class_encoder_unconditional_is_the_zero_vector():
    enc = ClassEncoder(5, 4, 8)
    expected = enc.fc2(enc.fc1.bias).view(1, 4, 8)  # W2 (W1 0 + b1)
    torch.testing.assert_close(enc.uncond(1), expected)
    assert torch.count_nonzero(enc.uncond_input(3)) == 0


def test_class_encoder_null_class_and_label_dropout():
    enc = ClassEncoder(5, 4, 8, null_class=True)
    assert enc.in_features == 6
    assert enc.uncond_input(2)[:, 5].tolist() == [1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    x = enc.training_input(torch.zeros(1000, dtype=torch.long), 0.25, g)
    dropped = x[:, 5].mean().item()
    assert 0.2 < dropped < 0.3 and torch.all(x.sum(1) == 1)


@pytest.mark.parametrize("variant,params", [("paper", 4_286_026), ("standard", 269_722)])
def test_resnet20_parameter_counts_and_inputs(variant, params):
    m = resnet20(10, variant)
    assert sum(p.numel() for p in m.parameters()) == params  # paper: the released Keras model's trainable count
    m.eval()
    for size in (28, 32):
        assert m(torch.rand(2, 3, size, size)).shape == (2, 10)


def test_paper_resnet_shortcut_is_maxpool_and_zero_channels():
    m = resnet20(10, "paper")
    block = m.blocks[3]  # first block of stage 2: stride 2, 64 -> 128
    x = torch.randn(1, 64, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (1, 128, 4, 4)
    assert torch.count_nonzero(out[:, 64:]) == 0
    # TF 'same' max-pool 3x3 stride 2 on 8 px: pads (0, 1), windows start at 0, 2, 4, 6
    torch.testing.assert_close(out[0, :64, 0, 0], x[0, :, 0:3, 0:3].amax(dim=(1, 2)))
    torch.testing.assert_close(out[0, :64, 3, 3], x[0, :, 6:8, 6:8].amax(dim=(1, 2)))
    assert _same_pads(28, 3, 2) == (0, 1) and _same_pads(7, 3, 2) == (1, 1) and _same_pads(14, 3, 1) == (1, 1)


def test_resize_semantics_hand_computed():
    x = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).view(1, 1, 2, 2)
    up = resize_bilinear(x, 4)[0, 0]  # half-pixel centres, edges clamped (TensorFlow bilinear)
    expect = torch.tensor([[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]], dtype=torch.float32)
    torch.testing.assert_close(up, expect)
    y = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    down = resize_bilinear(y, 2)[0, 0]  # no antialiasing: each output samples between two pixels
    torch.testing.assert_close(down, torch.tensor([[2.5, 4.5], [10.5, 12.5]]))


def test_uint8_round_trip_through_model_range():
    img = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    x = uint8_to_model(img, 128)
    assert x.shape == (3, 3, 128, 128) and x.min() >= -1 and x.max() <= 1
    back = model_to_uint8(uint8_to_model(img, 28), 28).numpy()
    np.testing.assert_array_equal(back, img)
    assert upsample_uint8(img, 32).shape == (3, 32, 32, 3)


def test_tiny_models_and_posterior():
    pix = build_tiny("tiny", 16)
    assert pix.vae is None and pix.latent_shape == (3, 16, 16) and pix.cross_attention_dim == 32
    assert 1.5e6 < sum(p.numel() for p in pix.unet.parameters()) < 1.8e6
    lat = build_tiny("tiny-vae", 16)
    assert lat.latent_shape == (4, 8, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, logvar = lat.encode_posterior(x)
    assert mean.shape == (2, 4, 8, 8)
    z = lat.sample_latents(mean, logvar, torch.Generator().manual_seed(0))
    assert lat.decode(z).shape == (2, 3, 16, 16)
    m, lv = pix.encode_posterior(x)
    torch.testing.assert_close(pix.sample_latents(m, lv), x)  # pixel space: exact identity


def test_save_load_round_trip(tmp_path):
    for kind in ("tiny", "tiny-vae"):
        base = build_tiny(kind, 16, seed=3)
        save_base_model(base, tmp_path / kind)
        back = load_base_model(str(tmp_path / kind), resolution=99)
        assert back.resolution == 16 and (back.vae is None) == (kind == "tiny")
        for (k, a), (_, b) in zip(base.unet.state_dict().items(), back.unet.state_dict().items()):
            assert torch.equal(a, b), k
        cfg = json.loads((tmp_path / kind / "scheduler" / "scheduler_config.json").read_text())
        assert cfg["beta_schedule"] == "scaled_linear"


def test_missing_model_offline_gives_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RaysdError) as e:
        load_base_model("stabilityai/stable-diffusion-2-base", resolution=128)
    msg = str(e.value)
    assert "not available" in msg and "hf download stabilityai/stable-diffusion-2-base" in msg and "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaysdError, match="has no unet/config.json"):
        load_base_model(str(tmp_path / "empty"), resolution=128)


def test_paper_resnet_is_the_released_architecture():
    """Conv2D(use_bias=False), BatchNormalization(momentum=0.9, epsilon=1e-5), GlorotNormal Dense."""
    m = resnet20(10, "paper")
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)
    assert all(b.momentum == 0.1 and b.eps == 1e-5 for b in bns)  # torch's 0.1 weighs the batch: Keras' 0.9
    assert sum(b.running_mean.numel() + b.running_var.numel() for b in bns) == 5_504  # Keras' count_params extra
    w = torch.cat([resnet20(10, "paper").fc.weight.flatten() for _ in range(20)])
    std = (2 / (256 + 10)) ** 0.5  # GlorotNormal: truncated at 2 std, rescaled to this std
    assert abs(w.std().item() - std) < 0.05 * std and w.abs().max().item() <= 2 * std / 0.8796 + 1e-6


def test_v_prediction_target_and_its_noise_agree():
    from raysd.core.models.diffusion import NoiseSchedule

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    for kind in ("epsilon", "v_prediction"):
        s = NoiseSchedule(prediction_type=kind)
        abar = float(s.alphas_cumprod()[500])
        x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * eps
        out = s.target(x0, eps, torch.tensor(abar))
        torch.testing.assert_close(s.to_epsilon(out, x_t, abar), eps)  # a perfect UNet's output means that noise


def test_a_base_whose_scheduler_disagrees_with_the_run_is_refused(tmp_path):
    from raysd.core.models.diffusion import NoiseSchedule

    save_base_model(build_tiny("tiny", 16), tmp_path / "v", NoiseSchedule(prediction_type="v_prediction"))
    with pytest.raises(RaysdError, match="prediction_type=v_prediction.*--set model.prediction_type=v_prediction"):
        load_base_model(str(tmp_path / "v"), resolution=16, schedule=NoiseSchedule())
    base = load_base_model(str(tmp_path / "v"), resolution=16, schedule=NoiseSchedule(prediction_type="v_prediction"))
    assert base.scheduler_config["prediction_type"] == "v_prediction"
