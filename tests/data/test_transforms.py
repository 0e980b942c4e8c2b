"""Transforms against torchvision, PIL and numpy re-derivations."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from PIL import Image

from vitquant._optional import import_torchvision
from vitquant.data import PilEvalTransform, PilTrainTransform, TensorTransform
from vitquant.data.keys import SampleKey, sample_generator
from vitquant.data.tensor_transforms import convert_channels, resize_square
from vitquant.data.transforms import resolve_norm, sample_rrc_box
from vitquant.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def tvt() -> types.ModuleType:
    import_torchvision()  # checked against torch, importable on the CPU-only torch
    import torchvision.transforms as T

    return T


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)


@pytest.mark.parametrize(
    "size,crop_pct,wh", [(32, 0.875, (50, 40)), (24, 1.0, (30, 47)), (16, 0.9, (16, 16))]
)
def test_eval_transform_matches_torchvision(tvt, size: int, crop_pct: float, wh: tuple) -> None:
    img = _photo(*wh)
    ref = tvt.Compose(
        [
            tvt.Resize(int(size / crop_pct), interpolation=tvt.InterpolationMode.BICUBIC),
            tvt.CenterCrop(size),
            tvt.ToTensor(),
            tvt.Normalize(MEAN, STD),
        ]
    )
    ours = PilEvalTransform(size, MEAN, STD, crop_pct=crop_pct)
    torch.testing.assert_close(ours(img), ref(img), atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_train_transform_matches_torchvision(tvt, seed: int) -> None:
    img = _photo(64, 48, seed)
    ref = tvt.Compose(
        [
            tvt.RandomResizedCrop(
                20, scale=(0.2, 1.0), interpolation=tvt.InterpolationMode.BICUBIC
            ),
            tvt.RandomHorizontalFlip(),
            tvt.ToTensor(),
            tvt.Normalize(MEAN, STD),
        ]
    )
    ours = PilTrainTransform(20, MEAN, STD, scale=(0.2, 1.0))
    torch.manual_seed(seed)
    want = ref(img)
    torch.manual_seed(seed)
    got = ours(img)  # no generator: the global RNG, drawn in torchvision's order
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_rrc_box_properties() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        left, top, w, h = sample_rrc_box(40, 30, (0.3, 0.9), (0.5, 2.0), g)
        assert 0 <= left and left + w <= 40 and 0 <= top and top + h <= 30
        # rounding of w and h moves the area/ratio a little off the sampled values
        assert 0.3 * 1200 * 0.8 <= w * h <= 0.9 * 1200 * 1.2
        assert 0.5 * 0.8 <= w / h <= 2.0 * 1.2
    # impossible ratio -> centre crop clamped to the range
    assert sample_rrc_box(100, 10, (0.99, 1.0), (0.5, 2.0), g) == (40, 0, 20, 10)
    assert sample_rrc_box(10, 10, (1.0, 1.0), (1.0, 1.0), g) == (0, 0, 10, 10)


def test_tensor_eval_is_normalisation() -> None:
    x = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8)
    t = TensorTransform(10, MEAN, STD, in_chans=3)
    want = (x.numpy() / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_allclose(t(x).numpy(), want, atol=1e-5)


def test_tensor_eval_resize_and_crop_matches_pil() -> None:
    x = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    t = TensorTransform(40, (0.0,), (1.0,), in_chans=1)  # crop_pct 1: a plain resize
    pil = Image.fromarray(x[0].numpy()).resize((40, 40), Image.Resampling.BILINEAR)
    got = t(x)[0].numpy() * 255
    # torch's antialiased bilinear follows PIL's; PIL rounds to integers
    np.testing.assert_allclose(got, np.asarray(pil, dtype=np.float64), atol=1.0)
    t2 = TensorTransform(20, (0.0,), (1.0,), crop_pct=0.8)  # resize to 25, centre crop 20
    big = resize_square(x, 25)
    torch.testing.assert_close(t2(x) * 255, big[:, 2:22, 2:22], atol=1e-3, rtol=0)


def test_tensor_padded_crop_is_a_shifted_window() -> None:
    x = torch.randint(1, 256, (1, 9, 9), dtype=torch.uint8)
    t = TensorTransform(9, (0.0,), (1.0 / 255,), augment="default", pad=2, hflip=0.5)
    padded = np.pad(x[0].numpy(), 2)
    candidates = {}
    for dy in range(5):
        for dx in range(5):
            win = padded[dy : dy + 9, dx : dx + 9]
            candidates[(dy, dx, 0)] = win
            candidates[(dy, dx, 1)] = win[:, ::-1]
    seen = set()
    for i in range(400):
        out = t(x, sample_generator(SampleKey(i, 0, 0, 0)))[0].numpy()
        match = [k for k, c in candidates.items() if np.array_equal(out, c)]
        assert match, "output is not a padded crop of the input"
        seen.update(match)
    assert {(dy, dx) for dy, dx, _ in seen} == {(dy, dx) for dy in range(5) for dx in range(5)}
    assert {f for *_, f in seen} == {0, 1}


def test_tensor_rrc_full_box_is_resize() -> None:
    x = torch.randint(0, 256, (1, 12, 12), dtype=torch.uint8)
    t = TensorTransform(
        6, (0.0,), (1.0,), augment="rrc", scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0
    )
    torch.testing.assert_close(t(x, torch.Generator().manual_seed(0)), resize_square(x, 6) / 255)
    assert TensorTransform(20, (0.5,), (0.5,), augment="rrc")(x).shape == (1, 20, 20)


def test_channel_conversion() -> None:
    x = torch.randint(0, 256, (3, 5, 5), dtype=torch.uint8)
    luma = convert_channels(x, 1)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy()).convert("L")
    np.testing.assert_allclose(luma[0].numpy(), np.asarray(pil, dtype=np.float64), atol=1.0)
    g = torch.randint(0, 256, (1, 4, 4), dtype=torch.uint8)
    assert torch.equal(convert_channels(g, 3), g.expand(3, 4, 4))
    out = TensorTransform(4, MEAN, STD, in_chans=3)(g)
    assert out.shape == (3, 4, 4)
    for c in range(3):
        torch.testing.assert_close(out[c], (g[0] / 255 - MEAN[c]) / STD[c])


def test_resolve_norm() -> None:
    d = ((0.2,), (0.3,))
    assert resolve_norm(None, None, d, 1) == ((0.2,), (0.3,))
    assert resolve_norm(None, None, d, 3) == ((0.2,) * 3, (0.3,) * 3)
    assert resolve_norm("inception", None, d, 3) == ((0.5,) * 3, (0.5,) * 3)
    m, s = resolve_norm("imagenet", "imagenet", d, 1)
    assert m[0] == pytest.approx(sum(MEAN) / 3) and s[0] == pytest.approx(sum(STD) / 3)
    with pytest.raises(ConfigError, match="unknown normalisation 'imgnet'"):
        resolve_norm("imgnet", None, d, 3)
    with pytest.raises(ConfigError, match="mean has 2 values but the images have 3 channels"):
        resolve_norm((0.1, 0.2), None, d, 3)
    with pytest.raises(ConfigError, match="std must be positive"):
        resolve_norm(None, (0.0,), d, 1)


def test_bad_transform_options() -> None:
    with pytest.raises(ConfigError, match="crop_pct"):
        PilEvalTransform(10, MEAN, STD, crop_pct=1.5)
    with pytest.raises(ConfigError, match="scale"):
        PilTrainTransform(10, MEAN, STD, scale=(0.5, 0.1))
    with pytest.raises(ConfigError, match="augment must be one of"):
        TensorTransform(10, MEAN, STD, augment="mixup")
    with pytest.raises(ConfigError, match="interpolation"):
        PilEvalTransform(10, MEAN, STD, interpolation="lanczos5")
    assert math.isfinite(PilEvalTransform(10, MEAN, STD)(_photo(12, 12)).sum().item())
