"""A privacy audit of a synthetic set against the real data it was made from (Ray-free).

The field's cheap checks, each beside the same number for real images the generator never saw
(the held-out baseline: the real test split against the train split):

- distance to the closest record: each synthetic image's distance to its nearest real training
  image, in pixel space (root-mean-square difference of the [0, 1] values, so 0.01 is one percent
  of the range on average) and in the feature space of a real-trained classifier (its pooled
  penultimate layer, L2-normalised);
- the memorisation ratio: nearest / second-nearest training distance, below 1/3 counted as a
  memorised image (``sail-sg/DiffMemorize``);
- near-duplicates inside the synthetic set: images whose nearest other synthetic image is closer
  than the held-out threshold, beside the same share among as many real training images;
- the membership-inference AUC of a loss threshold (members: the train split; non-members: the
  test split) of a classifier trained on real data and of one trained on synthetic data.

The verdict's rule: a synthetic image is a near-copy when its pixel distance to its nearest
training image is below the ``percentile``-th percentile of the held-out images' distances (by
construction ``percentile`` % of held-out images are); the set is flagged when the share of
near-copies exceeds ``allowed_share``.

Nearest neighbours are exact, by blocked matrix products in torch (``|a|^2 + |b|^2 - 2ab`` over
blocks of at most ``BLOCK_ENTRIES`` distances, on the GPU when there is one): no new dependency,
no approximation to argue about, and CIFAR x10 against its train split is 400k x 40k x 3072
multiply-adds (4.9e13: seconds of matrix products on one GPU; the audit stage spreads the set's
shards over the cluster).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BLOCK_ENTRIES = 1 << 25  # distances held at once per block (128 MB in fp32)
MEMORISED_RATIO = 1 / 3


def pixels(images: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, D) scaled so that a Euclidean distance is the RMS difference in [0, 1]."""
    x = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
    x = x.to(device).reshape(len(x), -1).float()
    return x / (255.0 * float(np.sqrt(x.shape[1])))


def normalised(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=1)


def nearest(queries: torch.Tensor, refs: torch.Tensor, k: int = 2, *, exclude_self: bool = False,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances (N, k), indices (N, k)) of each query's k nearest rows of ``refs``, exact, in blocks.
    ``exclude_self``: queries and refs are the same rows; a row is not its own neighbour."""
    k = min(k, len(refs) - (1 if exclude_self else 0))
    ref_sq = (refs * refs).sum(1)
    step = max(1, BLOCK_ENTRIES // max(1, len(refs)))
    dists, idxs = [], []
    for lo in range(0, len(queries), step):
        q = queries[lo : lo + step]
        d2 = (q * q).sum(1, keepdim=True) + ref_sq[None, :] - 2.0 * (q @ refs.T)
        if exclude_self:
            rows = torch.arange(len(q), device=q.device)
            d2[rows, rows + lo] = float("inf")
        vals, idx = d2.topk(k, dim=1, largest=False)
        dists.append(vals.clamp_min_(0).sqrt_())
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def neighbours(queries: torch.Tensor, refs: torch.Tensor) -> dict[str, np.ndarray]:
    """Nearest and second-nearest distances and the nearest's index, as numpy (one space)."""
    d, i = nearest(queries, refs, 2)
    return {"d1": d[:, 0].cpu().numpy(), "d2": d[:, 1].cpu().numpy(), "index": i[:, 0].cpu().numpy()}


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """AUC of telling members from non-members by a loss threshold (lower loss: member); 0.5: no leak."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
    return float(roc_auc_score(labels, -np.r_[member_losses, nonmember_losses]))


def membership(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, seed: int = 0, b: int = 200,
               ) -> dict[str, Any]:
    """The membership AUC with its 95 % bootstrap interval (members and non-members resampled apart)."""
    rng = np.random.default_rng(seed)
    m, n = np.asarray(member_losses), np.asarray(nonmember_losses)
    boots = [membership_auc(m[rng.integers(0, len(m), len(m))], n[rng.integers(0, len(n), len(n))]) for _ in range(b)]
    return {"auc": membership_auc(m, n), "interval": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}


def _quantiles(d: np.ndarray) -> dict[str, float]:
    return {"p1": float(np.percentile(d, 1)), "p5": float(np.percentile(d, 5)), "median": float(np.median(d))}


def space_summary(synthetic: dict[str, np.ndarray], held_out: dict[str, np.ndarray], percentile: float,
                  ) -> dict[str, Any]:
    """One space's distances to the closest training image: the synthetic set's and the held-out
    baseline's quantiles, the threshold (the held-out ``percentile``) and the shares below it, and the
    memorisation ratio's share below 1/3 for both."""
    threshold = float(np.percentile(held_out["d1"], percentile))

    def memorised(n: dict[str, np.ndarray]) -> float:
        return float(np.mean(n["d1"] < MEMORISED_RATIO * np.maximum(n["d2"], 1e-12)))

    return {"threshold": threshold, "percentile": percentile,
            "synthetic": _quantiles(synthetic["d1"]), "held_out": _quantiles(held_out["d1"]),
            "share_closer": float(np.mean(synthetic["d1"] < threshold)),
            "held_out_share_closer": float(np.mean(held_out["d1"] < threshold)),
            "memorised": memorised(synthetic), "held_out_memorised": memorised(held_out)}


