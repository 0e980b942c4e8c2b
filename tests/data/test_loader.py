"""Samplers, loaders, determinism per (seed, epoch, index), resume, subsets."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
import torch.utils.data as tud

from vitquant.data import (
    DistributedSampler,
    RASampler,
    SampleKey,
    build_dataset,
    build_loader,
    sample_seed,
    set_epoch,
    subset,
)
from vitquant.data.keys import resolve_key
from vitquant.errors import ConfigError


class _Range(tud.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize(
    "n,world,shuffle,drop_last",
    list(itertools.product([7, 10, 11], [1, 2, 3], [True, False], [True, False])),
)
def test_distributed_sampler_matches_torch(
    n: int, world: int, shuffle: bool, drop_last: bool
) -> None:
    for rank in range(world):
        ref = tud.DistributedSampler(
            _Range(n), world, rank, shuffle=shuffle, seed=5, drop_last=drop_last
        )
        ours = DistributedSampler(n, world, rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        for epoch in (0, 3):
            ref.set_epoch(epoch)
            ours.set_epoch(epoch)
            keys = list(ours)
            assert [k.index for k in keys] == list(ref)
            assert len(ours) == len(ref)
            assert all(k.seed == 5 and k.epoch == epoch for k in keys)


def test_unpadded_sampler_partitions_exactly() -> None:
    for world in (1, 2, 3):
        parts = [
            [k.index for k in DistributedSampler(10, world, r, shuffle=False, pad=False)]
            for r in range(world)
        ]
        assert sorted(itertools.chain(*parts)) == list(range(10))
        assert [len(DistributedSampler(10, world, r, pad=False)) for r in range(world)] == [
            len(p) for p in parts
        ]


def test_padded_copies_get_their_own_key() -> None:
    keys = [k for r in range(3) for k in DistributedSampler(7, 3, r, shuffle=True)]
    assert len(keys) == 9 and len(set(keys)) == 9  # two padded copies, with repeat = 1
    assert sorted({k.index for k in keys}) == list(range(7))


def test_ra_sampler_repeats_across_two_ranks() -> None:
    n, world, reps = 10, 2, 3
    samplers = [RASampler(n, world, r, seed=1, num_repeats=reps) for r in range(world)]
    full = samplers[0].repeated()
    counts = collections.Counter(i for i, _ in full)
    assert set(counts) == set(range(n)) and set(counts.values()) == {reps}  # 30 items, no padding
    # independent re-derivation of DeiT's split: stride the repeated list, keep ceil(n/world)
    per_rank = [full[r::world][: -(-n // world)] for r in range(world)]
    for s, want in zip(samplers, per_rank):
        assert [(k.index, k.repeat) for k in s] == want and len(s) == 5
    got = [(k.index, k.repeat) for s in samplers for k in s]
    assert len(set(got)) == len(got)  # each copy of an image has its own augmentation key
    assert sorted(got) == sorted(full[:10])  # together the ranks read the first n of the list


def test_ra_sampler_three_ranks_each_see_one_copy() -> None:
    samplers = [RASampler(9, 3, r, seed=0, num_repeats=3) for r in range(3)]
    per_rank = [[(k.index, k.repeat) for k in s] for s in samplers]
    images = [sorted(i for i, _ in p) for p in per_rank]
    assert images[0] == images[1] == images[2]  # same three images on every rank
    assert [sorted(r for _, r in p) for p in per_rank] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    padded = RASampler(5, 2, 0, num_repeats=3).repeated()
    assert len(padded) == 16 and padded[-1][1] >= 3  # padding entries get a new repeat number


def test_orders_depend_only_on_seed_and_epoch() -> None:
    a = DistributedSampler(50, seed=3)
    b = DistributedSampler(50, seed=3)
    a.set_epoch(2)
    list(DistributedSampler(50, seed=99))  # unrelated sampler use changes nothing
    torch.rand(10)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert [k.index for k in a] != [k.index for k in b]


def test_sample_keys() -> None:
    base = sample_seed(0, 0, 0, 0)
    others = {
        sample_seed(1, 0, 0, 0),
        sample_seed(0, 1, 0, 0),
        sample_seed(0, 0, 1, 0),
        sample_seed(0, 0, 0, 1),
    }
    assert base not in others and len(others) == 4 and all(0 <= s < 2**63 for s in others)
    assert resolve_key(-1, 5)[0] == 4 and resolve_key(3, 5)[1] is None
    with pytest.raises(IndexError):
        resolve_key(5, 5)
    with pytest.raises(IndexError):
        resolve_key(SampleKey(7, 0, 0, 0), 5)


def test_augmentation_reproducible_per_key() -> None:
    ds = build_dataset("digits", "train")
    k = SampleKey(17, seed=4, epoch=2, repeat=0)
    torch.manual_seed(0)
    first = ds[k][0]
    torch.manual_seed(123)
    assert torch.equal(ds[k][0], first)  # global RNG plays no part
    assert torch.equal(ds[tuple(k)][0], first)
    variants = [ds[k._replace(epoch=e)][0] for e in range(8)] + [
        ds[k._replace(repeat=r)][0] for r in range(1, 8)
    ]
    assert any(not torch.equal(v, first) for v in variants)
    # a bare index uses the global RNG, as torchvision datasets do
    torch.manual_seed(1)
    a = ds[17][0]
    torch.manual_seed(1)
    assert torch.equal(ds[17][0], a)


def _batches(
    loader: tud.DataLoader, epoch: int, start: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    set_epoch(loader, epoch, start)
    return list(loader)


def test_loader_resume_mid_epoch_is_exact() -> None:
    ds = build_dataset("digits", "train")
    loader = build_loader(ds, 64, train=True, seed=7)
    assert len(loader) == len(ds) // 64
    state = torch.get_rng_state()
    full = _batches(loader, 3)
    assert torch.equal(torch.get_rng_state(), state)  # iterating never touches the global RNG
    fresh = build_loader(ds, 64, train=True, seed=7)
    tail = _batches(fresh, 3, start=5)
    assert len(fresh) == len(full) - 5 == len(tail)
    for (xa, ya), (xb, yb) in zip(full[5:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = _batches(build_loader(ds, 64, train=True, seed=7), 4)
    assert not torch.equal(other[0][1], full[0][1])


def test_eval_loader_in_order_and_complete() -> None:
    ds = build_dataset("digits", "val")
    loader = build_loader(ds, 100, train=False)
    labels = torch.cat([y for _, y in _batches(loader, 0)])
    assert torch.equal(labels, torch.as_tensor(ds.targets))


def test_loader_options() -> None:
    ds = build_dataset("digits", "train")
    ra = build_loader(ds, 32, train=True, repeated_aug=True)
    assert isinstance(ra.sampler, RASampler) and ra.sampler.num_repeats == 3
    assert isinstance(build_loader(ds, 32, train=False, repeated_aug=3).sampler, DistributedSampler)
    assert build_loader(ds, 32, train=True, drop_last=False).drop_last is False
    with pytest.raises(ConfigError, match="batch_size"):
        build_loader(ds, 0, train=True)
    with pytest.raises(ConfigError, match="not initialised"):
        build_loader(ds, 8, train=True, distributed=True)
    plain = tud.DataLoader(ds, batch_size=8, sampler=tud.RandomSampler(ds))
    set_epoch(plain, 1)  # tolerated without set_epoch on the sampler
    with pytest.raises(ConfigError, match="middle of an epoch"):
        set_epoch(plain, 1, start_batch=2)


def test_subset() -> None:
    ds = build_dataset("digits", "val")
    a, b = subset(ds, 50, seed=1), subset(ds, 50, seed=1)
    assert a.indices == b.indices and a.indices == sorted(a.indices) and len(a) == 50
    assert a.indices != subset(ds, 50, seed=2).indices
    assert a.targets == [ds.targets[i] for i in a.indices]
    assert a.classes == ds.classes and a.info == ds.info
    k = SampleKey(3, 0, 1, 0)
    assert torch.equal(a[k][0], ds[k._replace(index=a.indices[3])][0])
    assert torch.equal(a[-1][0], ds[a.indices[-1]][0])
    assert subset(ds, 10_000, seed=0) is ds
    with pytest.raises(ConfigError):
        subset(ds, 0)
    loader = build_loader(a, 16, train=True)
    assert sum(len(y) for _, y in _batches(loader, 0)) == 48


def test_distributed_is_detected(tmp_path) -> None:
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = build_loader(build_dataset("digits", "val"), 8, train=False)
        assert loader.sampler.num_replicas == 1 and loader.sampler.rank == 0
        assert build_loader(build_dataset("digits", "val"), 8, train=False, distributed=True)
    finally:
        dist.destroy_process_group()
