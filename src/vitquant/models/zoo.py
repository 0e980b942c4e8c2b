"""Model entrypoints: timm's ViT and DeiT names, the Google names of the FasterTransformer seed
(``ViT-B_16`` ...), and small configurations for 28x28 and 32x32 images (demo and tests).

Each entrypoint only states its architecture; :func:`_create` builds it. The R50+ViT-B_16 hybrid
of the FasterTransformer seed is not provided yet.
"""

from __future__ import annotations

from typing import Any

from vitquant.models._factory import MODELS, register_model
from vitquant.models.vit import VisionTransformer

__all__: list[str] = []

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def _create(
    arch: dict[str, Any],
    kwargs: dict[str, Any],
    mean: tuple[float, ...] = HALF,
    std: tuple[float, ...] = HALF,
    crop_pct: float = 0.9,
    interpolation: str = "bicubic",
) -> VisionTransformer:
    """Builds a :class:`VisionTransformer` from an architecture dict and user overrides."""
    kwargs = dict(kwargs)
    kwargs.pop("pretrained", None)
    model = VisionTransformer(**{**arch, **kwargs})
    img = model.patch_embed.img_size
    in_chans = model.patch_embed.proj.in_channels
    if in_chans != len(mean):
        mean, std = (sum(mean) / len(mean),) * in_chans, (sum(std) / len(std),) * in_chans
    model.default_cfg = {
        "input_size": (in_chans, img[0], img[1]),
        "mean": tuple(mean),
        "std": tuple(std),
        "crop_pct": crop_pct if img[0] >= 224 else 1.0,
        "interpolation": interpolation,
        "num_classes": model.num_classes,
        "classifier": ("head", "head_dist") if model.distilled else ("head",),
    }
    return model


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}


def _vit_entry(name: str, size: str, patch: int, img: int, **extra: Any) -> None:
    def entry(**kwargs: Any) -> VisionTransformer:
        arch = dict(img_size=img, patch_size=patch, **_SIZES[size], **extra)
        return _create(arch, kwargs, crop_pct=0.9 if img == 224 else 1.0)

    entry.__name__ = name
    entry.__doc__ = f"ViT-{size} /{patch} at {img}x{img} (timm's ``{name}``)."
    MODELS.add(name, entry)


for _size in ("tiny", "small", "base", "large"):
    for _img in (224, 384):
        _vit_entry(f"vit_{_size}_patch16_{_img}", _size, 16, _img)
for _img in (224, 384):
    _vit_entry(f"vit_base_patch32_{_img}", "base", 32, _img)
_vit_entry("vit_large_patch32_384", "large", 32, 384)
_vit_entry("vit_huge_patch14_224", "huge", 14, 224)


def _google_entry(name: str, size: str, patch: int) -> None:
    def entry(**kwargs: Any) -> VisionTransformer:
        kwargs.setdefault("img_size", 224)
        arch = dict(patch_size=patch, **_SIZES[size])
        return _create(arch, kwargs, crop_pct=1.0, interpolation="bilinear")

    entry.__name__ = name
    entry.__doc__ = (
        f"Google's {name} (as FasterTransformer names it); default 224, pass img_size=384."
    )
    MODELS.add(name, entry)


for _name, _size, _patch in (
    ("ViT-B_16", "base", 16),
    ("ViT-B_32", "base", 32),
    ("ViT-L_16", "large", 16),
    ("ViT-L_32", "large", 32),
    ("ViT-H_14", "huge", 14),
):
    _google_entry(_name, _size, _patch)


def _deit_entry(size: str, distilled: bool) -> None:
    name = f"deit_{size}{'_distilled' if distilled else ''}_patch16_224"

    def entry(**kwargs: Any) -> VisionTransformer:
        arch = dict(img_size=224, patch_size=16, distilled=distilled, **_SIZES[size])
        return _create(arch, kwargs, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)

    entry.__name__ = name
    entry.__doc__ = f"DeiT-{size}{' distilled' if distilled else ''} /16 at 224 (timm's name)."
    MODELS.add(name, entry)


for _size in ("tiny", "small", "base"):
    for _dist in (False, True):
        _deit_entry(_size, _dist)


# --- small configurations for 28x28 (Fashion-MNIST) and 32x32 (CIFAR) images ------------------
_SMALL = {
    "nano": dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0),
    "micro": dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),  # ViT-Ti's shape
}


@register_model
def vit_nano_patch4_28(**kwargs: Any) -> VisionTransformer:
    """A 2-block ViT for 28x28 grayscale images: the unit tests' model."""
    arch = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, **_SMALL["nano"])
    return _create(arch, kwargs, mean=(0.2860,), std=(0.3530,))


@register_model
def vit_micro_patch4_28(**kwargs: Any) -> VisionTransformer:
    """A 6-block ViT for Fashion-MNIST with 4x4 patches (49 tokens): slower, more accurate."""
    arch = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, **_SMALL["micro"])
    return _create(arch, kwargs, mean=(0.2860,), std=(0.3530,))


@register_model
def vit_micro_patch7_28(**kwargs: Any) -> VisionTransformer:
    """The demo's ViT for Fashion-MNIST: 7x7 patches (16 tokens + class token), 0.8M parameters."""
    arch = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, **_SMALL["micro"])
    return _create(arch, kwargs, mean=(0.2860,), std=(0.3530,))


@register_model
def vit_tiny_patch7_28(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti's width and depth (192, 12 blocks, 3 heads, MLP 4x; 5.4M parameters) on 28x28
    grayscale images with 7x7 patches: the PTQ benchmarks' ViT-Ti-size model."""
    arch = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, **_SMALL["tiny"])
    return _create(arch, kwargs, mean=(0.2860,), std=(0.3530,))


@register_model
def deit_nano_distilled_patch4_28(**kwargs: Any) -> VisionTransformer:
    """A 2-block distilled DeiT for 28x28 grayscale images (tests of DeiT distillation)."""
    arch = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, distilled=True, **_SMALL["nano"]
    )
    return _create(arch, kwargs, mean=(0.2860,), std=(0.3530,))


@register_model
def deit_micro_distilled_patch4_28(**kwargs: Any) -> VisionTransformer:
    """The demo-sized distilled DeiT for Fashion-MNIST."""
    arch = dict(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, distilled=True, **_SMALL["micro"]
    )
    return _create(arch, kwargs, mean=(0.2860,), std=(0.3530,))


@register_model
def vit_nano_patch4_32(**kwargs: Any) -> VisionTransformer:
    """A 2-block ViT for 32x32 RGB images (CIFAR)."""
    arch = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, **_SMALL["nano"])
    return _create(arch, kwargs, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


@register_model
def vit_micro_patch4_32(**kwargs: Any) -> VisionTransformer:
    """A 6-block ViT for 32x32 RGB images (CIFAR)."""
    arch = dict(img_size=32, patch_size=4, in_chans=3, num_classes=10, **_SMALL["micro"])
    return _create(arch, kwargs, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
