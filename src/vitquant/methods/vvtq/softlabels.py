"""Multi-crop soft labels in the FKD format, and the dataset that replays them.

FKD ("A Fast Knowledge Distillation Framework for Visual Recognition", Shen & Xing, ECCV 2022,
arXiv 2112.01528) runs the teacher once, offline, on many random-resized crops of every training
image and stores, per image, the crop coordinates, the flip flag and the teacher's top-k soft
labels. Training (VVTQ, Huang et al., TMLR 2024, arXiv 2307.00331) then samples a few of the
recorded crops per image, replays exactly those crops, and minimises the soft cross-entropy
against the stored labels; no live teacher is needed.

Folder layout (no pickles: safetensors only)::

    <folder>/meta.json                      {"format": "vitquant-fkd", "version": 1, "num_classes",
                                             "num_crops", "topk", "img_size", "num_images", ...}
    <folder>/<shard>/<key>.safetensors      per image: coords [K, 4] float32 (top, left, height,
                                             width as fractions of the image), flip [K] uint8,
                                             topk_index [K, k] int64, topk_prob [K, k] float32

``key`` is the dataset index, zero-padded; images are sharded 1000 per sub-folder.
Crops are replayed by :func:`resized_crop` (bilinear, antialiased) from the recorded coordinates,
so the crop a model trains on is the one the teacher labelled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from vitquant._atomic import atomic_write
from vitquant.errors import ConfigError, DataError

__all__ = [
    "FORMAT",
    "SoftLabelRecord",
    "sample_crop",
    "coords_to_box",
    "resized_crop",
    "expand_topk",
    "record_path",
    "write_record",
    "read_record",
    "read_meta",
    "check_source",
    "generate_softlabels",
    "MultiCropSoftLabelDataset",
]

FORMAT = "vitquant-fkd"
VERSION = 1
SHARD = 1000
LABEL_TYPES = ("marginal", "renorm", "hard")


@dataclass
class SoftLabelRecord:
    """The recorded crops and soft labels of one image.

    Attributes:
        coords: ``[K, 4]`` float32 ``(top, left, height, width)`` as fractions of the image size.
        flip: ``[K]`` uint8, 1 where the crop is mirrored horizontally.
        topk_index: ``[K, k]`` int64 class indices, most probable first.
        topk_prob: ``[K, k]`` float32 teacher probabilities of those classes.
    """

    coords: Tensor
    flip: Tensor
    topk_index: Tensor
    topk_prob: Tensor

    def to_dict(self) -> dict[str, Tensor]:
        return {
            "coords": self.coords.float().contiguous(),
            "flip": self.flip.to(torch.uint8).contiguous(),
            "topk_index": self.topk_index.long().contiguous(),
            "topk_prob": self.topk_prob.float().contiguous(),
        }


# --- crops ------------------------------------------------------------------------------------
def sample_crop(
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """A random-resized-crop box ``(top, left, h, w)`` (Inception / torchvision's sampling).

    Ten tries at a random area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``;
    if none fits, a centre crop clamped to ``ratio``.
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def coords_to_box(coords: Tensor, height: int, width: int) -> tuple[int, int, int, int]:
    """Recorded fractional ``(top, left, h, w)`` back to pixels of a ``height×width`` image."""
    t, l, h, w = (float(v) for v in coords.tolist())
    top, left = int(round(t * height)), int(round(l * width))
    h_px, w_px = max(1, int(round(h * height))), max(1, int(round(w * width)))
    return top, left, min(h_px, height - top), min(w_px, width - left)


def resized_crop(img: Tensor, box: tuple[int, int, int, int], size: int, flip: bool) -> Tensor:
    """Crops ``img [C, H, W]`` to ``box`` and resizes to ``size×size`` (bilinear, antialiased)."""
    top, left, h, w = box
    crop = img[:, top : top + h, left : left + w].unsqueeze(0).float()
    if (h, w) != (size, size):
        crop = F.interpolate(
            crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    crop = crop[0]
    return torch.flip(crop, dims=[-1]) if flip else crop


def expand_topk(
    topk_index: Tensor, topk_prob: Tensor, num_classes: int, label_type: str = "marginal"
) -> Tensor:
    """Dense ``[K, num_classes]`` targets from top-k soft labels.

    Args:
        topk_index, topk_prob: ``[K, k]``.
        num_classes: classes of the model.
        label_type: ``"marginal"`` (FKD's marginal smoothing: the top-k probabilities, the rest of
            the mass spread evenly over the other classes), ``"renorm"`` (top-k renormalised to
            sum to one) or ``"hard"`` (one-hot of the top class).
    """
    if label_type not in LABEL_TYPES:
        raise ConfigError(f"soft label type must be one of {', '.join(LABEL_TYPES)}")
    k = topk_index.shape[-1]
    out = torch.zeros(topk_index.shape[0], num_classes, dtype=torch.float32)
    prob = topk_prob.float()
    if label_type == "hard":
        return out.scatter_(1, topk_index[:, :1].long(), 1.0)
    if label_type == "renorm":
        prob = prob / prob.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return out.scatter_(1, topk_index.long(), prob)
    rest = (1.0 - prob.sum(dim=1, keepdim=True)).clamp(min=0.0)
    if num_classes > k:
        out += rest / (num_classes - k)
    return out.scatter_(1, topk_index.long(), prob)


# --- files ------------------------------------------------------------------------------------
def record_path(folder: str, index: int) -> str:
    """Path of the record of dataset image ``index``."""
    return os.path.join(folder, f"{index // SHARD:05d}", f"{index:08d}.safetensors")


def write_record(folder: str, index: int, record: SoftLabelRecord) -> None:
    """Writes one image's record atomically."""
    from safetensors.torch import save

    data = save(record.to_dict())
    atomic_write(record_path(folder, index), lambda f: f.write(data), sync=False)


def read_record(folder: str, index: int) -> SoftLabelRecord:
    """Reads one image's record; a missing or corrupt file raises :class:`DataError`."""
    from safetensors.torch import load_file

    path = record_path(folder, index)
    if not os.path.isfile(path):
        raise DataError(f"soft-label folder {folder} has no record for image {index} ({path})")
    try:
        d = load_file(path)
        return SoftLabelRecord(d["coords"], d["flip"], d["topk_index"], d["topk_prob"])
    except Exception as e:  # noqa: BLE001 - any parse failure is a data error
        raise DataError(f"soft-label record {path} is unreadable: {e}") from None


def write_meta(folder: str, meta: dict[str, Any]) -> None:
    """Writes ``meta.json`` atomically."""

    text = json.dumps(meta, indent=1, sort_keys=True).encode()
    atomic_write(os.path.join(folder, "meta.json"), lambda f: f.write(text))


def read_meta(folder: str) -> dict[str, Any]:
    """Reads and checks ``meta.json`` of a soft-label folder."""
    path = os.path.join(folder, "meta.json")
    if not os.path.isfile(path):
        raise DataError(
            f"{folder} is not a soft-label folder (no meta.json); make one with "
            f"`vitquant softlabels`"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable: {e}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} soft-label folder")
    if int(meta.get("version", 0)) > VERSION:
        raise DataError(
            f"{path} has format version {meta['version']}; this vitquant reads {VERSION}"
        )
    return meta


def check_source(
    meta: dict[str, Any],
    folder: str,
    *,
    data_path: str,
    split: str,
    train_subset: int = 0,
    seed: int = 0,
    img_size: int | None = None,
) -> None:
    """Checks that a soft-label folder was made for the data a run trains on.

    ``meta["source"]`` (written by ``vitquant softlabels``) records the dataset, split, subset and
    seed the images came from; a folder without it is checked on its crop size only. The image
    count and classes are checked by :class:`MultiCropSoftLabelDataset`.

    Raises:
        DataError: one line listing each difference, folder value vs. run value.
    """
    src = meta.get("source") or {}
    problems: list[str] = []

    def differ(what: str, theirs: Any, mine: Any) -> None:
        problems.append(f"{what} {theirs} (folder) vs {mine} (run)")

    if "data_path" in src:
        name = os.path.basename(str(src["data_path"]).rstrip("/"))
        if name != os.path.basename(str(data_path).rstrip("/")):
            differ("dataset", src["data_path"], data_path)
    if "split" in src and src["split"] != split:
        differ("split", src["split"], split)
    if "train_subset" in src:
        subset = int(src["train_subset"] or 0)
        if subset != int(train_subset or 0):
            differ("train_subset", subset, train_subset)
        elif subset:
            made_with = src.get("seed", meta.get("seed"))
            if made_with is not None and int(made_with) != int(seed):
                differ("seed of the subset", made_with, seed)
    if img_size and meta.get("img_size") and int(meta["img_size"]) != int(img_size):
        differ("crop size", meta["img_size"], img_size)
    if problems:
        raise DataError(
            f"soft-label folder {folder} was made for other data: {'; '.join(problems)}"
        )


# --- generation -------------------------------------------------------------------------------
def _image_of(item: Any) -> Tensor:
    img = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(img, Tensor) or img.dim() != 3:
        raise DataError("soft labels need a dataset returning (image tensor [C, H, W], label)")
    return img


@torch.no_grad()
def generate_softlabels(
    teacher: nn.Module,
    dataset: Dataset,
    folder: str,
    num_crops: int = 10,
    topk: int = 5,
    img_size: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Runs ``teacher`` on ``num_crops`` random-resized crops of every image and writes a folder.

    Args:
        teacher: a classifier (put in eval mode here); its output size is ``num_classes``.
        dataset: returns ``(image [C, H, W], label)`` without random augmentation (normalised,
            not yet cropped); images may differ in size.
        folder: output folder (created; existing records are overwritten).
        num_crops: crops recorded per image (FKD: 500).
        topk: soft labels kept per crop (FKD: 5); ``topk >= num_classes`` keeps all.
        img_size: crop output size (default: the image height).
        scale, ratio: random-resized-crop ranges.
        batch_size: crops per teacher forward.
        seed: seed of the crop sampling.
        device: where the teacher runs.
        progress: called with ``(images done, total)``.

    Returns:
        The folder's metadata.
    """
    if num_crops < 1 or topk < 1:
        raise ConfigError("num_crops and topk must be >= 1")
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("cannot make soft labels for an empty dataset")
    teacher = teacher.eval().to(device)
    gen = torch.Generator().manual_seed(seed)
    num_classes: int | None = None
    size = img_size
    pending: list[tuple[int, Tensor, Tensor, list[Tensor]]] = []
    queued = 0

    def flush() -> None:
        nonlocal num_classes, pending, queued
        if not pending:
            return
        crops = torch.stack([c for _, _, _, cs in pending for c in cs]).to(device)
        probs = torch.cat(
            [
                teacher(crops[i : i + batch_size]).float().softmax(-1)
                for i in range(0, len(crops), batch_size)
            ]
        ).cpu()
        num_classes = probs.shape[1]
        k = min(topk, num_classes)
        top_p, top_i = probs.topk(k, dim=1)
        at = 0
        for index, coords, flips, cs in pending:
            sl = slice(at, at + len(cs))
            write_record(folder, index, SoftLabelRecord(coords, flips, top_i[sl], top_p[sl]))
            at += len(cs)
        pending, queued = [], 0

    for index in range(n):
        img = _image_of(dataset[index])
        _, h, w = img.shape
        size = size or h
        coords, flips, crops = [], [], []
        for _ in range(num_crops):
            box = sample_crop(h, w, scale, ratio, gen)
            flip = bool(torch.rand(1, generator=gen) < 0.5)
            coords.append(torch.tensor([box[0] / h, box[1] / w, box[2] / h, box[3] / w]))
            flips.append(flip)
            crops.append(resized_crop(img, coords_to_box(coords[-1], h, w), size, flip))
        pending.append(
            (index, torch.stack(coords).float(), torch.tensor(flips, dtype=torch.uint8), crops)
        )
        queued += num_crops
        if queued >= batch_size:
            flush()
        if progress is not None:
            progress(index + 1, n)
    flush()
    assert num_classes is not None
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_images": n,
        "num_classes": num_classes,
        "num_crops": num_crops,
        "topk": min(topk, num_classes),
        "img_size": size,
        "scale": list(scale),
        "ratio": list(ratio),
        "seed": seed,
    }
    write_meta(folder, meta)
    return meta


# --- training-time replay ---------------------------------------------------------------------
class MultiCropSoftLabelDataset(Dataset):
    """Replays ``num_crops`` recorded crops per image with their soft labels.

    Each item is ``(crops [num_crops, C, S, S], targets [num_crops, num_classes])``. The crops
    used in an epoch are drawn without replacement from the recorded ones by a generator seeded
    with ``(seed, epoch, index)``, so a resumed run and every worker see the same crops.

    Args:
        dataset: the base dataset (same order and transform as when the labels were made).
        folder: a soft-label folder.
        num_crops: crops per image and step (at most the recorded number).
        num_classes: the student's classes; must equal the folder's.
        label_type: see :func:`expand_topk`.
        seed: seed of the crop choice.
        check_files: verify at construction that every image has a record.

    Raises:
        DataError: the folder does not match the dataset (image count, missing records) or the
            model (number of classes).
    """

    def __init__(
        self,
        dataset: Dataset,
        folder: str,
        num_crops: int = 4,
        num_classes: int | None = None,
        label_type: str = "marginal",
        seed: int = 0,
        check_files: bool = True,
    ) -> None:
        self.dataset = dataset
        self.folder = folder
        self.meta = read_meta(folder)
        n = len(dataset)  # type: ignore[arg-type]
        if int(self.meta["num_images"]) != n:
            raise DataError(
                f"soft-label folder {folder} has {self.meta['num_images']} images but the "
                f"dataset {n}"
            )
        if num_classes is not None and int(self.meta["num_classes"]) != num_classes:
            raise DataError(
                f"soft labels in {folder} have {self.meta['num_classes']} classes but the model "
                f"{num_classes}"
            )
        if not 1 <= num_crops <= int(self.meta["num_crops"]):
            raise ConfigError(
                f"num_crops must be in 1..{self.meta['num_crops']} (crops recorded in {folder})"
            )
        if label_type not in LABEL_TYPES:
            raise ConfigError(f"soft label type must be one of {', '.join(LABEL_TYPES)}")
        if check_files:
            missing = [i for i in range(n) if not os.path.isfile(record_path(folder, i))]
            if missing:
                raise DataError(
                    f"soft-label folder {folder} misses {len(missing)} of {n} images (first: "
                    f"{missing[0]})"
                )
        self.num_crops = num_crops
        self.num_classes = int(self.meta["num_classes"])
        self.img_size = int(self.meta["img_size"])
        self.label_type = label_type
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the crops of ``epoch`` (call before each epoch, as a sampler's)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def crop_indices(self, index: int, recorded: int, seed: int | None = None) -> Tensor:
        """Which recorded crops image ``index`` uses this epoch (or for the key's ``seed``)."""
        if seed is None:
            seed = (self.seed * 1_000_003 + self.epoch) * 2_000_003 + index
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(recorded, generator=g)[: self.num_crops]

    def __getitem__(self, key: Any) -> tuple[Tensor, Tensor]:
        # samplers of vitquant.data pass a SampleKey (index, seed, epoch, repeat): the crop choice
        # then follows the key (same crops after a resume, in any worker)
        if isinstance(key, tuple):
            from vitquant.data.keys import sample_seed

            index = int(key[0])
            fields = [int(v) for v in key[1:]] + [0] * (4 - len(key))
            gen_seed: int | None = sample_seed(fields[0], fields[1], index, fields[2])
        else:
            index, gen_seed = int(key), None
        img = _image_of(self.dataset[index])
        rec = read_record(self.folder, index)
        if rec.topk_index.numel() and int(rec.topk_index.max()) >= self.num_classes:
            raise DataError(
                f"soft-label record of image {index} names a class >= {self.num_classes}"
            )
        _, h, w = img.shape
        chosen = self.crop_indices(index, rec.coords.shape[0], gen_seed)
        crops = [
            resized_crop(img, coords_to_box(rec.coords[c], h, w), self.img_size, bool(rec.flip[c]))
            for c in chosen.tolist()
        ]
        targets = expand_topk(
            rec.topk_index[chosen], rec.topk_prob[chosen], self.num_classes, self.label_type
        )
        return torch.stack(crops), targets
