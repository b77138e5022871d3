"""Stage: the privacy audit of the largest synthetic set (:mod:`raysd.core.audit`) on Ray.

Two classifiers, in Ray tasks, under the run's CAS protocol and seed: one trained on the real train
split (its features embed every image; its losses give the membership-inference baseline) and one
trained on the smallest scale's set. Then nearest-neighbour tasks over groups of the set's shards
(``audit.images_per_task`` images each; a task reads its own shards, checked against their SHA-256,
and the train split), one for the held-out test split and one for near-duplicates among the set's
first images. The driver only merges their arrays and draws the closest pairs.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from typing import Any

import numpy as np
import ray
import torch

from raysd.core import audit as core
from raysd.core.cas import CasTrainer, trainer_from_state
from raysd.data import storage
from raysd.run import sizing
from raysd.run.rundir import Run
from raysd.stages.cluster import connect
from raysd.stages.evaluate import (CasJob, SetSlice, _on_this_worker, _real, _task, classifier_options, read_slice,
                                   scaling_slices)

log = logging.getLogger("raysd")
PICTURE = "audit/closest_pairs.png"


def _classifier_task(job: CasJob, piece: SetSlice, train: SetSlice, val: tuple, test: tuple, embed: bool,
                     ) -> dict[str, Any]:
    """Train on ``piece`` (best weights on val); its losses on the real train split (members) and the
    test split (non-members); with ``embed``, its weights and the normalised features of the train split."""
    job = _on_this_worker(job)
    t0 = time.perf_counter()
    images, labels = read_slice(piece)
    tr = CasTrainer((images, labels), val, job.num_classes, cfg=job.cas, seed=job.seed, device=job.device,
                    precision=job.precision)
    while not tr.done:
        tr.train_epoch()
    tr.restore_best()
    real = (images, labels) if piece == train else read_slice(train)
    out = {"members": tr.losses(real), "nonmembers": tr.losses(test), "top1": tr.test(test).top1,
           "epochs": tr.epoch, "seconds": time.perf_counter() - t0}
    if embed:
        out["state"] = {k: v.cpu() for k, v in tr.model.state_dict().items()}
        out["train_features"] = core.normalised(tr.embed(real[0])).cpu()
    return out


def _neighbour_task(job: CasJob, pieces: list[SetSlice], train: SetSlice, state: dict[str, Any],
                    train_features: torch.Tensor, closest: int) -> dict[str, Any]:
    """Pixel and feature neighbours in the train split of every image of ``pieces``, and this group's
    ``closest`` pairs with their images."""
    job = _on_this_worker(job)
    t0 = time.perf_counter()
    images = np.concatenate([read_slice(p)[0] for p in pieces])
    train_images = read_slice(train)[0]
    px = core.neighbours(core.pixels(images, job.device), core.pixels(train_images, job.device))
    embedder = trainer_from_state(state, images[:1], job.num_classes, cfg=job.cas, device=job.device,
                                  precision=job.precision)
    feats = core.normalised(embedder.embed(images))
    fx = core.neighbours(feats, train_features.to(feats.device))
    pairs = [(d, images[i], train_images[j]) for i, j, d in core.closest_pairs(px, closest)]
    return {"pixel": px, "feature": fx, "pairs": pairs, "seconds": time.perf_counter() - t0}


def _duplicate_task(job: CasJob, pieces: list[SetSlice], train: SetSlice, limit: int) -> dict[str, np.ndarray]:
    """Each of the set's first ``limit`` images' distance to its nearest other image of them, and the
    same for as many of the real train split's images (the baseline)."""
    job = _on_this_worker(job)
    out = {}
    for name, images in (("synthetic", np.concatenate([read_slice(p)[0] for p in pieces])),
                         ("real", read_slice(train)[0])):
        out[name] = core.nearest_other(core.pixels(images[:limit], job.device))
    return out


