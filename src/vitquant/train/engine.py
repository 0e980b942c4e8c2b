"""One training epoch and one evaluation pass, with explicit arguments.

The split of DeiT's ``engine.py`` (Touvron et al., 2021, arXiv 2012.12877:
``train_one_epoch`` and ``evaluate``), without its ``args``: the loss, the regulariser
(DiffQ-style penalty, Défossez et al., 2021) and the per-step hook come in as callables, and the
epoch can start at any step (resume mid-epoch) with its running sums restored from a
:class:`EpochMeter`. Evaluation sums correct counts and losses over all processes, so top-1/top-5
are exact under data parallelism.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitquant.errors import VitquantError
from vitquant.train.distributed import all_reduce_sum
from vitquant.train.progress import Progress

__all__ = ["EpochMeter", "autocast", "train_one_epoch", "evaluate", "accuracy_counts"]

LossFn = Callable[[Any, Tensor, Tensor, int], tuple[Tensor, dict[str, float]]]


@dataclass
class EpochMeter:
    """Running sums of one epoch's training statistics (checkpointed with the epoch)."""

    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def update(self, loss: float, batch: int, logs: dict[str, float]) -> None:
        """Adds one step (``loss`` is the batch mean; ``logs`` are per-step numbers)."""
        self.steps += 1
        self.samples += batch
        self.loss_sum += loss * batch
        for k, v in logs.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)

    def means(self) -> dict[str, float]:
        """``train_loss`` (per sample) and the mean of every logged number (per step)."""
        out = {"train_loss": self.loss_sum / max(1, self.samples)}
        out.update({f"train_{k}": v / max(1, self.steps) for k, v in self.extra.items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of the sums."""
        return {
            "steps": self.steps,
            "samples": self.samples,
            "loss_sum": self.loss_sum,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> EpochMeter:
        """Rebuilds a meter from :meth:`state_dict` (a fresh one for ``None``)."""
        if not state:
            return cls()
        return cls(
            int(state["steps"]),
            int(state["samples"]),
            float(state["loss_sum"]),
            dict(state["extra"]),
        )


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    optimizers: list[torch.optim.Optimizer],
    loss_fn: LossFn,
    device: torch.device,
    start_step: int = 0,
    meter: EpochMeter | None = None,
    schedule: Any = None,
    penalty_fn: Callable[[], Tensor | None] | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float = 0.0,
    after_step: Callable[[int, EpochMeter], bool] | None = None,
    progress: Progress | None = None,
) -> EpochMeter:
    """Trains over ``batches``, which start at step ``start_step`` of the epoch.

    Args:
        model: the model (possibly DDP-wrapped), put in train mode here.
        batches: ``(images, labels)`` batches of the rest of the epoch.
        optimizers: the main optimizer first, then the method's extra ones.
        loss_fn: ``loss_fn(outputs, targets, inputs, step) -> (loss, logs)``.
        device: where the model is.
        start_step: index in the epoch of the first batch.
        meter: running sums of the steps already done in this epoch.
        schedule: object whose ``step()`` sets this step's learning rate (returns it).
        penalty_fn: returns a regulariser added to the loss, or ``None``.
        amp_dtype: autocast dtype (``None``: full precision).
        scaler: gradient scaler (float16 autocast only).
        clip_grad: maximal global gradient norm (0: none).
        after_step: ``after_step(step, meter)`` after each step; returning True stops the epoch.
        progress: progress display, advanced per step.

    Returns:
        The meter with this epoch's sums.

    Raises:
        VitquantError: the loss became NaN or infinite.
    """
    model.train()
    meter = meter or EpochMeter()
    params = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    step = start_step
    for images, targets in batches:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        lr = schedule.step() if schedule is not None else optimizers[0].param_groups[0]["lr"]
        with autocast(device, amp_dtype):
            outputs = model(images)
            outputs = getattr(outputs, "logits", outputs)  # transformers' ModelOutput
            loss, logs = loss_fn(outputs, targets, images, step)
            if penalty_fn is not None:
                pen = penalty_fn()
                if pen is not None:
                    logs = {**logs, "penalty": float(pen.detach())}
                    loss = loss + pen
        value = float(loss.detach())
        if not math.isfinite(value):
            raise VitquantError(
                f"the training loss became {value} at step {step}; lower --lr or set --clip-grad"
            )
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            for opt in optimizers:
                scaler.unscale_(opt)
        else:
            loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        for opt in optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        meter.update(value, images.shape[0], logs)
        if progress is not None:
            progress.update(1, loss=value, lr=lr)
        stop = after_step(step, meter) if after_step is not None else False
        step += 1
        if stop:
            break
    return meter


def accuracy_counts(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(targets.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (in %), mean cross-entropy and image count over ``batches``.

    Under data parallelism each process passes its own shard; the counts are summed over all
    processes, so the result is the one of the whole set.
    """
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    try:
        for images, targets in batches:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = model(images)
            logits = getattr(logits, "logits", logits)  # transformers' ModelOutput
            if isinstance(logits, tuple):
                logits = (logits[0] + logits[1]) / 2
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            c1, c5 = accuracy_counts(logits, targets)
            correct1 += c1
            correct5 += c5
            n += targets.shape[0]
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    correct1, correct5, loss_sum, n = all_reduce_sum([correct1, correct5, loss_sum, n], device)
    if n == 0:
        raise VitquantError("the evaluation set is empty")
    return {
        "top1": 100.0 * correct1 / n,
        "top5": 100.0 * correct5 / n,
        "loss": loss_sum / n,
        "images": int(n),
    }


def skip_batches(it: Iterator[Any], n: int) -> Iterator[Any]:
    """Advances an iterator by ``n`` items (fallback when batches cannot be skipped unloaded)."""
    for _ in range(n):
        next(it, None)
    return it
