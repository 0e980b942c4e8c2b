"""Float training and evaluation engine, with resumable experiment folders and method plug-ins.

* :func:`fit` (``trainer.py``): a whole run in its experiment folder; rerunning resumes exactly.
* :func:`train_one_epoch`, :func:`evaluate` (``engine.py``): DeiT's engine split.
* :class:`TrainConfig` (``config.py``), optimizers (``optim.py``: AdamW, SGD, LAMB), the
  warm-up + cosine schedule (``schedule.py``), losses (``losses.py``: label smoothing, DeiT
  distillation), atomic checkpoints (``checkpoint.py``), experiment folders (``experiment.py``),
  ``torchrun`` helpers (``distributed.py``).
* Training methods (``methods/``): the :class:`TrainMethod` plug-in interface and ``METHODS``.
"""

from __future__ import annotations

from vitquant.methods import METHODS, MethodConfig, MethodContext, StepState, TrainMethod
from vitquant.train.checkpoint import load_checkpoint, save_checkpoint
from vitquant.train.config import TrainConfig
from vitquant.train.engine import EpochMeter, evaluate, train_one_epoch
from vitquant.train.experiment import Experiment, experiment_dir, experiment_name
from vitquant.train.losses import DistillationLoss, smoothed_cross_entropy, soft_distillation
from vitquant.train.optim import Lamb, build_optimizer, param_groups_weight_decay
from vitquant.train.schedule import CosineSchedule, cosine_lr
from vitquant.train.trainer import fit

__all__ = [
    "fit",
    "TrainConfig",
    "train_one_epoch",
    "evaluate",
    "EpochMeter",
    "Experiment",
    "experiment_dir",
    "experiment_name",
    "DistillationLoss",
    "smoothed_cross_entropy",
    "soft_distillation",
    "METHODS",
    "MethodConfig",
    "MethodContext",
    "StepState",
    "TrainMethod",
    "Lamb",
    "build_optimizer",
    "param_groups_weight_decay",
    "CosineSchedule",
    "cosine_lr",
    "save_checkpoint",
    "load_checkpoint",
]
