"""Behaviour of vitquant.methods.diffq's quantizers: train/eval forward, sizes, optimizer set-up,
errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vitquant.errors import CheckpointError, ConfigError
from vitquant.methods.diffq import LSQ, DiffQuantizer, UniformQuantizer, restore_quantized_state


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8))


def _x() -> torch.Tensor:
    return torch.randn(16, 32, generator=torch.Generator().manual_seed(3))


FACTORIES = {
    "diffq": lambda m: DiffQuantizer(m, min_size=0, group_size=8),
    "diffq_g0": lambda m: DiffQuantizer(m, min_size=0, group_size=0, param="noise"),
    "uniform": lambda m: UniformQuantizer(m, bits=4, min_size=0, qat=True),
    "lsq": lambda m: LSQ(m, bits=3, min_size=0.0005, float16=True),
}


def _manual_minmax(w: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Independent numpy-style re-derivation of the min-max grid (float64)."""
    w64 = w.double()
    mn, mx = w64.min(), w64.max()
    if mn == mx:
        return w64
    steps = 2.0 ** bits.double() - 1
    levels = torch.round((w64 - mn) / (mx - mn) * steps)
    return mn + levels * (mx - mn) / steps


def test_eval_uses_quantized_weights_train_adds_noise() -> None:
    model = _mlp()
    quantizer = DiffQuantizer(model, min_size=0, group_size=8, init_bits=4, min_bits=2)
    quantizer.no_optimizer()
    x = _x()
    model.train()
    noisy1, noisy2 = model(x), model(x)
    assert not torch.allclose(noisy1, noisy2)  # fresh noise at every forward
    model.eval()
    out = model(x)
    assert torch.equal(out, model(x))
    # eval == a float model holding the min-max quantized weights (4 bits everywhere)
    ref = _mlp()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(_manual_minmax(p, torch.tensor(4.0)).float())
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    # after the forward the float weights are back in place
    assert torch.equal(model[0].weight, _mlp()[0].weight)
    assert isinstance(model[0]._parameters["weight"], nn.Parameter)


def test_noise_scale_matches_the_paper() -> None:
    """Train-time noise is (max-min)/(2^b-1)/2 * N(0,1) per weight (gaussian, the default)."""
    model = nn.Linear(256, 256, bias=False)
    quantizer = DiffQuantizer(model, min_size=0, group_size=0, init_bits=3, min_bits=2)
    quantizer.no_optimizer()
    w = model.weight.detach().clone()
    seen = {}
    model.register_forward_pre_hook(lambda m, i: seen.setdefault("w", m.weight.detach().clone()))
    model.train()
    model(torch.zeros(1, 256))
    delta = (w.max() - w.min()) / (2**3 - 1)
    assert (seen["w"] - w).std().item() == pytest.approx(delta.item() / 2, rel=0.05)


def test_model_size_is_differentiable_and_penalty_lowers_bits() -> None:
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    quantizer = DiffQuantizer(model, min_size=0, group_size=8)
    quantizer.setup_optimizer(opt, lr=0.05)
    assert opt.param_groups[-1]["weight_decay"] == 0 and opt.param_groups[-1]["lr"] == 0.05
    start_bits, start_size = quantizer.bits_per_weight(), quantizer.true_model_size()
    assert start_bits == pytest.approx(8)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        loss = model(_x()).square().mean() + 10.0 * quantizer.model_size()
        loss.backward()
        opt.step()
    assert quantizer.bits_per_weight() < start_bits - 1
    assert quantizer.true_model_size() < start_size


def test_true_model_size_formula() -> None:
    """Sizes re-derived by hand: MB = bits / 2^23."""
    model = _mlp()
    n_small = 64 + 64 + 64 + 8  # biases and LayerNorm: below min_size=0.0005 MB (131 params)
    q = UniformQuantizer(model, bits=5, min_size=0.0005, float16=True)
    expected = (5 * (32 * 64 + 64 * 8) + 2 * 64 + 16 * n_small) / 8 / 2**20
    assert q.true_model_size() == pytest.approx(expected)
    q.detach()
    q = DiffQuantizer(model, min_size=0.0005, group_size=8, init_bits=6)
    groups = (32 * 64 + 64 * 8) // 8
    bits_bits = math.ceil(math.log2(1 + 6 - 2))
    expected = (6 * 8 * groups + 2 * (64 + 8) + bits_bits * groups + 32 * n_small) / 8 / 2**20
    assert q.true_model_size() == pytest.approx(expected)
    q.detach()
    q = LSQ(model, bits=3, min_size=0.0005)
    expected = (3 * (32 * 64 + 64 * 8) + 2 * 32 + 32 * n_small) / 8 / 2**20
    assert q.true_model_size() == pytest.approx(expected)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("packed", [True, False])
