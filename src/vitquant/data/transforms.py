"""Image transforms on PIL images: torchvision's ``transforms.v2`` ops, driven by keyed randomness.

Training follows the Inception-style augmentation used by DeiT (Touvron et al., 2021, arXiv
2012.12877) and timm: a random resized crop (Szegedy et al., "Going deeper with convolutions",
2015: area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``, ten tries,
then a centre crop) and a horizontal flip. Evaluation resizes the shorter side to
``int(img_size / crop_pct)`` and takes the centre crop (DeiT: ``crop_pct = 0.875``;
FasterTransformer's ViT: ``crop_pct = 1`` and mean = std = 0.5).

The pixel work is torchvision's (``torchvision.transforms.v2.functional``: ``resized_crop``,
``horizontal_flip``, ``resize``, ``center_crop``, ``pil_to_tensor``, ``to_dtype``,
``normalize``), imported through :func:`vitquant._optional.import_torchvision` when a transform is
built, so a missing or mismatched torchvision is a clear error there. What stays here is the
randomness: torchvision's random transforms draw from the global RNG, while every random draw
here takes an optional ``torch.Generator`` (the datasets pass the generator of the sample's key,
:mod:`vitquant.data.keys`), so the augmentation of a sample is reproducible and a resumed run
sees the same crops. The numbers are drawn in the same order as torchvision's
``RandomResizedCrop`` and ``RandomHorizontalFlip``, so with the global RNG both give the same
crops (the tests check it). The box sampler and the coin need no torchvision (the uint8 tensor
transforms of :mod:`vitquant.data.tensor_transforms` use them).
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from vitquant._optional import import_torchvision
from vitquant.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "INTERPOLATIONS",
    "resolve_norm",
    "check_crop_args",
    "sample_rrc_box",
    "coin",
    "PilTrainTransform",
    "PilEvalTransform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
_NORM_PRESETS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": (INCEPTION_MEAN, INCEPTION_STD),
    "half": (INCEPTION_MEAN, INCEPTION_STD),
}
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
"""Names of the resampling filters (torchvision's ``InterpolationMode`` values; PIL's filters)."""


def resolve_norm(
    mean: Sequence[float] | str | None,
    std: Sequence[float] | str | None,
    default: tuple[Sequence[float], Sequence[float]],
    in_chans: int,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std from user options.

    Args:
        mean: numbers, a preset (``"imagenet"``, ``"inception"``/``"half"`` = 0.5,
            ``"dataset"``) or ``None`` (the dataset's own statistics, ``default``).
        std: same choices as ``mean``; a preset name given for ``mean`` only applies to both.
        default: the dataset's ``(mean, std)``.
        in_chans: number of channels of the output; one value is repeated over the channels,
            three values become their average for one channel.

    Returns:
        ``(mean, std)``, each a tuple of ``in_chans`` floats.

    Raises:
        ConfigError: unknown preset, wrong number of values or a std that is not positive.
    """

    def preset(v: Sequence[float] | str | None, which: int) -> Sequence[float] | None:
        if v is None or v == "dataset":
            return default[which]
        if isinstance(v, str):
            if v not in _NORM_PRESETS:
                known = ", ".join([*_NORM_PRESETS, "dataset"])
                raise ConfigError(f"unknown normalisation {v!r}; known: {known}")
            return _NORM_PRESETS[v][which]
        return v

    if isinstance(mean, str) and std is None:
        std = mean
    out = []
    for which, v in enumerate((mean, std)):
        vals = [float(x) for x in preset(v, which)]  # type: ignore[union-attr]
        if len(vals) == in_chans:
            pass
        elif len(vals) == 1:
            vals = vals * in_chans
        elif in_chans == 1 and len(vals) == 3:
            vals = [sum(vals) / 3.0]
        else:
            name = "mean" if which == 0 else "std"
            raise ConfigError(
                f"{name} has {len(vals)} values but the images have {in_chans} channels"
            )
        out.append(tuple(vals))
    if any(s <= 0 for s in out[1]):
        raise ConfigError(f"std must be positive, got {out[1]}")
    return out[0], out[1]


def check_crop_args(
    img_size: int, crop_pct: float, scale: Sequence[float], ratio: Sequence[float]
) -> None:
    """Raises ConfigError for an impossible size, crop fraction, scale or ratio range."""
    if int(img_size) < 1:
        raise ConfigError(f"img_size must be positive, got {img_size}")
    if not 0.0 < crop_pct <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"scale must be (low, high) with 0 < low <= high <= 1, got {scale}")
    if len(ratio) != 2 or not 0.0 < ratio[0] <= ratio[1]:
        raise ConfigError(f"ratio must be (low, high) with 0 < low <= high, got {ratio}")