def nearest_other(queries: torch.Tensor) -> np.ndarray:
    """Each image's distance to its nearest other image of the same set (empty for fewer than two)."""
    if len(queries) < 2:
        return np.zeros(0, np.float32)
    return nearest(queries, queries, 1, exclude_self=True)[0][:, 0].cpu().numpy()


def duplicates(queries: torch.Tensor, threshold: float) -> float:
    """Share of images whose nearest other image of the same set is closer than ``threshold``."""
    d = nearest_other(queries)
    return float(np.mean(d < threshold)) if len(d) else 0.0


def verdict(pixel: dict[str, Any], allowed_share: float) -> dict[str, Any]:
    """The stated rule applied: flagged when more than ``allowed_share`` of the synthetic images are
    closer (in pixels) to a training image than the held-out percentile."""
    share = pixel["share_closer"]
    rule = (f"flagged when more than {100 * allowed_share:g} % of the synthetic images are closer (pixel RMS) to a "
            f"training image than {pixel['percentile']:g} % of held-out real images are (threshold "
            f"{pixel['threshold']:.4f})")
    return {"flagged": bool(share > allowed_share), "share": share, "allowed_share": allowed_share, "rule": rule}


def closest_pairs(pixel_neighbours: dict[str, np.ndarray], n: int) -> list[tuple[int, int, float]]:
    """(synthetic row, training row, distance) of the ``n`` closest pairs, closest first."""
    order = np.argsort(pixel_neighbours["d1"], kind="stable")[:n]
    return [(int(i), int(pixel_neighbours["index"][i]), float(pixel_neighbours["d1"][i])) for i in order]


def audit_arrays(train: np.ndarray, held_out: np.ndarray, synthetic: np.ndarray, *, percentile: float = 1.0,
                 allowed_share: float = 0.05, embed: Any = None, duplicate_images: int = 5000,
                 device: str = "cpu") -> dict[str, Any]:
    """The whole audit of in-memory uint8 (N, H, W, 3) arrays (the audit stage does the same over a
    cluster): pixel and, with ``embed`` (images -> features), feature space; near-duplicates among
    the first ``duplicate_images`` synthetic images; the verdict."""
    ref = pixels(train, device)
    syn_px, held_px = neighbours(pixels(synthetic, device), ref), neighbours(pixels(held_out, device), ref)
    out: dict[str, Any] = {"pixel": space_summary(syn_px, held_px, percentile)}
    if embed is not None:
        fref = normalised(embed(train))
        out["feature"] = space_summary(neighbours(normalised(embed(synthetic)), fref),
                                       neighbours(normalised(embed(held_out)), fref), percentile)
    n = min(len(synthetic), len(train), duplicate_images)
    out["duplicates"] = {"images": n, "share": duplicates(pixels(synthetic[:n], device), out["pixel"]["threshold"]),
                         "real_share": duplicates(pixels(train[:n], device), out["pixel"]["threshold"])}
    out["verdict"] = verdict(out["pixel"], allowed_share)
    out["closest"] = closest_pairs(syn_px, 8)
    return out
