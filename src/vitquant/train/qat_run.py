"""One-call QAT runs for scripts and the demo: :func:`run_qat` and :func:`make_softlabels`.

:func:`run_qat` fine-tunes a float checkpoint with one of the QAT methods (``lsq``, ``qvit``,
``vvtq``, ``ft-qat``) through the training engine (:func:`vitquant.train.trainer.fit`: experiment
folder, resume, logs), with short-schedule defaults suited to the demo model
(``vit_micro_patch7_28`` on Fashion-MNIST). For ``vvtq`` with a soft-label folder the engine
builds the multi-crop soft-label training set (the method's ``build_train_set`` hook, see
:func:`vitquant.train.trainer.method_train_data`), as ``vitquant train`` does.
"""

from __future__ import annotations

from typing import Any

import torch

from vitquant.errors import ConfigError

__all__ = ["run_qat", "make_softlabels", "QAT_DEFAULTS", "FT_QAT_DEFAULTS"]

#: training defaults of a short QAT fine-tuning (AdamW, cosine, no warm-up)
QAT_DEFAULTS: dict[str, Any] = dict(
    epochs=2,
    batch_size=128,
    opt="adamw",
    lr=5e-4,
    min_lr=1e-6,
    warmup_epochs=0.0,
    weight_decay=0.0,
    label_smoothing=0.0,
    clip_grad=1.0,
)
#: FasterTransformer's QAT: SGD with momentum 0.9, no weight decay, clipping 1.0, constant lr
FT_QAT_DEFAULTS: dict[str, Any] = dict(
    epochs=1,
    batch_size=32,
    opt="sgd",
    lr=1e-4,
    min_lr=1e-4,
    warmup_epochs=0.0,
    weight_decay=0.0,
    momentum=0.9,
    label_smoothing=0.0,
    clip_grad=1.0,
)


def run_qat(
    method: str,
    finetune: str,
    *,
    model: str = "vit_micro_patch7_28",
    data_path: str = "/usr/share/datasets/fashion-mnist",
    method_args: dict[str, Any] | None = None,
    output: str = "runs/qat",
    name: str | None = None,
    quiet: bool = True,
    **train: Any,
) -> dict[str, Any]:
    """Fine-tunes ``finetune`` (a float checkpoint or run folder) with a QAT method.

    Args:
        method: ``"lsq" | "qvit" | "vvtq" | "ft-qat"``.
        finetune: the float model to start from.
        model: its architecture.
        data_path: dataset name or folder.
        method_args: the method's options (e.g. ``{"wbits": 4, "abits": 4, "irm": False}``;
            ``vvtq`` takes ``softlabel_path`` and ``num_crops`` here).
        output: root of the experiment folders.
        name: experiment folder name (default: made from the options).
        quiet: print nothing.
        **train: :class:`~vitquant.train.config.TrainConfig` fields overriding
            :data:`QAT_DEFAULTS` (or :data:`FT_QAT_DEFAULTS` for ``ft-qat``), e.g. ``epochs``,
            ``train_subset``, ``teacher``, ``distillation_type``.

    Returns:
        The run's result (``top1``, ``top5``, ``experiment`` ...).

    Example:
        >>> run_qat("lsq", "runs/demo/float", method_args={"wbits": 4, "abits": 4}, epochs=1)
    """
    from vitquant.train.config import TrainConfig
    from vitquant.train.trainer import fit

    defaults = FT_QAT_DEFAULTS if method == "ft-qat" else QAT_DEFAULTS
    cfg = TrainConfig(
        **{
            **defaults,
            **train,
            "model": model,
            "data_path": data_path,
            "method": method,
            "method_args": dict(method_args or {}),
            "finetune": finetune,
            "output": output,
            "name": name,
        }
    )
    return fit(cfg, quiet=quiet)


def make_softlabels(
    teacher: str,
    folder: str,
    *,
    data_path: str = "/usr/share/datasets/fashion-mnist",
    split: str = "train",
    teacher_model: str | None = None,
    train_subset: int = 0,
    seed: int = 0,
    num_crops: int = 10,
    topk: int = 5,
    img_size: int | None = None,
    scale: tuple[float, float] = (0.35, 1.0),
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Writes an FKD soft-label folder for ``split`` of ``data_path`` from ``teacher``.

    Args:
        teacher: a registered model name, a vitquant run folder or checkpoint.
        folder: output folder.
        data_path: dataset name or folder.
        split: the split to label (the training split).
        teacher_model: architecture of a foreign teacher checkpoint.
        train_subset: label only this subset (the same ``train_subset`` and ``seed`` must be used
            for training).
        seed: seed of the subset and of the crops.
        num_crops, topk, img_size, scale, batch_size: see
            :func:`vitquant.methods.vvtq.softlabels.generate_softlabels`.
        device: where the teacher runs.
        progress: show a progress bar.

    Returns:
        The folder's metadata.
    """
    from vitquant import data as D
    from vitquant.methods.vvtq.softlabels import generate_softlabels
    from vitquant.train.build import build_teacher
    from vitquant.train.config import TrainConfig
    from vitquant.train.data import model_img_size

    if not teacher:
        raise ConfigError("soft labels need a --teacher")
    info = D.dataset_info(data_path)
    cfg = TrainConfig(
        data_path=data_path, teacher=teacher, teacher_model=teacher_model, img_size=img_size
    )
    net = build_teacher(cfg, int(info.num_classes), int(info.in_chans), torch.device(device))
    assert net is not None
    size = img_size or model_img_size(net) or int(info.img_size)
    base = D.build_dataset(data_path, split, img_size=size, train_transform=False)
    if train_subset:
        base = D.subset(base, train_subset, seed=seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(base), desc="soft labels")

    def tick(done: int, total: int) -> None:
        if bar is not None:
            bar.n = done
            bar.refresh()

    meta = generate_softlabels(
        net,
        base,
        folder,
        num_crops=num_crops,
        topk=topk,
        img_size=size,
        scale=scale,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=tick,
    )
    if bar is not None:
        bar.close()
    extra = {
        "data_path": str(data_path),
        "split": split,
        "train_subset": train_subset,
        "seed": seed,
        "teacher": str(teacher),
    }
    from vitquant.methods.vvtq.softlabels import write_meta

    write_meta(folder, {**meta, "source": extra})
    return {**meta, "source": extra}
