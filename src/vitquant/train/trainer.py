"""``fit(cfg)``: a whole training run in its experiment folder, resumable at any step.

The run's state after step ``s`` of epoch ``e`` is: the model, every optimizer, the schedule
position, the gradient scaler, the running sums of the epoch, the best metric, the method's extra
state, and the RNG states of every process. All of it goes into ``last.pt`` (atomically) after
each epoch and every ``save_every_steps`` steps / ``save_every_minutes`` minutes. Rerunning the
same command loads it, skips the done batches of the epoch without loading them, restores the
RNG states and continues, so the final weights and metrics are exactly those of an uninterrupted
run. The RNG stream is re-seeded from ``(seed, epoch, rank)`` at the start of each epoch, after
the epoch's data iterator is created. The ``--finetune`` weights are loaded on resume as well,
before the method's ``prepare_model``: a teacher it copies from the float model (Q-ViT's DGD,
ft-qat's KL) and ft-qat's calibration are those of the first run; the checkpoint then replaces
the student's state. A finished run just reports its ``result.json``.

A run never silently starts over: a ``last.pt`` that cannot be read or loaded, one written with
other options or for other data (steps per epoch), or a started folder (``best.pt``, logged epochs)
without ``last.pt`` is an error. The method may build its own training set
(:func:`~vitquant.train.build.method_train_data`: VVTQ's soft labels from ``--softlabel-path``).

The checks of what to resume from (:func:`~vitquant.train.resume.resume_state`, the
checkpoint format) live in :mod:`vitquant.train.resume`; the run's other parts in the other
``train`` modules.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vitquant.errors import CheckpointError, ConfigError
from vitquant.methods import MethodContext, StepState, TrainMethod, build_method
from vitquant.train import distributed as D
from vitquant.train.build import build_student, build_teacher, load_finetune, method_train_data
from vitquant.train.checkpoint import (
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from vitquant.train.config import TrainConfig
from vitquant.train.data import (
    TrainData,
    build_epoch_loader,
    build_train_data,
    dataset_meta,
    eval_loader,
    model_img_size,
)
from vitquant.train.engine import EpochMeter, evaluate, train_one_epoch
from vitquant.train.experiment import Experiment, experiment_dir
from vitquant.train.losses import DistillationLoss
from vitquant.train.optim import build_optimizer
from vitquant.train.progress import Progress, format_duration
from vitquant.train.resume import CHECKPOINT_FORMAT
from vitquant.train.resume import resume_state as _resume_state
from vitquant.train.resume import state_mismatch as _state_mismatch
from vitquant.train.schedule import CosineSchedule

__all__ = ["fit", "CHECKPOINT_FORMAT", "seed_everything"]

#: exit code of a run stopped by ``stop_after_steps`` (tests of resuming)
STOP_EXIT_CODE = 17


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729 + 1) % 2**63


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _say(info: D.DistInfo, quiet: bool, *parts: Any) -> None:
    if info.is_main and not quiet:
        print(*parts, flush=True)


def fit(
    cfg: TrainConfig,
    *,
    exp_dir: str | Path | None = None,
    data: TrainData | None = None,
    method: TrainMethod | None = None,
    stop_after_steps: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Trains (or resumes, or reports) the run of ``cfg``; returns its final metrics.

    Args:
        cfg: the run's options.
        exp_dir: the experiment folder (default: named from ``cfg``, see
            :func:`~vitquant.train.experiment.experiment_dir`).
        data: datasets to use instead of building them from ``cfg.data_path`` (used as given:
            the method's ``build_train_set`` hook is not applied).
        method: a configured method (default: ``cfg.method`` with ``cfg.method_args``).
        stop_after_steps: testing aid: exit the process hard (``os._exit``) after this many
            optimizer steps of this process, as a kill would.
        quiet: print nothing.

    Returns:
        ``{"top1", "top5", "loss", "best_top1", "best_epoch", "epochs", "train_time_s",
        "experiment", ...}`` of the last evaluation.

    Raises:
        ConfigError: the folder or its ``last.pt`` was made with other options or other data,
            bad options.
        CheckpointError: a corrupt or unfitting ``last.pt``, or a started run without one.
        DataError: missing or empty data.
    """
    from vitquant.models import MODELS

    MODELS.get(cfg.model)  # unknown names fail here, before any folder is made
    info = D.init_distributed(cfg.device)
    method = method or build_method(cfg.method, cfg.method_args)
    if exp_dir is None:
        exp_dir = experiment_dir(cfg, type(method).Config().to_dict())
    exp = Experiment(exp_dir)
    exp.check_config(cfg)
    done = exp.result()
    if done is not None:
        _say(info, quiet, f"{exp.root}: finished already; top-1 {done['top1']:.2f}%")
        return {**done, "resumed": "finished"}
    state = _resume_state(exp, cfg)
    run = _Run(cfg, info, exp, method, state, data, stop_after_steps, quiet)
    D.barrier()
    if info.is_main:
        exp.write_config(cfg)
    return run.run()


