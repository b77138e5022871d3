"""model.precision: one rule for generation, the classifier and diffusion training, on CUDA and on
CPUs with and without native bf16 (RAYSD_CPU_BF16 stands in for the CPU's answer)."""

import numpy as np
import pytest
import torch

from raysd.config import CasConfig
from raysd.core import precision as P
from raysd.core.cas import train_and_evaluate
from raysd.core.models import ClassEncoder
from raysd.core.models.diffusion import NoiseSchedule, build_tiny
from raysd.core.sampling import SamplerParams, generate
from raysd.data.sources import load_dataset

BF, F16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize("native", ["1", "0"])
def test_the_rule_for_every_precision_and_device(monkeypatch, native):
    monkeypatch.setenv("RAYSD_CPU_BF16", native)
    cpu_half = BF if native == "1" else None
    want = {  # (precision, device): (generation weights, classifier autocast, training autocast)
        ("auto", "cuda"): (BF, BF, BF), ("bf16", "cuda"): (BF, BF, BF), ("fp16", "cuda"): (F16, F16, F16),
        ("fp32", "cuda"): (torch.float32, None, None),
        ("auto", "cpu"): (cpu_half or torch.float32, cpu_half, None), ("bf16", "cpu"): (cpu_half or torch.float32,
                                                                                      cpu_half, None),
        ("fp16", "cpu"): (torch.float32, None, None), ("fp32", "cpu"): (torch.float32, None, None),
    }
    for (prec, dev), (gen, cls, train) in want.items():
        got = (P.weights_dtype(prec, dev), P.classifier_autocast(prec, dev), P.training_autocast(prec, dev))
        assert got == (gen, cls, train), (prec, dev, native)
    assert P.describe("auto", "cpu") == (f"generation {'bf16' if native == '1' else 'fp32'}, classifier "
                                         f"{'bf16' if native == '1' else 'fp32'}, training fp32 (cpu)")


def test_detection_is_what_onednn_reports(monkeypatch):
    monkeypatch.delenv("RAYSD_CPU_BF16", raising=False)
    assert P.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_bf16_sampling_on_the_cpu_stays_close_to_fp32():
    """The bf16 path runs on any CPU (emulated where not native) and draws the same images up to rounding."""
    base = build_tiny("tiny", 16, seed=1)
    base.unet.eval()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        enc = ClassEncoder(4, 4, base.cross_attention_dim, hidden_dim=16)
    labels, seeds = np.array([0, 1, 2, 3, 1, 2]), np.arange(6) + 100
    p, sched = SamplerParams(4, 2.0, "unipc"), NoiseSchedule()
    a = generate(base, enc, labels, seeds, p, sched, out_size=16, batch_size=6)
    base.to("cpu", torch.bfloat16)
    b = generate(base, enc.to(torch.bfloat16), labels, seeds, p, sched, out_size=16, batch_size=6)
    assert b.dtype == np.uint8 and b.shape == a.shape == (6, 16, 16, 3)
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.mean() < 4 and np.median(diff) <= 2, (diff.mean(), np.median(diff))


def test_bf16_classifier_on_the_cpu_learns_digits_as_fp32_does(monkeypatch):
    monkeypatch.setenv("RAYSD_CPU_BF16", "1")
    sp = load_dataset("digits").splits
    cfg = CasConfig(variant="standard", max_epochs=8, batch_size=128, image_size=16)
    res = {prec: train_and_evaluate(sp["train"], sp["val"], sp["test"], 10, cfg=cfg, seed=0, device="cpu",
                                    precision=prec).top1 for prec in ("fp32", "auto")}
    assert res["auto"] >= 0.9 and abs(res["auto"] - res["fp32"]) <= 0.03, res
