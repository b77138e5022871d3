"""What a run leaves behind and holds on to: optimizer states cut short before their record, a
sampling batch that ran out of CUDA memory, generators cached per process, classifiers started
while the generation still needs the accelerators."""

import numpy as np
import pytest
import torch

from raysd.core import sampling
from raysd.core.models import ClassEncoder
from raysd.core.models.diffusion import NoiseSchedule, build_tiny
from raysd.data import checkpoints as ck


def test_an_optimizer_state_cut_short_before_its_record_is_removed(tmp_path):
    root = str(tmp_path / "unet")
    opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 0.1}]}
    half = tmp_path / "unet" / "resume" / "epoch_001"  # a kill while writing epoch 1's state: no resume.json
    half.mkdir(parents=True)
    (half / ck.OPT_FILE).write_bytes(b"x" * 1000)
    ck.write_resume(root, 2, optimizer_state=opt, extra={}, weights_sha="s2")
    ck.write_resume(root, 3, optimizer_state=opt, extra={}, weights_sha="s3")
    left = sorted(p.name for p in (tmp_path / "unet" / "resume").iterdir())
    assert left == ["epoch_002", "epoch_003"]  # the newest two complete ones; the unrecorded one is gone


def test_a_batch_that_ran_out_of_cuda_memory_stays_split(monkeypatch):
    base = build_tiny("tiny", 16, seed=1)
    base.unet.eval()
    torch.manual_seed(0)
    enc = ClassEncoder(4, 4, base.cross_attention_dim, hidden_dim=8).eval()
    real, calls = sampling.sample_latents, []

    def limited(base_, enc_, labels, *a, **k):  # a card that holds 4 samples at a time
        calls.append(len(labels))
        if len(labels) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(base_, enc_, labels, *a, **k)

    monkeypatch.setattr(sampling, "sample_latents", limited)
    params = sampling.SamplerParams(2, 1.5, "ddim")
    labels, seeds = np.arange(24) % 4, np.arange(24)
    a = sampling.generate(base, enc, labels, seeds, params, NoiseSchedule(), out_size=8, batch_size=8)
    assert calls.count(8) == 1 and calls[1:] == [4] * 6  # one failure, then batches of 4
    calls.clear()
    b = sampling.generate(base, enc, labels, seeds, params, NoiseSchedule(), out_size=8, batch_size=8)
    assert calls == [4] * 6  # the next call on this model (the next shard) starts at 4
    np.testing.assert_array_equal(a, b)


def test_one_generator_is_cached_per_process(tmp_path):
    from raysd.data.models import _load_models

    _load_models.cache_clear()
    assert _load_models.cache_info().maxsize == 1


@pytest.mark.parametrize("have, actors, pool, room", [(4, None, None, 0), (8, 4, None, 4), (2, None, 4, 0)])
def test_classifiers_wait_while_every_accelerator_generates(monkeypatch, have, actors, pool, room):
    from raysd.config import load_config
    from raysd.stages import cluster, evaluate

    cfg = load_config("demo", overrides={"resources.generation_actors": actors, "resources.max_gpus": pool})
    monkeypatch.setattr(cluster, "accelerators", lambda c: float(have))
    assert evaluate.early_room(cfg, "cuda") == room
    assert evaluate.early_room(cfg, "cpu") is None
