"""DiffQ on CUDA: packing on the GPU, and restored weights equal to the eval-time ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitquant.methods.diffq import LSQ, DiffQuantizer, restore_quantized_state
from vitquant.quant.bitpack import pack, unpack

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("bits", [1, 3, 8, 13, 16])
def test_pack_on_cuda_matches_cpu(bits: int) -> None:
    values = torch.randint(0, 2**bits, (10_007,))
    packed = pack(values.cuda(), bits)
    assert packed.is_cuda and torch.equal(packed.cpu(), pack(values, bits))
    assert torch.equal(unpack(packed, bits, values.numel()).cpu().long(), values)


@pytest.mark.parametrize(
    "make",
    [lambda m: DiffQuantizer(m, min_size=0, group_size=8), lambda m: LSQ(m, bits=4, min_size=0)],
)
def test_cuda_state_restores_eval_weights(make) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).cuda()
    quantizer = make(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_diffq"):
                p.uniform_(-4, 4)
    quantizer.no_optimizer()
    x = torch.randn(8, 64, device="cuda")
    model.train()
    model(x).sum().backward()  # the training forward runs on the GPU
    model.eval()
    expected = model(x)
    state = quantizer.get_quantized_state()
    assert state["data"].device.type == "cpu"
    fresh = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 16)).cuda()
    restore_quantized_state(fresh, state)
    assert torch.equal(fresh(x), expected)
