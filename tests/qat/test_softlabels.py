"""Tests of the FKD-format soft labels: round trip, exact crop replay, bad folders."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from helpers import import_timm
from vitquant.errors import DataError
from vitquant.methods.vvtq.softlabels import (
    MultiCropSoftLabelDataset,
    coords_to_box,
    expand_topk,
    generate_softlabels,
    read_meta,
    read_record,
    record_path,
    resized_crop,
    sample_crop,
)


class _Teacher(nn.Module):
    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(1 * 12 * 12, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _dataset(n: int = 7, size: int = 16) -> TensorDataset:
    return TensorDataset(torch.randn(n, 1, size, size), torch.randint(0, 6, (n,)))


def test_round_trip_and_exact_replay(tmp_path) -> None:
    torch.manual_seed(0)
    ds, teacher = _dataset(), _Teacher().eval()
    meta = generate_softlabels(
        teacher, ds, str(tmp_path), num_crops=5, topk=3, img_size=12, batch_size=8, seed=3
    )
    assert read_meta(str(tmp_path)) == meta
    assert meta["num_images"] == 7 and meta["num_classes"] == 6 and meta["topk"] == 3
    # every file is plain safetensors (no pickle)
    from safetensors.torch import load_file

    d = load_file(record_path(str(tmp_path), 4))
    assert set(d) == {"coords", "flip", "topk_index", "topk_prob"}
    assert d["coords"].shape == (5, 4) and d["topk_prob"].shape == (5, 3)
    # replay: the teacher on the replayed crops gives back the stored top-k exactly
    mc = MultiCropSoftLabelDataset(
        ds, str(tmp_path), num_crops=2, num_classes=6, label_type="renorm", seed=1
    )
    for i in range(len(ds)):
        rec = read_record(str(tmp_path), i)
        chosen = mc.crop_indices(i, 5)
        crops, targets = mc[i]
        assert crops.shape == (2, 1, 12, 12) and targets.shape == (2, 6)
        with torch.no_grad():
            probs = teacher(crops).softmax(-1)
        top_p, top_i = probs.topk(3, dim=1)
        torch.testing.assert_close(top_i, rec.topk_index[chosen])
        torch.testing.assert_close(top_p, rec.topk_prob[chosen])
        torch.testing.assert_close(targets.sum(1), torch.ones(2))


def test_crops_change_with_epoch_and_are_reproducible(tmp_path) -> None:
    ds = _dataset(3)
    generate_softlabels(_Teacher(), ds, str(tmp_path), num_crops=8, topk=2, img_size=12)
    a = MultiCropSoftLabelDataset(ds, str(tmp_path), num_crops=3, seed=5)
    b = MultiCropSoftLabelDataset(ds, str(tmp_path), num_crops=3, seed=5)
    torch.testing.assert_close(a[1][0], b[1][0])
    first = a.crop_indices(1, 8)
    a.set_epoch(1)
    assert not torch.equal(first, a.crop_indices(1, 8)) or not torch.equal(
        a.crop_indices(2, 8), b.crop_indices(2, 8)
    )


def test_resized_crop_matches_torchvision() -> None:
    import_timm()
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    img = torch.randn(3, 40, 30)
    for box, flip in [((3, 4, 20, 17), False), ((0, 0, 40, 30), True), ((10, 2, 9, 9), False)]:
        ref = TF.resized_crop(img, *box, [16, 16], InterpolationMode.BILINEAR, antialias=True)
        if flip:
            ref = TF.hflip(ref)
        torch.testing.assert_close(resized_crop(img, box, 16, flip), ref, atol=1e-5, rtol=1e-5)


def test_sample_crop_in_bounds_and_coords_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    for h, w in [(28, 28), (37, 51), (224, 300)]:
        for _ in range(50):
            top, left, ch, cw = sample_crop(h, w, generator=g)
            assert 0 <= top and 0 <= left and 0 < ch and 0 < cw
            assert top + ch <= h and left + cw <= w
            coords = torch.tensor([top / h, left / w, ch / h, cw / w])
            assert coords_to_box(coords, h, w) == (top, left, ch, cw)


def test_expand_topk_types() -> None:
    idx = torch.tensor([[2, 0]])
    prob = torch.tensor([[0.6, 0.2]])
    marg = expand_topk(idx, prob, 5, "marginal")
    torch.testing.assert_close(marg, torch.tensor([[0.2, 0.2 / 3, 0.6, 0.2 / 3, 0.2 / 3]]))
    torch.testing.assert_close(expand_topk(idx, prob, 5, "renorm")[0, 2], torch.tensor(0.75))
    torch.testing.assert_close(expand_topk(idx, prob, 5, "hard"), torch.eye(5)[2:3])


def test_bad_folders_raise_data_errors(tmp_path) -> None:
    ds = _dataset(4)
    folder = str(tmp_path / "sl")
    with pytest.raises(DataError, match="meta.json"):
        MultiCropSoftLabelDataset(ds, folder)
    generate_softlabels(_Teacher(classes=6), ds, folder, num_crops=2, topk=2, img_size=12)
    with pytest.raises(DataError, match="classes"):
        MultiCropSoftLabelDataset(ds, folder, num_crops=1, num_classes=10)
    with pytest.raises(DataError, match="images"):
        MultiCropSoftLabelDataset(_dataset(5), folder, num_crops=1)
    os.remove(record_path(folder, 2))
    with pytest.raises(DataError, match="misses 1 of 4"):
        MultiCropSoftLabelDataset(ds, folder, num_crops=1)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"format": "other"}, f)
    with pytest.raises(DataError):
        read_meta(folder)
