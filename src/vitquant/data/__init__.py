"""Datasets, transforms and loaders (image files through torchvision's ``make_dataset`` and
``transforms.v2``; the in-memory formats need no torchvision).

* :func:`build_dataset` / :func:`dataset_info`: one entry point for built-in names
  (``fashion-mnist``, ``digits``, ``cifar10``, ``cifar100``) and folders whose layout is detected:
  image folders (:mod:`.folders`), zipped ImageNet with map files (:mod:`.zipdata`), IDX files
  (:mod:`.idx`), CIFAR python batches read without unpickling code (:mod:`.cifar`).
* Transforms: PIL for photos (:mod:`.transforms`, DeiT's random resized crop and centre-crop
  evaluation), uint8 tensors for small in-memory datasets (:mod:`.tensor_transforms`).
* :func:`build_loader`, :func:`set_epoch`, :class:`DistributedSampler`, :class:`RASampler`:
  order and augmentation depend only on ``(seed, epoch, index)`` (:mod:`.keys`), so interrupted
  runs resume exactly.
* :func:`subset`: a fixed random subset, for calibration and quick runs.

Example:
    >>> from vitquant.data import build_dataset, build_loader, set_epoch
    >>> train = build_dataset("fashion-mnist", "train")
    >>> loader = build_loader(train, 128, train=True, seed=0)
    >>> set_epoch(loader, 0)
    >>> images, labels = next(iter(loader))  # [128, 1, 28, 28], [128]
"""

from __future__ import annotations

from vitquant.data.base import DatasetInfo, Subset, TensorImageDataset, VisionDataset, subset
from vitquant.data.cifar import RestrictedUnpickler, read_batch
from vitquant.data.factory import OPTIONS, build_dataset, canonical_split, dataset_info
from vitquant.data.folders import ImageFolderDataset
from vitquant.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx
from vitquant.data.keys import SampleKey, sample_seed
from vitquant.data.loader import build_loader, set_epoch, world_info
from vitquant.data.samplers import DistributedSampler, RASampler
from vitquant.data.tensor_transforms import AUGMENTS, TensorTransform
from vitquant.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    PilEvalTransform,
    PilTrainTransform,
)
from vitquant.data.zipdata import ZipImageDataset, read_map

__all__ = [
    "build_dataset",
    "dataset_info",
    "canonical_split",
    "OPTIONS",
    "DatasetInfo",
    "VisionDataset",
    "TensorImageDataset",
    "ImageFolderDataset",
    "ZipImageDataset",
    "Subset",
    "subset",
    "build_loader",
    "set_epoch",
    "world_info",
    "DistributedSampler",
    "RASampler",
    "SampleKey",
    "sample_seed",
    "AUGMENTS",
    "TensorTransform",
    "PilTrainTransform",
    "PilEvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "read_idx",
    "read_map",
    "read_batch",
    "RestrictedUnpickler",
]
