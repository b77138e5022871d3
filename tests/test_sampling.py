"""The guided sampler: step lists, per-sample determinism, exact shortcuts, schedulers."""

import numpy as np
import pytest
import torch

from raysd.core.models import ClassEncoder
from raysd.core.models.diffusion import NoiseSchedule, build_tiny
from raysd.core.sampling import SamplerParams, generate, sample_latents
from raysd.core.schedulers import ddim_timesteps
from raysd.core.seeds import derive_seed as sample_seed

SCHED = NoiseSchedule()


@pytest.fixture(scope="module")
def tiny():
    base = build_tiny("tiny", 16, seed=1).to("cpu")
    base.unet.eval()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        enc = ClassEncoder(4, 4, base.cross_attention_dim, hidden_dim=16)
    return base, enc


def test_ddim_timesteps_follow_the_released_code():
    s50 = ddim_timesteps(50)
    assert len(s50) == 50 and s50[0] == 981 and s50[-1] == 1 and s50 == list(range(1, 1000, 20))[::-1]
    s31 = ddim_timesteps(31)
    assert len(s31) == 32 and s31[0] == 993  # 1000 // 31 = 32: IS=31 runs 32 steps
    assert ddim_timesteps(1) == [1]
    with pytest.raises(ValueError):
        ddim_timesteps(0)


def test_sample_seeds_are_distinct_and_stable():
    seeds = [sample_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and seeds[5] == sample_seed(0, 5) != sample_seed(1, 5)
    assert all(0 <= s < 2**63 for s in seeds)


def test_same_sample_id_same_image_whatever_the_batch(tiny):
    base, enc = tiny
    labels = np.array([0, 1, 2, 3, 0, 1, 2])
    seeds = [sample_seed(7, i) for i in range(7)]
    p = SamplerParams(5, 2.0)
    whole = sample_latents(base, enc, torch.tensor(labels), seeds, p, SCHED)
    part = sample_latents(base, enc, torch.tensor(labels[3:5]), seeds[3:5], p, SCHED)
    torch.testing.assert_close(part, whole[3:5], atol=1e-5, rtol=1e-5)
    a = generate(base, enc, labels, seeds, p, SCHED, out_size=32, batch_size=7)
    b = generate(base, enc, labels, seeds, p, SCHED, out_size=32, batch_size=2)
    assert a.shape == (7, 32, 32, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # rounding of fp noise at most


@pytest.mark.parametrize("ugs", [0.0, 1.0])
def test_exact_guidance_shortcuts_match_both_branches(tiny, ugs):
    base, enc = tiny
    labels, seeds = torch.tensor([0, 3, 1]), [11, 12, 13]
    p = SamplerParams(4, ugs)
    fast = sample_latents(base, enc, labels, seeds, p, SCHED, shortcuts=True)
    plain = sample_latents(base, enc, labels, seeds, p, SCHED, shortcuts=False)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)


def test_guidance_changes_the_result(tiny):
    base, enc = tiny
    labels, seeds = torch.tensor([0, 1]), [1, 2]
    a = sample_latents(base, enc, labels, seeds, SamplerParams(3, 1.0), SCHED)
    b = sample_latents(base, enc, labels, seeds, SamplerParams(3, 5.0), SCHED)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp", "unipc"])
def test_every_scheduler_samples_end_to_end(tiny, scheduler):
    base, enc = tiny
    imgs = generate(base, enc, np.array([0, 1, 2]), [1, 2, 3], SamplerParams(6, 2.0, scheduler), SCHED, out_size=28)
    assert imgs.shape == (3, 28, 28, 3) and imgs.dtype == np.uint8 and imgs.std() > 0


def test_latent_model_decodes_to_pixels():
    base = build_tiny("tiny-vae", 16)
    enc = ClassEncoder(3, 4, base.cross_attention_dim, hidden_dim=8)
    imgs = generate(base, enc, np.array([0, 2]), [5, 6], SamplerParams(3, 1.5), SCHED, out_size=32)
    assert imgs.shape == (2, 32, 32, 3)


def test_bad_sampler_inputs(tiny):
    base, enc = tiny
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        generate(base, enc, np.array([4]), [1], SamplerParams(2, 1.0), SCHED, out_size=16)
    with pytest.raises(ValueError, match="2 labels but 1 seeds"):
        generate(base, enc, np.array([0, 1]), [1], SamplerParams(2, 1.0), SCHED, out_size=16)
