"""The training engine's view of the data: datasets from :mod:`vitquant.data`, epoch loaders
that can start at any batch, and the sharded evaluation loader.

Resuming mid-epoch must not re-run (nor even re-load) the batches already done, and must see the
same batches as an uninterrupted run: :class:`EpochLoader` asks the data package's loader for the
epoch's batches of indices (deterministic per seed and epoch; augmentation deterministic per
(seed, epoch, index)), drops the first ``start`` of them and loads only the rest. Evaluation
shards the set without padding (rank ``r`` takes images ``r, r + W, ...``), so the summed counts
are exactly those of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader, Dataset, Subset

from vitquant.errors import ConfigError, DataError
from vitquant.train.config import TrainConfig

__all__ = [
    "TrainData",
    "dataset_meta",
    "model_img_size",
    "build_train_data",
    "EpochLoader",
    "build_epoch_loader",
    "eval_loader",
]


@dataclass
class TrainData:
    """The datasets of a run and what the model needs to know about them.

    Attributes:
        train_set: training split (with its augmentation).
        eval_set: evaluation split.
        num_classes: number of classes.
        in_chans: image channels.
        img_size: image side the datasets produce.
    """

    train_set: Dataset
    eval_set: Dataset
    num_classes: int
    in_chans: int
    img_size: int | None = None


def _data_api() -> Any:
    try:
        from vitquant import data
    except ImportError as e:  # pragma: no cover - only while the data package is incomplete
        raise ConfigError(f"the data package is unavailable: {e}") from e
    return data


def _get(info: Any, key: str, default: Any = None) -> Any:
    if isinstance(info, dict):
        return info.get(key, default)
    return getattr(info, key, default)


def dataset_meta(data_path: str) -> tuple[int, int]:
    """``(num_classes, in_chans)`` of a dataset (without loading it)."""
    info = _data_api().dataset_info(data_path)
    return int(_get(info, "num_classes")), int(_get(info, "in_chans", 3))


def model_img_size(model: Any) -> int | None:
    """The input side a model was built for (from its ``default_cfg`` or patch embedding)."""
    cfg = getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        return int(cfg["input_size"][-1])
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    return int(size[-1]) if isinstance(size, tuple | list) else size


def build_train_data(cfg: TrainConfig, img_size: int | None = None) -> TrainData:
    """Builds the train/eval datasets of ``cfg`` with :mod:`vitquant.data`.

    Args:
        cfg: the run's options (``data_path``, splits, subsets, ``seed``).
        img_size: resolution to produce (default ``cfg.img_size``, else the dataset's own).

    Raises:
        DataError: missing or empty dataset (from the data package).
    """
    data = _data_api()
    size = img_size or cfg.img_size
    info = data.dataset_info(cfg.data_path)
    train_set = data.build_dataset(
        cfg.data_path, cfg.train_split, img_size=size, train_transform=True, augment=cfg.augment
    )
    eval_set = data.build_dataset(
        cfg.data_path, cfg.eval_split, img_size=size, train_transform=False
    )
    if cfg.train_subset:
        train_set = data.subset(train_set, cfg.train_subset, seed=cfg.seed)
    if cfg.eval_subset:
        eval_set = data.subset(eval_set, cfg.eval_subset, seed=cfg.seed)
    if len(train_set) == 0 or len(eval_set) == 0:
        raise DataError(f"dataset {cfg.data_path} has an empty split")
    return TrainData(
        train_set=train_set,
        eval_set=eval_set,
        num_classes=int(_get(info, "num_classes")),
        in_chans=int(_get(info, "in_chans", 3)),
        img_size=size or _get(info, "img_size"),
    )


class EpochLoader:
    """Batches of one epoch, starting at any step, from a :mod:`vitquant.data` loader.

    Args:
        loader: the training loader (``build_loader(..., train=True)``): the same batches for
            the same epoch every time.
        set_epoch: ``set_epoch(loader, epoch, start_batch)`` of the data package, which skips
            the first ``start_batch`` batches without loading them.
    """

    def __init__(self, loader: DataLoader, set_epoch: Any) -> None:
        self.loader = loader
        self._set_epoch = set_epoch
        set_epoch(loader, 0, 0)
        self.steps = len(loader)

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int, start: int = 0) -> DataLoader:
        """The loader set to the batches ``start ..`` of ``epoch``."""
        self._set_epoch(self.loader, epoch, start)
        return self.loader


def build_epoch_loader(ds: Dataset, cfg: TrainConfig, rank: int, world_size: int) -> EpochLoader:
    """The training :class:`EpochLoader` of ``ds`` for this process."""
    data = _data_api()
    loader = data.build_loader(
        ds,
        cfg.batch_size,
        train=True,
        num_workers=cfg.num_workers,
        distributed=world_size > 1,
        repeated_aug=cfg.repeated_aug,
        seed=cfg.seed,
        drop_last=True,
    )
    if len(loader) == 0:
        raise DataError(
            f"{len(ds)} training images make no full batch of {cfg.batch_size} per process"
        )
    return EpochLoader(loader, data.set_epoch)


def eval_loader(
    ds: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> DataLoader:
    """Plain-order evaluation loader over this process's shard (no padding, no duplicates)."""
    shard = ds if world_size == 1 else Subset(ds, list(range(rank, len(ds), world_size)))
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