def sample_rrc_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Samples the box of a random resized crop.

    Args:
        width: image width.
        height: image height.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        generator: source of randomness (``None``: torch's global RNG).

    Returns:
        ``(left, top, crop_width, crop_height)`` in pixels.
    """
    area = float(width * height)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=generator).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return left, top, w, h
    # ten misses: the largest centred crop whose aspect ratio lies in the range
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def coin(generator: torch.Generator | None, p: float = 0.5) -> bool:
    """True with probability ``p`` (one draw, as torchvision's flip)."""
    return bool(torch.rand(1, generator=generator).item() < p)


def _functional() -> types.ModuleType:
    """``torchvision.transforms.v2.functional`` (the clear error of the importer when missing)."""
    import_torchvision()
    from torchvision.transforms.v2 import functional

    return functional


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")


def _convert_mode(img: Image.Image, in_chans: int) -> Image.Image:
    mode = "L" if in_chans == 1 else "RGB"
    return img if img.mode == mode else img.convert(mode)


def _to_normalized_tensor(
    F: types.ModuleType, img: Image.Image, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """float32 ``[C, H, W]``: ``(pixels / 255 - mean) / std`` (ToImage, ToDtype, Normalize)."""
    x = F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)
    return F.normalize(x, list(mean), list(std))


class PilTrainTransform:
    """Random resized crop, horizontal flip, to tensor, normalise (DeiT's training transform).

    Args:
        img_size: output side.
        mean: per-channel mean (see :func:`resolve_norm`).
        std: per-channel std.
        in_chans: 3 (RGB) or 1 (grey).
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio.
        hflip: probability of a horizontal flip.
        interpolation: ``"bicubic"`` (DeiT), ``"bilinear"`` or ``"nearest"``.
        augment: ``"rrc"`` (the above) or ``"none"`` (then this is the evaluation transform).
        crop_pct: evaluation crop fraction, used when ``augment="none"``.

    Raises:
        ConfigError: impossible sizes or ranges, an unknown interpolation, or torchvision missing
            or not the one made for the installed torch
            (:class:`~vitquant._optional.MissingDependencyError`).
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        in_chans: int = 3,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        augment: str = "rrc",
        crop_pct: float = 0.875,
    ) -> None:
        check_crop_args(img_size, crop_pct, scale, ratio)
        _check_interpolation(interpolation)
        self.img_size = int(img_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = in_chans
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip = float(hflip)
        self.interpolation = interpolation
        self.augment = augment
        self.eval = PilEvalTransform(
            img_size, mean, std, in_chans=in_chans, crop_pct=crop_pct, interpolation=interpolation
        )

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        if self.augment == "none":
            return self.eval(img)
        F = _functional()
        img = _convert_mode(img, self.in_chans)
        left, top, w, h = sample_rrc_box(img.width, img.height, self.scale, self.ratio, generator)
        size = [self.img_size, self.img_size]
        img = F.resized_crop(img, top, left, h, w, size, interpolation=self.interpolation)
        if self.hflip > 0 and coin(generator, self.hflip):
            img = F.horizontal_flip(img)
        return _to_normalized_tensor(F, img, self.mean, self.std)


class PilEvalTransform:
    """Resize the shorter side to ``int(img_size / crop_pct)``, centre crop, to tensor, normalise.

    Args:
        img_size: output side.
        mean: per-channel mean.
        std: per-channel std.
        in_chans: 3 (RGB) or 1 (grey).
        crop_pct: fraction of the resized image kept by the centre crop (DeiT: 0.875).
        interpolation: ``"bicubic"``, ``"bilinear"`` or ``"nearest"``.

    Raises:
        ConfigError: impossible size or crop fraction, unknown interpolation, or torchvision
            missing or mismatched (as :class:`PilTrainTransform`).
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        in_chans: int = 3,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
    ) -> None:
        check_crop_args(img_size, crop_pct, (1.0, 1.0), (1.0, 1.0))
        _check_interpolation(interpolation)
        _functional()  # a missing or mismatched torchvision fails here, not in a loader worker
        self.img_size = int(img_size)
        self.resize_to = int(img_size / crop_pct)
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = in_chans
        self.crop_pct = crop_pct
        self.interpolation = interpolation

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Tensor:
        F = _functional()
        img = _convert_mode(img, self.in_chans)
        img = F.resize(img, [self.resize_to], interpolation=self.interpolation)
        img = F.center_crop(img, [self.img_size, self.img_size])
        return _to_normalized_tensor(F, img, self.mean, self.std)
