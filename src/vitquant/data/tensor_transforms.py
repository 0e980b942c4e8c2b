"""Fast transforms for small in-memory datasets (IDX, CIFAR, digits): uint8 tensors, no PIL.

A sample is a uint8 tensor ``[C, H, W]``. The augmentations are the usual ones of small-image
training:

* ``"default"``: random crop with zero padding plus horizontal flip (the CIFAR recipe of He et
  al., "Deep residual learning for image recognition", CVPR 2016: pad 4 on 32x32). For
  Fashion-MNIST the default is pad 2 and a flip, for the 8x8 digits pad 1 and no flip (a flipped
  digit is another symbol);
* ``"rrc"``: DeiT's random resized crop (same box sampler as the PIL path) and flip;
* ``"none"``: the evaluation transform.

The image is then resized to ``img_size`` when that differs from the native size (bilinear,
antialiased), its channels converted (grey to RGB by repetition, RGB to grey with the ITU-R 601
luma weights that PIL uses) and normalised. Each sample costs a few tensor operations on a
28x28 array and no PIL decoding, so an epoch of Fashion-MNIST stays cheap on one core.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitquant.data.transforms import check_crop_args, coin, sample_rrc_box
from vitquant.errors import ConfigError

__all__ = ["AUGMENTS", "TensorTransform", "resize_square", "convert_channels"]

AUGMENTS = ("default", "none", "rrc")
_LUMA = (0.299, 0.587, 0.114)


def resize_square(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of a ``[C, H, W]`` tensor; returns float32."""
    hw = (size, size) if isinstance(size, int) else size
    x = x.to(torch.float32)
    if tuple(x.shape[-2:]) == hw:
        return x
    return F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]


def convert_channels(x: Tensor, in_chans: int) -> Tensor:
    """Turns a ``[C, H, W]`` tensor into ``in_chans`` channels (1 <-> 3)."""
    c = x.shape[0]
    if c == in_chans:
        return x
    if c == 1:
        return x.expand(in_chans, -1, -1)
    if c == 3 and in_chans == 1:
        w = torch.tensor(_LUMA, dtype=torch.float32).view(3, 1, 1)
        return (x.to(torch.float32) * w).sum(0, keepdim=True)
    raise ConfigError(f"cannot convert images with {c} channels to {in_chans} channels")


def _shift_crop(x: Tensor, dy: int, dx: int) -> Tensor:
    """The crop of ``x`` zero-padded on all sides, moved by ``(dy, dx)``; same shape as ``x``."""
    _, h, w = x.shape
    out = torch.zeros_like(x)
    y0, y1 = max(0, dy), min(h, h + dy)
    x0, x1 = max(0, dx), min(w, w + dx)
    if y0 < y1 and x0 < x1:
        out[:, y0 - dy : y1 - dy, x0 - dx : x1 - dx] = x[:, y0:y1, x0:x1]
    return out


class TensorTransform:
    """Augmentation (or evaluation transform) of a uint8 ``[C, H, W]`` tensor.

    Args:
        img_size: output side.
        mean: per-channel mean of the ``[0, 1]`` pixels (``in_chans`` values).
        std: per-channel std.
        in_chans: channels of the output.
        augment: ``"default"`` (padded random crop + flip), ``"rrc"`` or ``"none"``.
        pad: zero padding of the random crop, in native pixels.
        hflip: probability of a horizontal flip (0: never).
        scale: area range of ``"rrc"``.
        ratio: aspect-ratio range of ``"rrc"``.
        crop_pct: evaluation crop fraction (1: resize to ``img_size``, no crop).

    Raises:
        ConfigError: unknown augmentation or impossible sizes.
    """

    def __init__(
        self,
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        in_chans: int = 1,
        augment: str = "none",
        pad: int = 2,
        hflip: float = 0.5,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        crop_pct: float = 1.0,
    ) -> None:
        if augment not in AUGMENTS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        check_crop_args(img_size, crop_pct, scale, ratio)
        if pad < 0:
            raise ConfigError(f"pad must be >= 0, got {pad}")
        self.img_size = int(img_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.in_chans = int(in_chans)
        self.augment = augment
        self.pad = int(pad)
        self.hflip = float(hflip)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.crop_pct = float(crop_pct)
        self._scale = torch.tensor([1.0 / (255.0 * v) for v in self.std]).view(-1, 1, 1)
        self._shift = torch.tensor([-m / v for m, v in zip(self.mean, self.std)]).view(-1, 1, 1)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.augment == "default":
            x = self._padded_crop(x, generator)
        elif self.augment == "rrc":
            _, h, w = x.shape
            left, top, cw, ch = sample_rrc_box(w, h, self.scale, self.ratio, generator)
            x = resize_square(x[:, top : top + ch, left : left + cw], self.img_size)
        else:
            x = self._center(x)
        if self.augment != "none" and self.hflip > 0 and coin(generator, self.hflip):
            x = x.flip(-1)
        x = resize_square(x, self.img_size) if x.shape[-1] != self.img_size else x
        x = convert_channels(x, self.in_chans)
        # (x / 255 - mean) / std as one multiply-add; a fresh float32 tensor (never the dataset's)
        x = x.to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        return x.mul_(self._scale).add_(self._shift)

    def _padded_crop(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        if self.pad == 0:
            return x
        d = torch.randint(0, 2 * self.pad + 1, (2,), generator=generator).tolist()
        return _shift_crop(x, d[0] - self.pad, d[1] - self.pad)

    def _center(self, x: Tensor) -> Tensor:
        _, h, w = x.shape
        if h == w == self.img_size:
            return x
        resize_to = int(self.img_size / self.crop_pct)
        short, long_ = min(h, w), max(h, w)
        new_long = int(resize_to * long_ / short)
        hw = (resize_to, new_long) if h <= w else (new_long, resize_to)
        if (h, w) != hw:
            x = resize_square(x, hw)
        h, w = x.shape[-2:]
        s = self.img_size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return x[:, top : top + s, left : left + s]