def _groups(piece: SetSlice, per_task: int) -> list[list[SetSlice]]:
    """The set's shards in groups of about ``per_task`` images, each shard a whole SetSlice."""
    groups, rows = [[]], 0
    for shard in piece.shards:
        if rows and rows + shard[2] > per_task:
            groups.append([])
            rows = 0
        groups[-1].append(SetSlice(piece.set_dir, (shard,), piece.image_shape))
        rows += shard[2]
    return [g for g in groups if g]


class _Audit:
    """One audit's Ray work: what its tasks share, and how each kind is started."""

    def __init__(self, run: Run, set_dir: str, counts: dict[str, list[int]]):
        self.run, self.cfg, self.a = run, run.cfg, run.cfg.audit
        self.device = connect(self.cfg)
        val, test, self.num_classes = _real(run)
        self.val_ref, self.test_ref = ray.put(val), ray.put(test)
        self.held_out_rows = len(val[1]) + len(test[1])
        pieces = scaling_slices(run, set_dir, list(counts.values()))
        self.train, self.smallest, self.name = pieces[0], pieces[1], next(iter(counts))
        self.groups = _groups(SetSlice.whole(set_dir), self.a.images_per_task)
        self.side = max(self.train.image_shape[:2])
        self.cas = dataclasses.replace(self.cfg.cas, seeds=1)

    def task(self, fn: Any, parallel: int) -> tuple[Any, CasJob]:
        return _task(fn, self.cfg, self.device, parallel, self.num_classes, self.cas)

    def classifiers(self) -> tuple[Any, Any]:
        """The real-trained classifier (with its features) and the smallest scale's, started."""
        task, job = self.task(_classifier_task, 2)
        need = sizing.classifier_task(self.cfg, self.device, images=2 * self.run.num_train, side=self.side,
                                      held_out=self.held_out_rows)
        log.info("audit: %s; two classifiers (real train split and %s) under the %s protocol", need.describe(),
                 self.name, self.cas.protocol)
        opts = classifier_options(task, self.cfg, self.device, need)
        return (opts.remote(job, self.train, self.train, self.val_ref, self.test_ref, True),
                opts.remote(job, self.smallest, self.train, self.val_ref, self.test_ref, False))

    def neighbours(self, real: dict[str, Any]) -> tuple[Any, list[Any]]:
        """The held-out split's neighbour task and one per group of the set's shards, started."""
        task, job = self.task(_neighbour_task, len(self.groups) + 1)
        state_ref, feat_ref = ray.put(real["state"]), ray.put(real["train_features"])
        width = int(real["train_features"].shape[1])

        def start(group: list[SetSlice]) -> Any:
            rows = sum(r for p in group for _, _, r in p.shards)
            need = sizing.audit_task(self.device, train=self.run.num_train, queries=rows, side=self.side,
                                     features=width)
            return classifier_options(task, self.cfg, self.device, need).remote(
                job, group, self.train, state_ref, feat_ref, self.a.closest_pairs)

        return start([SetSlice.whole(self.run.split_dir("test"))]), [start(g) for g in self.groups]

    def duplicates(self) -> Any:
        """The near-duplicates task over the first N images of the set and of the train split (N: the
        smallest of audit.duplicate_images and their sizes), started."""
        task, job = self.task(_duplicate_task, len(self.groups) + 1)
        limit = min(self.a.duplicate_images, self.run.num_train)
        first, rows = [], 0
        for p in (p for g in self.groups for p in g):
            if rows < limit:
                first.append(p)
                rows += p.shards[0][2]
        limit = min(limit, rows)
        need = sizing.audit_task(self.device, train=self.run.num_train, queries=2 * limit, side=self.side, features=0)
        return classifier_options(task, self.cfg, self.device, need).remote(job, first, self.train, limit)

    def collect(self, refs: list[Any]) -> list[dict[str, Any]]:
        """The groups' results in order, a line with rate and ETA as each arrives."""
        parts, started = [], time.perf_counter()
        for done, ref in enumerate(refs, 1):
            parts.append(ray.get(ref))
            rate = sum(len(p["pixel"]["d1"]) for p in parts) / max(time.perf_counter() - started, 1e-9)
            left = sum(r for g in self.groups[done:] for p in g for _, _, r in p.shards)
            log.info("audit: nearest neighbours of %d of %d groups (%.0f img/s, about %.0f s left)", done,
                     len(self.groups), rate, left / max(rate, 1e-9))
        return parts


