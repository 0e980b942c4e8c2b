"""Test helpers importable from any test module (``from helpers import import_timm``)."""

from __future__ import annotations

import types

import torch


def import_timm() -> types.ModuleType:
    """timm on the CPU-only torch of these machines: :func:`vitquant._optional.import_timm`.

    torchvision 0.28 (pulled by timm) is a CUDA build whose import fails with "operator
    torchvision::nms does not exist"; vitquant's importer defines the two missing op schemas first
    (only ``torchvision.ops.nms`` stays broken) and checks torchvision against torch.
    """
    from vitquant._optional import import_timm as _import_timm

    return _import_timm()


def randomize_affine(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Gives every bias, LayerNorm and LayerScale of ``model`` random non-trivial values.

    A freshly initialised ViT has zero biases, LayerNorms with weight 1 and bias 0, and LayerScale
    gammas all equal to ``init_values``: with those, an export or a lowering that drops or
    misplaces a bias, a LayerNorm affine parameter or a LayerScale still computes the same
    function. This makes them matter: biases ~ N(0, 0.2²), LayerNorm weights in [0.5, 1.5] and
    biases ~ N(0, 0.2²), gammas in [0.3, 1.2] (per channel). Call it before ``prepare``. Returns
    ``model`` (in place).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen) * std

    def uniform(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(t.shape, generator=gen)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(uniform(m.weight, 0.5, 1.5))
                if m.bias is not None:
                    m.bias.copy_(normal(m.bias, 0.2))
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(normal(m.bias, 0.2))
            elif type(m).__name__ == "LayerScale":
                m.gamma.copy_(uniform(m.gamma, 0.3, 1.2))
    return model


def has_layer_scale(model: torch.nn.Module) -> bool:
    """True when ``model`` has at least one LayerScale (``init_values`` given)."""
    return any(type(m).__name__ == "LayerScale" for m in model.modules())


def random_vit(
    name: str = "vit_nano_patch4_28", seed: int = 0, **kwargs: object
) -> torch.nn.Module:
    """The test model of the PTQ tests: model ``name`` in eval mode with random affine parameters
    (:func:`randomize_affine`) and 3x the init Linear weights, so that attention is not uniform,
    quantization errors inside the blocks reach the logits and the logits are decisive (a freshly
    initialised ViT gives near-equal logits, whose arg-max flips at any perturbation)."""
    import vitquant

    torch.manual_seed(seed)
    model = vitquant.create_model(name, **kwargs).eval()
    randomize_affine(model, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight *= 3.0
    return model


def random_nano_vit(seed: int = 0) -> torch.nn.Module:
    """:func:`random_vit` of ``vit_nano_patch4_28``."""
    return random_vit("vit_nano_patch4_28", seed)


#: a tiny transformers ViT/DeiT config (hidden 32, 2 layers, 28x28 grey images, 5 classes)
HF_TINY: dict[str, object] = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    image_size=28,
    patch_size=7,
    num_channels=1,
    num_labels=5,
)


def skip_without_transformers() -> None:
    """Skips the calling test module when ``transformers`` is not installed."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("transformers") is None:
        pytest.skip(
            "transformers is not installed (pip install 'vitquant[hf]')", allow_module_level=True
        )


def digits_batches(n: int = 128, batch_size: int = 64) -> list[torch.Tensor]:
    """The first ``n`` images of the built-in ``digits`` training split at 28 px, in batches."""
    from torch.utils.data import DataLoader

    from vitquant.data import build_dataset, subset

    ds = subset(build_dataset("digits", "train", img_size=28, train_transform=False), n, seed=0)
    return [x for x, _ in DataLoader(ds, batch_size=batch_size)]


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label of the built-in ``digits`` training split at 28 px."""
    from torch.utils.data import DataLoader

    from vitquant.data import build_dataset

    ds = build_dataset("digits", "train", img_size=28, train_transform=False)
    x, y = map(torch.cat, zip(*[(a, b) for a, b in DataLoader(ds, batch_size=512)]))
    return x, y


def trained_nano(x: torch.Tensor, y: torch.Tensor, steps: int = 150) -> torch.nn.Module:
    """A ``vit_nano_patch4_28`` trained for ``steps`` AdamW steps of 64 images (150: ~2 s, about
    50% top-1 on digits: predictions that depend on the image, so quantization flips some)."""
    import torch.nn.functional as F

    import vitquant

    torch.manual_seed(0)
    model = vitquant.create_model("vit_nano_patch4_28", num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def block_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every ``model.blocks`` block's output when ``model`` runs on ``x`` (no gradients)."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outs
