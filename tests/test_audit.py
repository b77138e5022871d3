"""The privacy audit: exact neighbours in blocks, membership AUC, and its controls: a positive one
(lightly noised training images served as the synthetic set) is flagged, a negative one (held-out
real images) is not, both in memory and through the audit stage on Ray with the run's classifiers."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raysd.core import audit
from raysd.data.sources import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").splits


def noised(images: np.ndarray, sd: float = 8.0, seed: int = 0) -> np.ndarray:
    """Training images with a light Gaussian noise (sd 8 of 255): near-copies a generator must not make."""
    rng = np.random.default_rng(seed)
    return np.clip(images.astype(np.float32) + rng.normal(0, sd, images.shape), 0, 255).astype(np.uint8)


def test_nearest_is_exact_in_blocks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, r = torch.rand(37, 20, generator=g), torch.rand(53, 20, generator=g)
    monkeypatch.setattr(audit, "BLOCK_ENTRIES", 60)  # one query per block
    d, i = audit.nearest(q, r, 2)
    want = torch.cdist(q, r)
    vals, idx = want.topk(2, dim=1, largest=False)
    torch.testing.assert_close(d, vals, atol=1e-5, rtol=1e-5)
    assert torch.equal(i, idx)
    ds, is_ = audit.nearest(r, r, 1, exclude_self=True)
    self_d = torch.cdist(r, r).fill_diagonal_(float("inf"))
    torch.testing.assert_close(ds[:, 0], self_d.min(1).values, atol=1e-5, rtol=1e-5)
    assert not (is_[:, 0] == torch.arange(53)).any()
    x = np.zeros((2, 4, 4, 3), np.uint8)
    x[1] = 255
    assert float(torch.cdist(audit.pixels(x[:1]), audit.pixels(x[1:]))) == pytest.approx(1.0)  # RMS in [0, 1]


def test_membership_auc():
    rng = np.random.default_rng(0)
    assert audit.membership_auc(rng.random(500) * 0.1, 1 + rng.random(500)) == 1.0
    same = audit.membership(rng.random(2000), rng.random(2000))
    assert abs(same["auc"] - 0.5) < 0.05 and same["interval"][0] < 0.5 < same["interval"][1]
    assert same["interval"][1] - same["interval"][0] < 0.1


def test_controls_in_memory(digits):
    tr, te, va = digits["train"].images, digits["test"].images, digits["val"].images
    pos = audit.audit_arrays(tr, te, noised(tr[:300]))
    assert pos["verdict"]["flagged"] and pos["pixel"]["share_closer"] > 0.9 and pos["pixel"]["memorised"] > 0.5
    assert pos["closest"][0][2] <= pos["closest"][-1][2] and pos["closest"][0][1] < 300
    neg = audit.audit_arrays(tr, te, va)
    assert not neg["verdict"]["flagged"] and neg["pixel"]["share_closer"] < 0.03 and neg["pixel"]["memorised"] < 0.03
    # a set that repeats itself has near-duplicates; one of distinct real images has none
    assert audit.audit_arrays(tr, te, np.concatenate([va[:50], noised(va[:50], seed=1)]))["duplicates"]["share"] == 1.0
    assert neg["duplicates"]["share"] < 0.05 and neg["duplicates"]["images"] == 360
    assert neg["duplicates"]["real_share"] == audit.audit_arrays(tr, te, tr[:360])["duplicates"]["share"]


def _run_with_set(root: Path, synthetic: np.ndarray, labels: np.ndarray):
    """A prepared digits run whose 'generated' set is ``synthetic`` (one shard per 200 images, in a
    plan's sample_id order), and its counts: what the audit stage reads."""
    from raysd.config import load_config
    from raysd.core.plan import interleave
    from raysd.data import imageset
    from raysd.run.rundir import Run
    from raysd.stages.prepare import ensure_prepared

    cfg = load_config("demo", overrides={"run_dir": str(root / "run"), "cas.max_epochs": 3,
                                         "resources.torch_threads": 1, "audit.images_per_task": 400})
    run = Run(cfg)
    run.save_config()
    ensure_prepared(run)
    counts = np.bincount(labels, minlength=10).tolist()
    order = interleave(counts)
    by_class = {c: list(np.flatnonzero(labels == c)) for c in range(10)}
    rows = np.array([by_class[c].pop(0) for c in order])
    set_dir = run.synthetic_dir("x1")
    files = {}
    for k, lo in enumerate(range(0, len(rows), 200)):
        ids = np.arange(lo, min(lo + 200, len(rows)))
        files[f"shard-{k:06d}.parquet"] = imageset.write_shard(set_dir, f"shard-{k:06d}.parquet", ids, order[ids],
                                                               synthetic[rows[ids]])
    imageset.write_meta(set_dir, imageset.set_meta(dataset="digits", split="synthetic", class_names=[str(i) for i in range(10)],
                                                   labels=order, image_shape=synthetic.shape[1:], files=files,
                                                   provenance={"shard_size": 200}))
    return run, set_dir, {"x1": counts}


@pytest.mark.ray
def test_the_audit_stage_flags_a_positive_control_and_passes_a_negative_one(digits, tmp_path, ray_session):
    from raysd.stages.audit import audit_run

    tr = digits["train"]
    run, set_dir, counts = _run_with_set(tmp_path / "positive", noised(tr.images), tr.labels)
    pos = audit_run(run, set_dir, counts)
    assert pos["verdict"]["flagged"] and pos["images"] == len(tr.labels) and pos["held_out_images"] == 359
    assert pos["pixel"]["share_closer"] > 0.9 and pos["pixel"]["held_out_share_closer"] <= 0.02
    assert pos["feature"]["share_closer"] > pos["feature"]["held_out_share_closer"]
    assert pos["duplicates"]["images"] == len(tr.labels) and pos["closest"] == sorted(pos["closest"])
    assert pos["duplicates"]["real_share"] < 0.05  # the real images' own near-duplicates: the baseline
    assert (Path(run.root) / pos["picture"]).stat().st_size > 0
    # the classifier trained on copies of the members tells them from non-members as the real one does
    x1, real = pos["membership"]["x1"], pos["membership"]["real"]
    assert x1["interval"][0] <= x1["auc"] <= x1["interval"][1] and x1["auc"] > 0.5
    assert real["interval"][0] <= real["auc"] <= real["interval"][1] and pos["membership"]["members"] == len(tr.labels)
    va = digits["val"]
    run, set_dir, counts = _run_with_set(tmp_path / "negative", va.images, va.labels)
    neg = audit_run(run, set_dir, counts)
    assert not neg["verdict"]["flagged"] and neg["images"] == 360 and neg["pixel"]["share_closer"] < 0.03
    json.dumps(neg)  # the stage's outputs go to the manifest as they are


def test_an_x10_set_of_400000_images_splits_into_tasks_that_fit_a_node():
    """CIFAR-10 x10 (400,000 images in 741 shards of 540, as the scaling stage writes it): the audit's
    neighbour tasks cover every shard once, in order, at most audit.images_per_task images each, and
    each asks for memory a node holds (the train split's 40,000 images as float32 pixels included)."""
    from raysd.run import sizing
    from raysd.stages.audit import _groups
    from raysd.stages.evaluate import SetSlice

    rows = [540] * 740 + [400_000 - 540 * 740]
    piece = SetSlice("s3://bucket/run/synthetic/x10", tuple((f"shard-{i:06d}.parquet", "sha", r)
                                                            for i, r in enumerate(rows)), (32, 32, 3))
    groups = _groups(piece, 20_000)
    assert [p.shards[0] for g in groups for p in g] == list(piece.shards)
    sizes = [sum(p.shards[0][2] for p in g) for g in groups]
    assert max(sizes) <= 20_000 and sum(sizes) == 400_000 and len(groups) == 21
    need = sizing.audit_task("cpu", train=40_000, queries=max(sizes), side=32, features=64)
    assert 1.5 * sizing.GB < need.host < 4 * sizing.GB
    gpu = sizing.audit_task("cuda", train=40_000, queries=max(sizes), side=32, features=256)
    assert gpu.gpu < 4 * sizing.GB and gpu.host > sizing.GB