def test_state_round_trip_is_bit_exact(name: str, packed: bool) -> None:
    model = _mlp()
    quantizer = FACTORIES[name](model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_diffq"):
                p.uniform_(-5, 5)
    model.eval()
    expected = model(_x())
    state = quantizer.get_quantized_state(packed=packed)
    fresh = _mlp(seed=1)
    restore_quantized_state(fresh, state)
    assert not any(n.endswith(("_diffq", "_lsq")) for n, _ in fresh.named_parameters())
    assert torch.equal(fresh(_x()), expected)
    # restoring through the quantizer object itself gives the same weights
    other = _mlp(seed=2)
    FACTORIES[name](other).restore_quantized_state(state)
    restored = dict(other.named_parameters())
    for n, p in fresh.named_parameters():
        assert torch.equal(p, restored[n])


def test_quantize_unquantize_and_float16() -> None:
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    quantizer = LSQ(model, bits=3, min_size=0.0005, float16=True)
    model.eval()
    expected = model(_x())
    assert quantizer.quantize()
    assert not quantizer.quantize()
    # small parameters are float16-rounded, big ones on the 3-bit grid
    assert torch.equal(model[0].bias, before[1].half().float())
    step = model[0].weight_lsq.detach()
    idx = torch.round(model[0].weight / step)
    assert idx.min() >= -4 and idx.max() <= 3
    torch.testing.assert_close(model[0].weight, idx * step)
    assert torch.equal(model(_x()), expected)  # already quantized: eval does not quantize again
    state = quantizer.get_quantized_state()  # from the saved float copies
    quantizer.unquantize()
    for p, b in zip((p for n, p in model.named_parameters() if "_lsq" not in n), before):
        assert torch.equal(p, b)
    with quantizer.enter_quantize():
        assert not torch.equal(model[0].weight, before[0])
    assert torch.equal(model[0].weight, before[0])
    fresh = _mlp(seed=5)
    restore_quantized_state(fresh, state)
    assert torch.equal(fresh(_x()), expected)


def test_shared_parameters_counted_once() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = emb.weight
    tied = nn.ModuleDict({"emb": emb, "head": head})
    q = DiffQuantizer(tied, min_size=0, group_size=4)
    assert q.quantized_names() == ["emb.weight"]
    assert [n for n, _ in tied.named_parameters() if n.endswith("_diffq")] == ["emb.weight_diffq"]
    untied = nn.ModuleDict({"emb": nn.Embedding(50, 16)})
    single = DiffQuantizer(untied, min_size=0, group_size=4)
    assert q.true_model_size() == pytest.approx(single.true_model_size())


def test_exclude_and_min_size() -> None:
    model = _mlp()
    q = UniformQuantizer(model, bits=4, min_size=0, exclude=["0.*", "bias"])
    assert q.quantized_names() == ["2.weight", "3.weight"]
    assert q.float_names() == ["0.weight", "0.bias", "2.bias", "3.bias"]
    q.detach()
    q = UniformQuantizer(model, bits=4, min_size=0.0005)  # 131 params or fewer stay float
    assert q.quantized_names() == ["0.weight", "3.weight"]


def test_detach_removes_everything() -> None:
    model = _mlp()
    names = [n for n, _ in model.named_parameters()]
    q = DiffQuantizer(model, min_size=0, group_size=8)
    q.detach()
    assert [n for n, _ in model.named_parameters()] == names
    model.eval()
    assert torch.equal(model(_x()), _mlp()(_x()))  # no hooks left: float weights
    DiffQuantizer(model, min_size=0, group_size=8)  # can be attached again


def test_forward_error_does_not_leave_weights_swapped() -> None:
    model = _mlp()
    DiffQuantizer(model, min_size=0, group_size=8).no_optimizer()
    model.train()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))
    model.eval()
    out = model(_x())
    assert isinstance(model[0]._parameters["weight"], nn.Parameter)
    assert torch.equal(out, model(_x()))