def audit_run(run: Run, set_dir: str, counts: dict[str, list[int]]) -> dict[str, Any]:
    """The audit stage's outputs (results.json's ``privacy``) and its picture under RUN/audit/."""
    t0 = time.perf_counter()
    au, a = _Audit(run, set_dir, counts), run.cfg.audit
    real_ref, syn_ref = au.classifiers()
    real = ray.get(real_ref)
    trained = time.perf_counter() - t0
    held_ref, refs = au.neighbours(real)
    dup_ref = au.duplicates()
    parts, held = au.collect(refs), ray.get(held_ref)
    merged = {space: {k: np.concatenate([p[space][k] for p in parts]) for k in ("d1", "d2", "index")}
              for space in ("pixel", "feature")}
    out: dict[str, Any] = {"set": set_dir, "images": int(len(merged["pixel"]["d1"])),
                           "held_out_images": int(len(held["pixel"]["d1"])), "train_images": run.num_train}
    for space in ("pixel", "feature"):
        out[space] = core.space_summary(merged[space], held[space], a.percentile)
    dup, threshold = ray.get(dup_ref), out["pixel"]["threshold"]
    out["duplicates"] = {"images": int(len(dup["synthetic"])),
                         **{("share" if k == "synthetic" else "real_share"): float(np.mean(d < threshold)) if len(d)
                            else 0.0 for k, d in dup.items()}}
    syn = ray.get(syn_ref)
    out["membership"] = {"real": core.membership(real["members"], real["nonmembers"], seed=run.cfg.seed),
                         au.name: core.membership(syn["members"], syn["nonmembers"], seed=run.cfg.seed),
                         "members": int(len(real["members"])), "nonmembers": int(len(real["nonmembers"]))}
    out["verdict"] = core.verdict(out["pixel"], a.allowed_share)
    pairs = sorted((p for part in parts for p in part["pairs"]), key=lambda p: p[0])[:a.closest_pairs]
    out["closest"] = [float(d) for d, _, _ in pairs]
    if pairs:
        storage.write_bytes(storage.join(run.root, PICTURE), _picture(pairs))
        out["picture"] = PICTURE
    out["seconds"] = {"classifiers": trained, "total": time.perf_counter() - t0}
    log.info("audit: %s: %.2f %% of %d synthetic images are closer to a training image than %g %% of held-out "
             "images (allowed %.2g %%); membership AUC real %.3f, %s %.3f", "FLAGGED" if out["verdict"]["flagged"]
             else "passed", 100 * out["verdict"]["share"], out["images"], a.percentile, 100 * a.allowed_share,
             out["membership"]["real"]["auc"], au.name, out["membership"][au.name]["auc"])
    return out


def _picture(pairs: list[tuple[float, np.ndarray, np.ndarray]]) -> bytes:
    """The closest synthetic (top row) and training (bottom row) images, their distance above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(pairs), figsize=(1.3 * len(pairs), 2.9), squeeze=False)
    for i, (d, syn, real) in enumerate(pairs):
        for row, img in enumerate((syn, real)):
            axes[row][i].imshow(img)
            axes[row][i].axis("off")
        axes[0][i].set_title(f"{d:.3f}", fontsize=8)
    axes[0][0].text(-0.1, 0.5, "synthetic", transform=axes[0][0].transAxes, rotation=90, ha="right", va="center")
    axes[1][0].text(-0.1, 0.5, "training", transform=axes[1][0].transAxes, rotation=90, ha="right", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