class _Run:
    """The objects of one training process (built once, then :meth:`run`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: D.DistInfo,
        exp: Experiment,
        method: TrainMethod,
        state: dict[str, Any] | None,
        data: TrainData | None,
        stop_after_steps: int | None,
        quiet: bool,
    ) -> None:
        self.cfg, self.info, self.exp, self.method = cfg, info, exp, method
        self.state, self.quiet, self.stop_after = state, quiet, stop_after_steps
        self.device = info.device
        if data is None:
            num_classes, in_chans = dataset_meta(cfg.data_path)
            model = build_student(cfg, num_classes, in_chans)
            size = cfg.img_size or model_img_size(model)
            data = method_train_data(cfg, method, build_train_data(cfg, size), size)
        else:
            model = build_student(cfg, data.num_classes, data.in_chans)
        self.data = data
        self.loader = build_epoch_loader(self.data.train_set, cfg, info.rank, info.world_size)
        self.steps_per_epoch = len(self.loader)
        eval_bs = cfg.eval_batch_size or 2 * cfg.batch_size
        self.eval_loader = eval_loader(
            self.data.eval_set, eval_bs, info.rank, info.world_size, cfg.num_workers
        )
        if cfg.finetune:  # on resume too: a teacher copied from the float model needs them
            load_finetune(model, cfg.finetune, cfg.model)
        if cfg.distillation_type != "none":
            for m in model.modules():
                if getattr(m, "distilled", False) and hasattr(m, "distilled_training"):
                    m.distilled_training = True
        ctx = MethodContext(
            config=cfg,
            device=self.device,
            dist=info,
            num_classes=self.data.num_classes,
            calib_loader=self.loader.loader,
            resuming=state is not None,
        )
        self.model = method.prepare_model(model, ctx).to(self.device)
        teacher = method.teacher(ctx)
        if teacher is None:
            teacher = build_teacher(cfg, self.data.num_classes, self.data.in_chans, self.device)
        self.criterion = DistillationLoss(
            teacher,
            cfg.distillation_type if teacher is not None else "none",
            cfg.distillation_alpha,
            cfg.distillation_tau,
            cfg.label_smoothing,
        )
        self.ddp: nn.Module = self.model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        groups = method.param_groups(self.model, cfg.lr, cfg.weight_decay)
        main_opt = build_optimizer(
            cfg.opt, groups, lr=cfg.lr, momentum=cfg.momentum, betas=cfg.betas, eps=cfg.eps
        )
        self.optimizers = [main_opt, *method.extra_optimizers(self.model)]
        self.schedule = CosineSchedule(
            self.optimizers,
            base_lr=cfg.lr,
            total_steps=cfg.epochs * self.steps_per_epoch,
            warmup_steps=round(cfg.warmup_epochs * self.steps_per_epoch),
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
        )
        amp = cfg.amp if cfg.amp is not None else self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if amp else None
        self.scaler: torch.amp.GradScaler | None = None
        self.best: dict[str, Any] = {"top1": -1.0, "epoch": -1}
        self.history: list[dict[str, Any]] = []
        self.train_time = 0.0
        self.epoch, self.step = 0, 0
        self.meter_state: dict[str, Any] | None = None
        self.rng_states: list[Any] | None = None
        self.steps_run = 0
        if state is not None:
            self._load(state)

    # --- state ------------------------------------------------------------------------------
    def _load(self, state: dict[str, Any]) -> None:
        saved_steps = int(state.get("steps_per_epoch", self.steps_per_epoch))
        if saved_steps != self.steps_per_epoch:
            saved_ws = int(state.get("world_size", 1))
            raise ConfigError(
                f"{self.exp.last_path} was trained with {saved_steps} steps per epoch on "
                f"{saved_ws} process(es), this run has {self.steps_per_epoch} on "
                f"{self.info.world_size}; resume with the same data and number of processes"
            )
        try:
            self.model.load_state_dict(state["model"])
            opts = state["optimizers"]
            if len(opts) != len(self.optimizers):
                raise CheckpointError("the checkpoint holds another number of optimizers")
            for opt, s in zip(self.optimizers, opts):
                opt.load_state_dict(s)
            self.schedule.load_state_dict(state["schedule"])
            self.method.load_extra_state(state.get("method") or {})
        except (KeyError, RuntimeError, ValueError) as e:
            problem = _state_mismatch(self.model.state_dict(), state.get("model"))
            if problem is not None:
                raise CheckpointError(
                    f"{self.exp.last_path} does not fit this run's model: {problem}"
                ) from None
            msg = str(e).splitlines()[0][:200]
            raise CheckpointError(f"{self.exp.last_path} does not fit this run ({msg})") from None
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best, self.history = dict(state["best"]), list(state["history"])
        self.train_time = float(state.get("train_time", 0.0))
        self.meter_state = state.get("meter")
        if self.step > 0:
            if int(state.get("world_size", 1)) != self.info.world_size:
                raise ConfigError(
                    f"{self.exp.last_path} stopped mid-epoch with {state.get('world_size')} "
                    f"processes; resume it with the same number (now {self.info.world_size})"
                )
            if self.step >= self.steps_per_epoch:
                raise CheckpointError(f"{self.exp.last_path} is past the end of its epoch")
            self.rng_states = state["rng"]
        _say(
            self.info,
            self.quiet,
            f"resuming {self.exp.root} at epoch {self.epoch + 1} step "
            f"{self.step}/{self.steps_per_epoch}",
        )

    def _save(self, epoch: int, step: int, meter: EpochMeter | None) -> None:
        rng = D.all_gather_objects(capture_rng_state()) if step > 0 else None
        if not self.info.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "step": step,
            "steps_per_epoch": self.steps_per_epoch,
            "meter": meter.state_dict() if meter is not None else None,
            "best": self.best,
            "history": self.history,
            "rng": rng,
            "world_size": self.info.world_size,
            "method": self.method.checkpoint_extra_state(),
            "train_time": self.train_time,
        }
        save_checkpoint(self.exp.last_path, state)

    # --- loop -------------------------------------------------------------------------------
    def _loss(self, epoch: int) -> Any:
        def loss_fn(
            outputs: Any, targets: Tensor, inputs: Tensor, step: int
        ) -> tuple[Tensor, dict[str, float]]:
            return self.method.loss(outputs, targets, inputs, self._step_state(epoch, step))

        return loss_fn

    def _step_state(self, epoch: int, step: int) -> StepState:
        return StepState(
            epoch=epoch,
            step=step,
            global_step=epoch * self.steps_per_epoch + step,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.cfg.epochs,
            criterion=self.criterion,
        )

    def _after_step(self, epoch: int) -> Any:
        cfg = self.cfg
        last_save = [time.monotonic()]

        def after(step: int, meter: EpochMeter) -> bool:
            self.method.on_step_end(self.model, self._step_state(epoch, step))
            done = step + 1
            if done < self.steps_per_epoch:
                due = cfg.save_every_steps > 0 and done % cfg.save_every_steps == 0
                if cfg.save_every_minutes > 0:
                    late = time.monotonic() - last_save[0] >= cfg.save_every_minutes * 60
                    due = D.broadcast_flag(due or late, self.device)
                if due:
                    self._save(epoch, done, meter)
                    last_save[0] = time.monotonic()
            self.steps_run += 1
            if self.stop_after is not None and self.steps_run >= self.stop_after:
                sys.stdout.flush()
                os._exit(STOP_EXIT_CODE)
            return False

        return after

    def run(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        if self.epoch == 0 and self.step == 0:
            n = len(self.data.train_set)
            _say(
                info,
                self.quiet,
                f"training {cfg.model} on {cfg.data_path} ({n} images, "
                f"{self.steps_per_epoch} steps/epoch x {cfg.epochs}) in {self.exp.root}",
            )
        for epoch in range(self.epoch, cfg.epochs):
            start = self.step if epoch == self.epoch else 0
            t0 = time.monotonic()
            batches = iter(self.loader.batches(epoch, start))
            if start == 0:
                seed_everything(_epoch_seed(cfg.seed, epoch, info.rank))
                meter = EpochMeter()
            else:
                assert self.rng_states is not None
                restore_rng_state(self.rng_states[info.rank])
                meter = EpochMeter.from_state(self.meter_state)
            progress = Progress(
                self.steps_per_epoch,
                f"epoch {epoch + 1}/{cfg.epochs}",
                enabled=info.is_main and not self.quiet,
                initial=start,
                log_every=cfg.log_every,
            )
            meter = train_one_epoch(
                self.ddp,
                batches,
                optimizers=self.optimizers,
                loss_fn=self._loss(epoch),
                device=self.device,
                start_step=start,
                meter=meter,
                schedule=self.schedule,
                penalty_fn=lambda: self.method.penalty(self.model),
                amp_dtype=self.amp_dtype,
                scaler=self.scaler,
                clip_grad=cfg.clip_grad,
                after_step=self._after_step(epoch),
                progress=progress,
            )
            progress.close()
            self.train_time += time.monotonic() - t0
            record: dict[str, Any] = {"epoch": epoch + 1, **meter.means()}
            record["lr"] = self.optimizers[0].param_groups[0]["lr"]
            record.update(self.method.on_epoch_end(self.model, epoch))
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                metrics = evaluate(
                    self.method.eval_model(self.model),
                    self.eval_loader,
                    self.device,
                    amp_dtype=self.amp_dtype,
                )
                record.update(metrics)
                if metrics["top1"] > self.best["top1"]:
                    self.best = {"top1": metrics["top1"], "epoch": epoch + 1}
                    if info.is_main:
                        save_checkpoint(
                            self.exp.best_path,
                            {
                                "model": self.model.state_dict(),
                                "config": cfg.to_dict(),
                                "epoch": epoch + 1,
                                "metrics": metrics,
                            },
                        )
            record["epoch_time_s"] = time.monotonic() - t0
            self.history.append(record)
            self._save(epoch + 1, 0, None)
            if info.is_main:
                self.exp.log(record)
            _say(info, self.quiet, _epoch_line(record, cfg.epochs))
            self.step = 0
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        last = next((r for r in reversed(self.history) if "top1" in r), {})
        result = {
            "top1": last.get("top1"),
            "top5": last.get("top5"),
            "loss": last.get("loss"),
            "train_loss": self.history[-1].get("train_loss") if self.history else None,
            "best_top1": self.best["top1"],
            "best_epoch": self.best["epoch"],
            "epochs": self.cfg.epochs,
            "model": self.cfg.model,
            "data_path": self.cfg.data_path,
            "method": self.cfg.method,
            "train_time_s": round(self.train_time, 2),
            "experiment": str(self.exp.root),
        }
        if self.info.is_main:
            self.exp.write_result(result)
        D.barrier()
        _say(
            self.info,
            self.quiet,
            f"done in {format_duration(self.train_time)}: top-1 "
            f"{result['top1']:.2f}%, top-5 {result['top5']:.2f}% ({self.exp.root})",
        )
        return result


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"train_loss {r['train_loss']:.4f}"]
    if "top1" in r:
        parts += [f"top1 {r['top1']:.2f}", f"top5 {r['top5']:.2f}", f"loss {r['loss']:.4f}"]
    parts.append(f"({format_duration(r['epoch_time_s'])})")
    return " ".join(parts)
