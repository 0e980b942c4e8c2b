"""LAMB against a NumPy re-derivation of the paper's Algorithm 2; parameter groups; factory."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vitquant.errors import ConfigError
from vitquant.train.optim import Lamb, build_optimizer, param_groups_weight_decay


def _lamb_numpy(w, grads, lr, b1, b2, eps, wd):
    """You et al. 2020, Algorithm 2, written independently with NumPy (float64)."""
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        r = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        u = r + wd * w
        wn, un = np.linalg.norm(w), np.linalg.norm(u)
        trust = wn / un if wn > 0 and un > 0 else 1.0
        w = w - lr * trust * u
    return w


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_lamb_matches_numpy_reference(wd: float) -> None:
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(5, 7))
    grads = [rng.normal(size=(5, 7)) for _ in range(6)]
    p = nn.Parameter(torch.tensor(w0))
    opt = Lamb([p], lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=wd)
    for g in grads:
        p.grad = torch.tensor(g)
        opt.step()
    ref = _lamb_numpy(w0, grads, 0.01, 0.9, 0.99, 1e-6, wd)
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-5, atol=1e-7)


def test_lamb_zero_weight_uses_trust_one() -> None:
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = Lamb([p], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    opt.step()
    # first step: m_hat = g, v_hat = g^2 -> r = sign(g) (up to eps); trust ratio 1
    np.testing.assert_allclose(p.detach().numpy(), -0.1 * np.sign(p.grad.numpy()), rtol=1e-5)


def test_lamb_state_roundtrip() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    oa, ob = Lamb(a.parameters(), lr=0.01), Lamb(b.parameters(), lr=0.01)
    x = torch.randn(8, 3)
    a(x).sum().backward()
    oa.step()
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as if read back from disk
    b.load_state_dict(a.state_dict())
    for m, o in ((a, oa), (b, ob)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_param_groups_no_decay_for_1d_and_named() -> None:
    from vitquant import create_model

    model = create_model("vit_nano_patch4_28")
    groups = param_groups_weight_decay(model, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "pos_embed" not in names and "cls_token" not in names
    assert all(not n.endswith(".bias") and "norm" not in n for n in names)
    assert "blocks.0.attn.qkv.weight" in names
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))


@pytest.mark.parametrize("name,cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer_torch(name: str, cls: type) -> None:
    p = nn.Parameter(torch.ones(2))
    opt = build_optimizer(name, [{"params": [p], "weight_decay": 0.0}], lr=0.1)
    assert isinstance(opt, cls) and opt.param_groups[0]["initial_lr"] == 0.1


def test_build_optimizer_lamb_and_unknown() -> None:
    p = nn.Parameter(torch.ones(2))
    assert isinstance(build_optimizer("lamb", [{"params": [p]}], lr=0.1), Lamb)
    with pytest.raises(ConfigError):
        build_optimizer("adam9", [{"params": [p]}], lr=0.1)