def test_lstm_uses_quantized_weights() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, batch_first=True)
    model = nn.ModuleDict({"lstm": lstm})
    q = UniformQuantizer(model, bits=3, min_size=0)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        float_out = lstm(x)[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        return model["lstm"](x)[0]

    model.forward = run  # type: ignore[method-assign]
    model.eval()
    with torch.no_grad():
        out = model(x)
    with q.enter_quantize(), torch.no_grad():
        expected = lstm(x)[0]
    assert torch.equal(out, expected)
    assert not torch.allclose(out, float_out)


def test_compressed_and_packed_sizes() -> None:
    model = _mlp()
    q = DiffQuantizer(model, min_size=0, group_size=8, init_bits=4)
    assert q.compressed_model_size() > 0
    assert q.packed_model_size() > q.true_model_size()  # a few kB of zip and metadata
    assert q.get_quantized_state()["data"].numel() <= q.true_model_size() * 2**20


# ----------------------------------------------------------------------------- bad input
def test_bad_configurations() -> None:
    with pytest.raises(ConfigError, match=r"group_size=7 does not divide 0.weight"):
        DiffQuantizer(_mlp(), min_size=0, group_size=7)
    with pytest.raises(ConfigError, match="min_bits < max_bits"):
        DiffQuantizer(_mlp(), min_bits=8, max_bits=8)
    with pytest.raises(ConfigError, match="init_bits=9 must be strictly between"):
        DiffQuantizer(_mlp(), init_bits=9, max_bits=9)
    with pytest.raises(ConfigError, match="bits=1"):
        LSQ(_mlp(), bits=1)
    with pytest.raises(ConfigError, match="bits=4.5"):
        UniformQuantizer(_mlp(), bits=4.5)
    model = _mlp()
    DiffQuantizer(model, min_size=0, group_size=8)
    with pytest.raises(ConfigError, match="already attached"):
        DiffQuantizer(model, min_size=0, group_size=8)


def test_optimizer_errors() -> None:
    model = _mlp()
    q = DiffQuantizer(model, min_size=0, group_size=8)
    late = torch.optim.SGD(model.parameters(), lr=0.1)  # created after: holds the logits
    with pytest.raises(ConfigError, match="already holds"):
        q.setup_optimizer(late)
    model.train()
    with pytest.raises(ConfigError, match="setup_optimizer"):
        model(_x())
    q.clear_optimizer(late)
    q.setup_optimizer(late)
    with pytest.raises(ConfigError, match="already called"):
        q.setup_optimizer(late)
    model(_x())


def test_lsq_setup_keeps_base_settings() -> None:
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    q = LSQ(model, bits=4, min_size=0)
    q.setup_optimizer(opt)
    group = opt.param_groups[-1]
    assert group["lr"] == 3e-4 and group["weight_decay"] == 0.05
    assert len(group["params"]) == len(q.quantized_names())


def test_state_errors() -> None:
    model = _mlp()
    state = DiffQuantizer(model, min_size=0, group_size=8).get_quantized_state()
    other = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 16))
    with pytest.raises(CheckpointError, match="another model: 3.weight has shape"):
        restore_quantized_state(other, state)
    other = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 4))
    with pytest.raises(CheckpointError, match="does not fit this model: group_size=8"):
        restore_quantized_state(other, state)
    assert not any(n.endswith("_diffq") for n, _ in other.named_parameters())
    with pytest.raises(CheckpointError, match="another model"):
        restore_quantized_state(nn.Sequential(nn.Linear(32, 64)), state)
    with pytest.raises(CheckpointError, match="made by the 'diffq' quantizer, not 'lsq'"):
        LSQ(_mlp(), min_size=0).restore_quantized_state(state)
    with pytest.raises(CheckpointError, match="not a vitquant quantized state"):
        restore_quantized_state(_mlp(), {"model": {}})
    with pytest.raises(CheckpointError, match="original diffq package"):
        restore_quantized_state(_mlp(), {"meta": {"klass": None}, "quantized": []})
    state["data"] = state["data"][:10]
    with pytest.raises(CheckpointError, match="truncated"):
        restore_quantized_state(_mlp(), state)
