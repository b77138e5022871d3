"""The Ray-free diffusion trainer on the CPU: which module trains, determinism, resumption."""

import copy

import pytest
import torch

from raysd.config import TrainStepConfig
from raysd.core.diffusion_trainer import DiffusionTrainer, TrainData, TrainerConfig, pca_context_projection
from raysd.core.models import ClassEncoder
from raysd.core.models.diffusion import NoiseSchedule, build_tiny
from raysd.data.checkpoints import module_digest

STEP = TrainStepConfig(epochs=2, global_batch_size=8, lr=1e-2, steps_per_epoch=3)


def setup(kind: str, seed: int = 0):
    base = build_tiny("tiny", 16, seed=1)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        enc = ClassEncoder(3, 4, base.cross_attention_dim, hidden_dim=8)
    g = torch.Generator().manual_seed(3)
    data = TrainData(labels=torch.arange(24) % 3, mean=torch.rand(24, 3, 16, 16, generator=g) * 2 - 1, logvar=None)
    cfg = TrainerConfig(kind=kind, step=STEP, schedule=NoiseSchedule(), seed=seed)
    return base, enc, data, cfg


def test_step_1_trains_only_the_class_encoder_and_step_3_only_the_unet():
    for kind in ("encoder", "unet"):
        base, enc, data, cfg = setup(kind)
        unet0, enc0 = module_digest(base.unet), module_digest(enc)
        t = DiffusionTrainer(cfg, unet=base.unet, encoder=enc, data=data, device=torch.device("cpu"))
        stats = t.run_epoch(1)
        assert stats["images"] == 3 * 8 and t.step == 3 and stats["loss"] > 0
        moved = {"unet": module_digest(base.unet) != unet0, "encoder": module_digest(enc) != enc0}
        assert moved == {"unet": kind == "unet", "encoder": kind == "encoder"}, kind


def test_resuming_after_an_epoch_equals_training_straight_through():
    base, enc, data, cfg = setup("encoder")
    straight = DiffusionTrainer(cfg, unet=base.unet, encoder=enc, data=data, device=torch.device("cpu"))
    straight.run_epoch(1)
    saved = (copy.deepcopy(straight.trainable.state_dict()), copy.deepcopy(straight.opt.state_dict()),
             straight.resume_state())
    straight.run_epoch(2)

    base2, enc2, data2, cfg2 = setup("encoder")
    resumed = DiffusionTrainer(cfg2, unet=base2.unet, encoder=enc2, data=data2, device=torch.device("cpu"))
    resumed.trainable.load_state_dict(saved[0])
    resumed.load_resume(saved[1], copy.deepcopy(saved[2]))
    resumed.run_epoch(2)
    for k, v in straight.trainable.state_dict().items():
        torch.testing.assert_close(resumed.trainable.state_dict()[k], v, msg=k)
    assert resumed.opt.param_groups[0]["lr"] == straight.opt.param_groups[0]["lr"]


def test_pretraining_reads_a_label_free_caption_context():
    base, _, data, _ = setup("pretrain")
    data.captions = pca_context_projection(data.mean, 4, base.cross_attention_dim, seed=0)
    cfg = TrainerConfig(kind="pretrain", step=STEP, schedule=NoiseSchedule(), seed=0)
    t = DiffusionTrainer(cfg, unet=base.unet, encoder=None, data=data, device=torch.device("cpu"))
    ctx = t._context(torch.tensor([0, 1]), None)
    assert ctx.shape == (2, 4, base.cross_attention_dim) and not torch.allclose(ctx[0], ctx[1])
    before = module_digest(base.unet)
    t.run_epoch(1)
    assert module_digest(base.unet) != before


def test_eight_ranks_split_23_images_at_batch_16_exactly_as_one_process():
    """Data parallelism without Ray: 8 simulated ranks each take their share of a global batch (16
    images, then the 7 left: rank 7 gets none) and their gradients are averaged as DDP does; the
    loss (the ranks' squared-error sums over their terms) and the gradient equal one process's."""
    step = TrainStepConfig(epochs=1, global_batch_size=16, lr=1e-2)
    base, enc, data, _ = setup("unet")
    data = TrainData(labels=data.labels[:23], mean=data.mean[:23], logvar=None)

    def trainer(rank: int, world: int) -> DiffusionTrainer:
        cfg = TrainerConfig(kind="unet", step=step, schedule=NoiseSchedule(), seed=0, rank=rank, world=world)
        return DiffusionTrainer(cfg, unet=copy.deepcopy(base.unet), encoder=copy.deepcopy(enc), data=data,
                                device=torch.device("cpu"))

    one, ranks = trainer(0, 1), [trainer(r, 8) for r in range(8)]
    order = one.epoch_order(1)
    for batch in (order[:16], order[16:]):  # the epoch's two steps
        loss, _, _, mean = one.step_terms(batch, torch.Generator().manual_seed(5))
        one.opt.zero_grad()
        loss.backward()
        squared, terms, grads = 0.0, 0, None
        for t in ranks:
            part, sq, n, local = t.step_terms(batch, torch.Generator().manual_seed(5))  # every rank draws the same
            assert local == local  # no NaN, also for the empty share
            t.opt.zero_grad()
            part.backward()
            g = [p.grad / 8 for p in t.params]  # DDP averages the ranks' gradients
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            squared, terms = squared + sq, terms + n
        assert terms == len(batch) * data.mean[0].numel()
        assert squared / terms == pytest.approx(mean, rel=1e-5)
        for p, g in zip(one.params, grads):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)
