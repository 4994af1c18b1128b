"""Training, evaluation, BatchNorm recalibration and latency measurement."""
from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader


def loader(ds, batch_size: int, *, shuffle: bool, workers: int = 0, seed: int = 0) -> DataLoader:
    """A training loader (``shuffle``) never ends on a batch of one sample: BatchNorm cannot
    train on it where the feature map is 1x1 (ResNet's last stage at small input sizes)."""
    g = torch.Generator().manual_seed(seed)
    lone_last = shuffle and len(ds) > batch_size and len(ds) % batch_size == 1
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=g,
                      drop_last=lone_last)


class Distilled:
    """A loader whose targets are a teacher's logits on the very batch (augmented or not):
    evaluation by agreement and fine-tuning by distillation read them instead of labels."""

    def __init__(self, dl, teacher: nn.Module, device="cpu"):
        self.dl, self.teacher, self.device = dl, teacher, device

    def __len__(self):
        return len(self.dl)

    def __iter__(self):
        for x, _ in self.dl:
            x = x.to(self.device)
            with torch.no_grad():  # never around the yield: the consumer trains on the batch
                target = self.teacher(x).float()
            yield x, target


MIN_BN_BATCH = 16


def _nominal_batch(dl) -> int:
    """The batch size of a DataLoader, through the wrappers (``Distilled``, ``Augmented``)."""
    while not hasattr(dl, "batch_size") and hasattr(dl, "dl"):
        dl = dl.dl
    return getattr(dl, "batch_size", None) or MIN_BN_BATCH


def _soft(y: torch.Tensor) -> bool:
    return y.is_floating_point() and y.dim() == 2


def main_logits(out) -> torch.Tensor:
    """The main head's logits of a training-mode forward: the output itself, or the first of an
    auxiliary-head model's outputs (torchvision's GoogLeNet / Inception ``.logits``, a tuple, a
    ``{"logits": ...}`` dict)."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"the model's training-mode forward returned a {type(out).__name__}; accepted: a tensor of "
                    f"logits, a tuple whose first item is, or an object or dict with 'logits'")


def kl_to(logits: torch.Tensor, target_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """KL(teacher || student) from both models' logits (nats)."""
    return nn.functional.kl_div(nn.functional.log_softmax(logits.float(), 1),
                                nn.functional.log_softmax(target_logits, 1), log_target=True, reduction=reduction)


def make_optimizer(model: nn.Module, name: str, lr: float):
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def train_epochs(model: nn.Module, dl: DataLoader, *, epochs: int, lr: float, optimizer: str = "sgd",
                 device="cpu", on_epoch=None) -> list[float]:
    """Cross-entropy training with a cosine learning-rate schedule; returns per-epoch mean loss.
    Where the loader's targets are logits (``Distilled``), the loss is KL(teacher || model);
    BatchNorm trains as usual, except below ``MIN_BN_BATCH`` samples per batch (distillation on a
    handful of unlabelled images), where batch statistics are too noisy and it keeps its running
    statistics. (Frozen BatchNorm at the usual batch sizes let distillation diverge: the small CNN
    on digits, lr 0.005, KL 0.03 -> NaN in 20 steps, against 0.03 -> 0.01 with BatchNorm training.)"""
    if epochs <= 0:
        return []
    model.to(device).train()
    frozen_bn = _nominal_batch(dl) < MIN_BN_BATCH
    opt = make_optimizer(model, optimizer, lr)
    steps = epochs * max(1, len(dl))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    for epoch in range(epochs):
        model.train()  # on_epoch may have evaluated the model
        total, n = 0.0, 0
        for x, y in dl:
            x, y = x.to(device), y.to(device)
            if frozen_bn and _soft(y):
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
            out = main_logits(model(x))  # auxiliary heads (GoogLeNet's) left out of the loss
            loss = kl_to(out, y) if _soft(y) else nn.functional.cross_entropy(out, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} in epoch {epoch + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            n += len(y)
        losses.append(total / max(n, 1))
        if on_epoch:
            on_epoch(epoch + 1, losses[-1])
    return losses


def _eval_mode(model: nn.Module) -> None:
    try:
        model.eval()
    except NotImplementedError:  # a torch.export GraphModule (pt2 from MLflow) is already in eval form
        pass


@torch.no_grad()
def evaluate(model: nn.Module, dl: DataLoader, device="cpu") -> dict:
    """Top-1 (and top-5 where there are more than 5 classes) accuracy in [0, 1]. Where the
    targets are a teacher's logits (``Distilled``): ``top1`` is the top-1 agreement with it and
    ``kl`` the mean KL(teacher || model)."""
    _eval_mode(model.to(device))
    top1 = top5 = n = 0
    kl = 0.0
    n_classes, soft = None, False
    for x, y in dl:
        out = model(x.to(device))
        y = y.to(device)
        n_classes, soft = out.shape[1], _soft(y)
        if soft:
            kl += kl_to(out, y, reduction="sum").item()
            y = y.argmax(1)
        top1 += (out.argmax(1) == y).sum().item()
        if n_classes > 5:
            top5 += (out.topk(5, dim=1).indices == y[:, None]).any(1).sum().item()
        n += len(y)
    res = {"top1": top1 / max(n, 1)}
    if n_classes and n_classes > 5:
        res["top5"] = top5 / max(n, 1)
    if soft:
        res["kl"] = kl / max(n, 1)
    return res


@torch.no_grad()
def recalibrate_bn(model: nn.Module, dl: DataLoader, batches: int, device="cpu") -> int:
    """Recompute BatchNorm running statistics from ``batches`` training batches (cumulative mean)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.to(device).train()
    seen = 0
    for i, (x, _) in enumerate(dl):
        if i >= batches:
            break
        model(x.to(device))
        seen += 1
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()
    return seen


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape, batch: int, *, repeats: int = 10, warmup: int = 2,
                    device="cpu") -> float:
    """Median wall-clock seconds of one forward pass at ``batch``."""
    model.to(device).eval()
    x = torch.randn(batch, *input_shape, device=device)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
