"""Every fast path is selectable and gives what the plain path gives (CPU, tiny models)."""

import numpy as np
import pytest
import torch

from raysd.core.cas import CasTrainer
from raysd.config import CasConfig
from raysd.core.generator import apply_fast_paths
from raysd.core.models import ClassEncoder
from raysd.core.models.diffusion import NoiseSchedule
from raysd.data.models import load_base_model
from raysd.core.sampling import SamplerParams, generate, sample_latents

PARAMS = SamplerParams(3, 2.0, "ddim")


def models(spec="tiny-vae", res=32):
    base = load_base_model(spec, resolution=res, dtype=torch.float32, device="cpu", seed=0)
    base.unet.eval()
    torch.manual_seed(1)
    enc = ClassEncoder(4, 4, base.cross_attention_dim).eval()
    return base, enc


def test_fused_qkv_gives_the_same_latents():
    plain, enc = models()
    fused, _ = models()
    apply_fast_paths(fused, compile=False, fuse_qkv=True)
    labels, seeds = torch.tensor([0, 1, 2, 3, 1]), np.arange(5)
    a = sample_latents(plain, enc, labels, seeds, PARAMS, NoiseSchedule())
    b = sample_latents(fused, enc, labels, seeds, PARAMS, NoiseSchedule())
    assert float((a - b).norm() / a.norm()) < 1e-5


def test_padding_the_last_batch_leaves_every_image_unchanged():
    base, enc = models("tiny", 16)
    labels, seeds = np.array([0, 1, 2, 3, 0, 1, 2]), np.arange(7)
    plain = generate(base, enc, labels, seeds, PARAMS, NoiseSchedule(), out_size=8, batch_size=4)
    padded = generate(base, enc, labels, seeds, PARAMS, NoiseSchedule(), out_size=8, batch_size=4, pad_to=4)
    assert padded.shape == plain.shape == (7, 8, 8, 3)
    assert np.abs(padded.astype(int) - plain.astype(int)).max() <= 1


def test_compiled_unet_and_decoder_match_eager():
    eager, enc = models()
    compiled, _ = models()
    apply_fast_paths(compiled, compile=True, fuse_qkv=False)
    labels, seeds = np.array([0, 1, 2, 3]), np.arange(4)
    a = generate(eager, enc, labels, seeds, PARAMS, NoiseSchedule(), out_size=8, batch_size=4)
    b = generate(compiled, enc, labels, seeds, PARAMS, NoiseSchedule(), out_size=8, batch_size=4, pad_to=4)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    la = sample_latents(eager, enc, torch.as_tensor(labels), seeds, PARAMS, NoiseSchedule())
    lb = sample_latents(compiled, enc, torch.as_tensor(labels), seeds, PARAMS, NoiseSchedule())
    assert float((la - lb).norm() / la.norm()) < 1e-4


# How far a compiled forward may move from the eager one on the same weights: both sum the same
# terms in other orders, each rounding at the unit roundoff u of the dtype the convolutions run in
# (fp32: 2^-24; bf16 autocast: 2^-8). Over the ResNet's ~20 layers of 144-576-term dot products
# that stays within 2^10 u of the largest logit in fp32 (measured 2^5 u here) and 2^4 u in bf16
# (measured 2^2 u; bf16 keeps fewer bits, so fewer of them can differ).
FORWARD_TOL = {None: 2.0**-14, torch.bfloat16: 2.0**-4}


def test_compiled_classifier_trains_like_the_eager_one():
    """The compiled forward computes what the eager one does (to the rounding of the dtype in use:
    fp32, or bf16 on a CPU with native bf16; RAYSD_CPU_BF16=0/1 picks either path) and shares its
    parameters, so the optimizer trains the weights it runs and the two trainers learn alike."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    y = np.arange(64) % 4
    trainers = []
    for compile_ in (False, True):
        cfg = CasConfig(variant="standard", max_epochs=2, batch_size=32, compile=compile_)
        trainers.append(CasTrainer((x, y), (x[:16], y[:16]), 4, cfg=cfg, seed=0, device="cpu"))
    eager, compiled = trainers
    tol = FORWARD_TOL[compiled.autocast_dtype]

    def gap(t):  # the compiled forward against the eager module, on the trainer's current weights
        t.model.eval()
        with torch.no_grad(), t._autocast():
            inputs = t._inputs(t.x)
            a, b = t.forward(inputs).float(), t.model(inputs).float()
        return float((a - b).abs().max() / b.abs().max())

    assert gap(compiled) <= tol  # same weights (same seed), same logits before any step
    losses = [[t.train_epoch()["train_loss"] for _ in range(2)] for t in trainers]
    assert gap(compiled) <= tol  # after training: the compiled forward runs the weights the optimizer moved
    (e1, e2), (c1, c2) = losses
    assert e2 < 0.8 * e1 and c2 < 0.8 * c1  # both learn
    # Adam's first steps are g / |g|: a last-bit difference in a near-zero gradient flips a whole
    # step, so the trajectories part by ~1e-3 within two epochs (fp32 and bf16 alike); a forward
    # that did not train (its own copy of the weights) stays ~70 % above the eager epoch-2 loss
    assert c2 == pytest.approx(e2, rel=2e-2)


def test_spec_records_the_fast_paths(tmp_path):
    from raysd.config import load_config
    from raysd.core.generator import GeneratorSpec

    cfg = load_config("demo", overrides={"sampling.compile": True, "sampling.fuse_qkv": True})
    assert cfg.sampling.compile and cfg.sampling.fuse_qkv
    spec = GeneratorSpec("tiny", 16, "e", None, (8, 8), 3, 2.0, compile=True)
    assert spec.to_dict()["compile"] is True  # a set made with other fast paths is another set


def test_tiny_decoder_option_decodes_to_images_and_fails_clearly_when_missing(tmp_path, monkeypatch):
    from raysd.errors import RaysdError
    from raysd.data.models import load_tiny_decoder

    base, enc = models()
    tae = load_tiny_decoder("random:taesd", latent_channels=base.vae.config.latent_channels)
    tae.save_pretrained(tmp_path / "taesd")  # and back, as a user's local directory
    base.tiny_decoder = load_tiny_decoder(str(tmp_path / "taesd"), latent_channels=base.vae.config.latent_channels)
    images = generate(base, enc, np.array([0, 1, 2]), np.arange(3), PARAMS, NoiseSchedule(), out_size=8, batch_size=4)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RaysdError, match="tiny decoder 'madebyollin/taesd' is not available"):
        load_tiny_decoder("madebyollin/taesd", latent_channels=4)
    with pytest.raises(RaysdError, match="latent channels"):
        load_tiny_decoder(str(tmp_path / "taesd"), latent_channels=16)
