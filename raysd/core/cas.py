"""Classification Accuracy Score: ResNet20 trained on one set, tested on the real test split.

The paper's protocol (its released Keras code): inputs in [0, 1] at native resolution, Adam
(lr 1e-3, eps 1e-7), cross-entropy with label smoothing 0.1, batch 256, at most 100 epochs,
ReduceLROnPlateau on val accuracy (factor 0.1, patience 10, min lr 1e-5, min delta 1e-4),
early stopping on val accuracy (patience 25) restoring the best weights, no augmentation. Both
callbacks count as Keras does: they fire when ``wait >= patience`` (torch's ReduceLROnPlateau
fires one epoch later, when ``num_bad_epochs > patience``).

The whole training set lives on the device as uint8 (N, 3, H, W); a batch is an index slice of
a seeded ``randperm`` (no DataLoader, no per-sample Python). On CUDA and on CPUs with native
bf16: bf16 autocast (:mod:`raysd.core.precision`; ``precision="fp32"`` keeps the released fp32
numerics); channels-last. :class:`CasTrainer` runs one epoch at a time and has a
``state_dict`` so a Tune trial can pause and resume; :func:`train_and_evaluate` is the whole
protocol in one call.

``cas.protocol=strong`` is a standard recipe for small images beside the paper's: He et al.'s
ResNet20 (0.27 M parameters), random crops (reflect padding of 1/8 of the side: 4 px at 32) and
horizontal flips, SGD with Nesterov momentum 0.9 and weight decay 5e-4, batch 128 with a peak LR of
``cas.strong_lr`` (0.1) scaled linearly with the batch, a one-cycle schedule (linear warm-up over
the first 20 % of the steps from a tenth of the peak, then linear decay to 0) over
``cas.strong_epochs`` (30), label smoothing as the paper's, no early stopping; the best-val
weights are scored, as under the paper's protocol.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from raysd.config import CasConfig
from raysd.errors import RaysdError
from raysd.core.models.resnet import resnet20
from raysd.core.metrics import balanced_accuracy, split_metrics
from raysd.core.precision import classifier_autocast
from raysd.core.strong import (STRONG_BATCH, STRONG_MOMENTUM, STRONG_WEIGHT_DECAY, crop_and_flip,
                               one_cycle)



@dataclass
class SplitScores:
    """A classifier's scores on a test split."""

    top1: float
    top5: float  # top-min(5, C)
    per_class_accuracy: list[float]
    confusion: list[list[int]]  # rows: true class, cols: predicted
    # balanced_accuracy, macro_f1, auc and the bootstrap interval (raysd.core.metrics.split_metrics)
    metrics: dict[str, Any] = field(default_factory=dict)
    predictions: list[int] = field(default_factory=list)  # per test image, in the split's order (paired tests)


@dataclass
class CasResult:
    top1: float  # on the test set, with the best-val weights
    top5: float  # top-min(5, C)
    best_epoch: int  # 1-based epoch of the best val accuracy
    epochs_run: int
    seconds: float
    best_val_top1: float
    num_train: int
    per_class_accuracy: list[float] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)  # rows: true class, cols: predicted
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # as SplitScores.metrics
    predictions: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_arrays(data: Any, where: str) -> tuple[Any, Any]:
    """(images uint8 NHWC, labels int64), numpy or torch, from a tuple, an ImageSet or a Split.

    Torch tensors stay where they are (e.g. a set streamed straight onto the GPU)."""
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif hasattr(data, "images") and hasattr(data, "labels"):
        x, y = data.images, data.labels
    else:
        raise RaysdError(f"cas: {where} must be (images, labels) or an image set; got {type(data).__name__}")
    if torch.is_tensor(x):
        y = torch.as_tensor(y, device=x.device).reshape(-1).long()
        ok = x.dtype == torch.uint8
    else:
        x, y = np.asarray(x), np.asarray(y).reshape(-1).astype(np.int64)
        ok = x.dtype == np.uint8
    if x.ndim != 4 or x.shape[-1] != 3 or not ok:
        raise RaysdError(f"cas: {where} images must be uint8 (N, H, W, 3); got {x.dtype} {tuple(x.shape)}")
    if len(x) != len(y) or len(x) == 0:
        raise RaysdError(f"cas: {where} has {len(x)} images and {len(y)} labels (must be equal and > 0)")
    return x, y


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class KerasPlateau:
    """Keras' ReduceLROnPlateau on a maximised metric (min_delta 1e-4, cooldown 0): after
    ``patience`` epochs without an improvement (``wait >= patience``) the LR is multiplied by
    ``factor``, not below ``min_lr``, and the count starts again."""

    factor: float
    patience: int
    min_lr: float
    min_delta: float = 1e-4
    best: float = float("-inf")
    wait: int = 0

    def step(self, value: float, opt: torch.optim.Optimizer) -> bool:
        """Record one epoch's value; True when it lowered the LR."""
        if value > self.best + self.min_delta:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        lr = opt.param_groups[0]["lr"]
        if self.wait >= self.patience and lr > np.float32(self.min_lr):  # Keras compares in float32
            for group in opt.param_groups:
                group["lr"] = max(lr * self.factor, self.min_lr)
            self.wait = 0
            return True
        return False


class CasTrainer:
    """ResNet20 on device-resident uint8 data, one epoch per :meth:`train_epoch` call, under the
    paper's protocol or the strong one (``cfg.protocol``)."""

    def __init__(self, train: Any, val: Any, num_classes: int, *, cfg: CasConfig | None = None, seed: int = 0,
                 device: torch.device | str | None = None, precision: str = "auto", test: Any = None,
                 monitor: str = "top1"):
        """``test``: also score each new best-val model on it (``best_test``), as the released search did.
        ``monitor``: the validation metric the callbacks watch and ``best_val`` holds (``top1``, the
        paper's, or ``balanced_accuracy`` for imbalanced data); ``best_test`` is the same metric."""
        self.cfg = cfg or CasConfig()
        self.monitor = monitor
        self.device = torch.device(device) if device is not None else default_device()
        self.num_classes = num_classes
        xt, yt = as_arrays(train, "train")
        xv, yv = as_arrays(val, "val")
        for name, y in (("train", yt), ("val", yv)):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise RaysdError(f"cas: {name} labels must lie in 0..{num_classes - 1}; found {lo}..{hi}")
        self.x, self.y = self._to_device(xt, yt)
        self.strong = self.cfg.protocol == "strong"
        bs = STRONG_BATCH if self.strong else self.cfg.batch_size
        if self.cfg.min_steps_per_epoch:
            bs = max(1, min(bs, len(yt) // self.cfg.min_steps_per_epoch))
        self.batch_size = bs
        self.xv, self.yv = self._to_device(xv, yv)
        self.xs, self.ys = self._to_device(*as_arrays(test, "test")) if test is not None else (None, None)
        self.autocast_dtype = classifier_autocast(precision, self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = resnet20(num_classes, "standard" if self.strong else self.cfg.variant)
        # channels-last on every device: measured +22 % on a 2-core CPU for the standard ResNet20
        self.model = model.to(self.device, memory_format=torch.channels_last)
        # the compiled forward shares the model's parameters; state_dict() stays the plain model's
        self.forward = torch.compile(self.model) if self.cfg.compile else self.model
        if self.strong:
            self.peak_lr = self.cfg.strong_lr * bs / STRONG_BATCH
            self.total_steps = self.cfg.strong_epochs * -(-len(self.y) // bs)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=one_cycle(0, self.total_steps, self.peak_lr),
                                       momentum=STRONG_MOMENTUM, nesterov=True, weight_decay=STRONG_WEIGHT_DECAY)
        else:
            self.opt = torch.optim.Adam(self.model.parameters(), lr=self.cfg.lr, eps=self.cfg.eps)
        self.step = 0  # optimizer steps taken (the strong protocol's schedule)
        self.plateau = KerasPlateau(self.cfg.plateau_factor, self.cfg.plateau_patience, self.cfg.min_lr)
        self.gen = torch.Generator("cpu").manual_seed(seed)
        self.epoch = 0
        self.best_val = -1.0
        self.best_epoch = 0
        self.wait = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_test: float | None = None  # test accuracy of the best-val weights, when ``test`` was given
        self.history: list[dict[str, float]] = []

    def _to_device(self, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep images NHWC uint8 on the device (a batch is permuted when it is used)."""
        # np.require copies read-only arrays (Ray's object store hands those out)
        xt = x if torch.is_tensor(x) else torch.from_numpy(np.require(x, requirements=["C", "W"]))
        yt = y if torch.is_tensor(y) else torch.from_numpy(np.require(y, requirements=["C", "W"]))
        return xt.to(self.device), yt.to(self.device)

    def _inputs(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1], channels-last (the NHWC layout as is),
        area-resized to ``cfg.image_size`` when set."""
        x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        size = self.cfg.image_size
        if size and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="area").contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    @property
    def done(self) -> bool:
        if self.strong:
            return self.epoch >= self.cfg.strong_epochs
        return self.epoch >= self.cfg.max_epochs or self.wait >= self.cfg.early_stopping_patience

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set, then val accuracy; updates LR and early stopping."""
        t0 = time.perf_counter()
        self.model.train()
        n, bs = len(self.y), self.batch_size
        perm = torch.randperm(n, generator=self.gen).to(self.device)
        total = torch.zeros((), device=self.device)
        for lo in range(0, n, bs):
            idx = perm[lo : lo + bs]
            x = self._inputs(self.x[idx])
            if self.strong:
                x = crop_and_flip(x, self.gen, self.cfg.strong_flip)
                for group in self.opt.param_groups:
                    group["lr"] = one_cycle(self.step, self.total_steps, self.peak_lr)
            with self._autocast():
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), self.y[idx], label_smoothing=self.cfg.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.step += 1
            total += loss.detach() * len(idx)
        val_top1, val_metric = self._monitored(self.xv, self.yv)
        self.epoch += 1
        if not self.strong:
            self.plateau.step(val_metric, self.opt)  # Keras order: ReduceLROnPlateau, then EarlyStopping
        if val_metric > self.best_val:  # Keras EarlyStopping: strict improvement, min_delta 0; stop at wait >= patience
            self.best_val, self.best_epoch, self.wait = val_metric, self.epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if self.xs is not None:
                self.best_test = self._monitored(self.xs, self.ys)[1]
        else:
            self.wait += 1
        row = {"epoch": self.epoch, "train_loss": float(total) / n, "val_top1": val_top1, "val_metric": val_metric,
               "lr": self.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        self.history.append(row)
        return row

    def _monitored(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(top-1, the monitored metric) of the current weights."""
        top1, _, pred = self.evaluate(x, y)
        if self.monitor == "top1":
            return top1, top1
        return top1, balanced_accuracy(y.cpu().numpy(), pred.cpu().numpy())

    @torch.no_grad()
    def _batched(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` of uint8 (N, H, W, 3) images in eval mode, eval_batch_size at a time, as float32."""
        self.model.eval()
        outs = []
        for lo in range(0, len(x), self.cfg.eval_batch_size):
            with self._autocast():
                outs.append(fn(self._inputs(x[lo : lo + self.cfg.eval_batch_size].to(self.device))).float())
        return torch.cat(outs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C) as float32 for uint8 (N, H, W, 3) on the device."""
        return self._batched(x, self.forward)

    def embed(self, x: Any) -> torch.Tensor:
        """Penultimate features (N, width) as float32 of uint8 (N, H, W, 3) images (numpy or torch)."""
        x = x if torch.is_tensor(x) else torch.from_numpy(np.require(x, requirements=["C", "W"]))
        return self._batched(x, self.model.features)

    def losses(self, data: Any) -> np.ndarray:
        """Each image's cross-entropy (no smoothing) under the current weights (membership inference)."""
        xs, ys = as_arrays(data, "images")
        x, y = self._to_device(xs, ys)
        return F.cross_entropy(self.predict(x), y, reduction="none").cpu().numpy()

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None,
                 ) -> tuple[float, float, torch.Tensor]:
        """(top-1, top-min(5, C), predictions) for device tensors."""
        logits = self.predict(x) if logits is None else logits
        k = min(5, self.num_classes)
        topk = logits.topk(k, dim=1).indices
        top1 = (topk[:, 0] == y).float().mean().item()
        top5 = (topk == y[:, None]).any(dim=1).float().mean().item()
        return top1, top5, topk[:, 0]

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)

    def test(self, test: Any) -> SplitScores:
        """Top-1/top-5, per-class accuracy, confusion matrix, balanced accuracy, macro-F1, AUC and
        bootstrap intervals of the current weights."""
        xs, ys = as_arrays(test, "test")
        x, y = self._to_device(xs, ys)
        logits = self.predict(x)
        top1, top5, pred = self.evaluate(x, y, logits)
        conf = np.zeros((self.num_classes, self.num_classes), np.int64)
        labels, predicted = y.cpu().numpy(), pred.cpu().numpy()
        np.add.at(conf, (labels, predicted), 1)
        per_class = [float(conf[c, c] / conf[c].sum()) if conf[c].sum() else float("nan") for c in range(self.num_classes)]
        probs = torch.softmax(logits, 1).cpu().numpy()
        return SplitScores(top1=top1, top5=top5, per_class_accuracy=per_class, confusion=conf.tolist(),
                           metrics=split_metrics(labels, probs), predictions=predicted.tolist())

    # -- pausing and resuming (Ray Tune) -----------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """A snapshot: copies, so a state kept by a caller (a paused trial) is not moved on by later epochs."""
        return {
            "model": copy.deepcopy(self.model.state_dict()), "opt": copy.deepcopy(self.opt.state_dict()),
            "plateau": asdict(self.plateau),
            "best_test": self.best_test,
            "gen": self.gen.get_state(), "epoch": self.epoch, "step": self.step, "best_val": self.best_val,
            "best_epoch": self.best_epoch, "wait": self.wait, "best_state": self.best_state,
            "history": copy.deepcopy(self.history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.plateau = KerasPlateau(**state["plateau"])
        self.best_test = state.get("best_test")
        self.gen.set_state(state["gen"])
        self.epoch, self.best_val = int(state["epoch"]), float(state["best_val"])
        self.step = int(state.get("step", 0))
        self.best_epoch, self.wait = int(state["best_epoch"]), int(state["wait"])
        self.best_state = state["best_state"]
        self.history = list(state["history"])


def train_and_evaluate(train: Any, val: Any, test: Any, num_classes: int, *, cfg: CasConfig | None = None,
                       seed: int = 0, device: torch.device | str | None = None, precision: str = "auto",
                       callback: Callable[[int, float, float], bool | None] | None = None) -> CasResult:
    """Train ResNet20 on ``train`` with ``cfg.protocol`` (the paper's: early-stopped on ``val``); score
    ``test`` with the best-val weights.

    Each argument is ``(images uint8 (N, H, W, 3), labels (N,))``, an ImageSet or a Split.
    ``callback(epoch, train_loss, val_top1)`` runs after every epoch; returning True stops.
    """
    t0 = time.perf_counter()
    tr = CasTrainer(train, val, num_classes, cfg=cfg, seed=seed, device=device, precision=precision)
    while not tr.done:
        row = tr.train_epoch()
        if callback is not None and callback(int(row["epoch"]), row["train_loss"], row["val_top1"]):
            break
    tr.restore_best()
    res = tr.test(test)
    return CasResult(top1=res.top1, top5=res.top5, best_epoch=tr.best_epoch, epochs_run=tr.epoch,
                     seconds=time.perf_counter() - t0, best_val_top1=tr.best_val, num_train=len(tr.y),
                     per_class_accuracy=res.per_class_accuracy, confusion=res.confusion, history=tr.history,
                     metrics=res.metrics, predictions=res.predictions)


def trainer_from_state(weights: dict[str, torch.Tensor], like: Any, num_classes: int, *,
                       cfg: CasConfig | None = None, device: torch.device | str | None = None,
                       precision: str = "auto") -> CasTrainer:
    """A trainer holding saved model ``weights``, to score or embed images shaped as ``like`` (uint8
    (N, H, W, 3); its first image stands in for the training data)."""
    x = like[:1]
    one = (x, np.zeros(1, np.int64) if not torch.is_tensor(x) else torch.zeros(1, dtype=torch.long))
    tr = CasTrainer(one, one, num_classes, cfg=cfg or CasConfig(), device=device, precision=precision)
    tr.model.load_state_dict(weights)
    return tr


def score_state(state: dict[str, Any], test: Any, num_classes: int, *, cfg: CasConfig | None = None,
                device: torch.device | str | None = None, precision: str = "auto") -> SplitScores:
    """Test metrics of a saved :class:`CasTrainer` state (its best-val weights)."""
    xs, ys = as_arrays(test, "test")
    weights = state["best_state"] if state.get("best_state") is not None else state["model"]
    return trainer_from_state(weights, xs, num_classes, cfg=cfg, device=device, precision=precision).test((xs, ys))
