"""vitquant.methods.diffq against the original ``diffq`` package (PyPI ``diffq-fixed`` 0.2.4).

Both quantizers are attached to identical copies of the same seeded model, with the same learnt
parameters (bit logits, LSQ steps); the sizes, the quantized weights used in ``eval()`` and the
restored weights must agree. Tests named ``test_fixed_*`` show where vitquant deliberately
differs: the reference gets these cases wrong, vitquant does not.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import vitquant.methods.diffq as vq

diffq = pytest.importorskip("diffq")


class Toy(nn.Module):
    """A small transformer-ish model: embedding tied to the output, attention-like linears."""

    def __init__(self, vocab: int = 96, dim: int = 48, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(3 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim, bias=False)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.proj(torch.relu(self.qkv(x)))
        x = x + self.fc2(torch.relu(self.fc(self.norm(x))))
        return self.head(x)


def _pair(**model_kwargs: object) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1234)
    model = Toy(**model_kwargs)  # type: ignore[arg-type]
    twin = copy.deepcopy(model)
    if model_kwargs.get("tie", True):
        twin.head.weight = twin.embed.weight
    return model, twin


def _copy_extra(ours: nn.Module, ref: nn.Module, suffix: str, randomize: bool) -> None:
    """Gives both quantizers the same learnt tensors (random logits spread the bit widths)."""
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(suffix):
                if randomize:
                    p.uniform_(-4, 4)
                ref_params[name].copy_(p)


def _tokens() -> torch.Tensor:
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))


def _eval_out(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(_tokens())


DIFFQ_SETTINGS = [
    dict(group_size=1),
    dict(group_size=4, min_bits=3, max_bits=12, init_bits=5),
    dict(group_size=16, min_bits=1, max_bits=9),
    dict(group_size=8, param="noise"),
    dict(group_size=8, min_size=0.004),
    dict(group_size=16, float16=True, min_size=0.004),
    dict(group_size=8, exclude=["proj.*", "bias"]),
    dict(group_size=2, extra_bits=1, max_bits=12),
]


@pytest.mark.parametrize("kwargs", DIFFQ_SETTINGS)
@pytest.mark.parametrize("tie", [True, False])
def test_diffq_sizes_and_weights_match_reference(kwargs: dict, tie: bool) -> None:
    kwargs = {"min_size": 0.0, **kwargs}
    model, twin = _pair(tie=tie)
    ours = vq.DiffQuantizer(model, **kwargs)
    ref = diffq.DiffQuantizer(twin, **kwargs)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(
        n for n, _ in twin.named_parameters()
    )
    for randomize in (False, True):
        _copy_extra(model, twin, "_diffq", randomize)
        ms, ref_ms = ours.model_size(), ref.model_size()
        assert ms.requires_grad
        assert ms.item() == pytest.approx(ref_ms.item(), rel=1e-6)
        assert ours.true_model_size() == pytest.approx(ref.true_model_size(), rel=1e-9)
        # the differentiable size has the same gradient with respect to the logits
        ms.backward()
        ref_ms.backward()
        ref_grads = {n: p.grad for n, p in twin.named_parameters() if n.endswith("_diffq")}
        for name, p in model.named_parameters():
            if name.endswith("_diffq"):
                torch.testing.assert_close(p.grad, ref_grads[name])
                p.grad = None
                ref_grads[name].zero_()
    torch.testing.assert_close(_eval_out(model), _eval_out(twin), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 15])
@pytest.mark.parametrize("float16", [False, True])
def test_uniform_matches_reference(bits: int, float16: bool) -> None:
    model, twin = _pair()
    ours = vq.UniformQuantizer(model, bits=bits, min_size=0.004, float16=float16)
    ref = diffq.UniformQuantizer(twin, bits=bits, min_size=0.004, float16=float16)
    assert ours.true_model_size() == pytest.approx(ref.true_model_size(), rel=1e-9)
    assert float(ours.model_size()) == pytest.approx(float(ref.model_size()), rel=1e-9)
    torch.testing.assert_close(_eval_out(model), _eval_out(twin), rtol=0, atol=0)


def test_uniform_qat_forward_matches_reference() -> None:
    model, twin = _pair()
    vq.UniformQuantizer(model, bits=4, min_size=0, qat=True)
    diffq.UniformQuantizer(twin, bits=4, min_size=0, qat=True)
    model.train()
    twin.train()
    out, ref_out = model(_tokens()), twin(_tokens())
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    torch.testing.assert_close(model.qkv.weight.grad, twin.qkv.weight.grad)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_lsq_matches_reference(bits: int) -> None:
    model, twin = _pair()
    # min_size keeps the zero-initialised biases out: the reference's step would be 0 (NaN)
    ours = vq.LSQ(model, bits=bits, min_size=0.002)
    ref = diffq.LSQ(twin, bits=bits, min_size=0.002)
    _copy_extra(model, twin, "_lsq", randomize=False)
    assert ours.true_model_size() == pytest.approx(ref.true_model_size(), rel=1e-9)
    torch.testing.assert_close(model.qkv.weight_lsq, twin.qkv.weight_lsq)
    torch.testing.assert_close(_eval_out(model), _eval_out(twin), rtol=0, atol=0)
    # the training forward and the gradients of the steps agree too
    ours.no_optimizer()
    ref.no_optimizer()
    model.train()
    twin.train()
    out, ref_out = model(_tokens()), twin(_tokens())
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    torch.testing.assert_close(model.fc.weight_lsq.grad, twin.fc.weight_lsq.grad)


@pytest.mark.parametrize(
    ("make", "suffix"),
    [
        (lambda m, mod: mod.DiffQuantizer(m, min_size=0, group_size=4, max_bits=12), "_diffq"),
        (lambda m, mod: mod.DiffQuantizer(m, min_size=0.001, max_bits=14, float16=True), "_diffq"),
        (lambda m, mod: mod.UniformQuantizer(m, bits=5, min_size=0.004, float16=True), None),
        (lambda m, mod: mod.LSQ(m, bits=4, min_size=0.002), "_lsq"),
    ],
)
def test_restored_weights_match_reference(make: object, suffix: str | None) -> None:
    """Our packed state restores to the weights the reference restores from its own state.

    Untied models: the reference's ``detach()`` fails on tied weights (see the test below).
    """
    model, twin = _pair(tie=False)
    ours, ref = make(model, vq), make(twin, diffq)  # type: ignore[operator]
    if suffix:
        _copy_extra(model, twin, suffix, randomize=suffix == "_diffq")
    # the reference cannot pack Uniform states (see test_fixed_uniform_packs)
    ref_state = ref.get_quantized_state(packed=suffix is not None)
    state = ours.get_quantized_state()
    fresh, ref_fresh = _pair(tie=False)
    vq.restore_quantized_state(fresh, state)
    diffq.restore_quantized_state(ref_fresh, ref_state)
    for (name, p), (_, r) in zip(fresh.named_parameters(), ref_fresh.named_parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=0, msg=name)


def test_fixed_uniform_packs() -> None:
    """The reference stores Uniform's bits as a float, which its Cython packer refuses."""
    model, twin = _pair()
    ours = vq.UniformQuantizer(model, bits=5, min_size=0)
    ref = diffq.UniformQuantizer(twin, bits=5, min_size=0)
    with pytest.raises(TypeError):
        ref.get_quantized_state(packed=True)
    state = ours.get_quantized_state(packed=True)
    assert state["data"].numel() <= ours.true_model_size() * 2**20
    fresh = _pair()[0]
    vq.restore_quantized_state(fresh, state)
    torch.testing.assert_close(_eval_out(fresh), _eval_out(twin), rtol=0, atol=0)


def test_fixed_tied_weights_restore() -> None:
    """The reference's detach() deletes the logit of every appearance of a tied weight."""
    model, twin = _pair()
    ours = vq.DiffQuantizer(model, min_size=0, group_size=4)
    ref = diffq.DiffQuantizer(twin, min_size=0, group_size=4)
    _copy_extra(model, twin, "_diffq", randomize=True)
    with pytest.raises(AttributeError):
        diffq.restore_quantized_state(_pair()[1], ref.get_quantized_state())
    fresh = _pair()[0]
    vq.restore_quantized_state(fresh, ours.get_quantized_state())
    assert fresh.head.weight is fresh.embed.weight
    assert not any(n.endswith("_diffq") for n, _ in fresh.named_parameters())
    torch.testing.assert_close(_eval_out(fresh), _eval_out(twin), rtol=0, atol=0)


def _all_15_bits(model: nn.Module, suffix: str = "_diffq") -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(suffix):
                p.fill_(30.0)  # sigmoid -> 1: every group at max_bits = 15


def test_fixed_15_bit_groups_are_packed() -> None:
    """The reference packer loops over 1..14 bits: 15-bit groups come back as garbage."""
    model, twin = _pair(tie=False)
    ours = vq.DiffQuantizer(model, min_size=0, group_size=8)
    ref = diffq.DiffQuantizer(twin, min_size=0, group_size=8)
    _all_15_bits(model)
    _all_15_bits(twin)
    expected = _eval_out(twin)
    torch.testing.assert_close(_eval_out(model), expected, rtol=0, atol=0)

    ref_fresh, fresh = _pair(tie=False)
    diffq.restore_quantized_state(ref_fresh, ref.get_quantized_state(packed=True))
    assert not torch.allclose(_eval_out(ref_fresh), expected)  # the reference's bug
    vq.restore_quantized_state(fresh, ours.get_quantized_state(packed=True))
    torch.testing.assert_close(_eval_out(fresh), expected, rtol=0, atol=0)


def test_fixed_group_size_zero_restores() -> None:
    model, twin = _pair(tie=False)
    ours = vq.DiffQuantizer(model, min_size=0, group_size=0)
    ref = diffq.DiffQuantizer(twin, min_size=0, group_size=0)
    _copy_extra(model, twin, "_diffq", randomize=True)
    assert ours.true_model_size() == pytest.approx(ref.true_model_size(), rel=1e-9)
    with pytest.raises(RuntimeError):  # it unpacks into a (1, 0) levels tensor
        diffq.restore_quantized_state(_pair(tie=False)[1], ref.get_quantized_state(packed=True))
    fresh = _pair(tie=False)[0]
    vq.restore_quantized_state(fresh, ours.get_quantized_state(packed=True))
    torch.testing.assert_close(_eval_out(fresh), _eval_out(twin), rtol=0, atol=0)


def test_fixed_float_min_bits_packs() -> None:
    model, twin = _pair(tie=False)
    ours = vq.DiffQuantizer(model, min_size=0, group_size=4, min_bits=2.0, init_bits=6.0)
    ref = diffq.DiffQuantizer(twin, min_size=0, group_size=4, min_bits=2.0, init_bits=6.0)
    _copy_extra(model, twin, "_diffq", randomize=True)
    with pytest.raises(AssertionError):  # its packer asserts on float input
        ref.get_quantized_state(packed=True)
    fresh = _pair(tie=False)[0]
    vq.restore_quantized_state(fresh, ours.get_quantized_state(packed=True))
    torch.testing.assert_close(_eval_out(fresh), _eval_out(twin), rtol=0, atol=0)


def test_fixed_state_loads_with_weights_only() -> None:
    model, twin = _pair()
    ours = vq.DiffQuantizer(model, min_size=0, group_size=4)
    ref = diffq.DiffQuantizer(twin, min_size=0, group_size=4)
    ref_buffer, buffer = io.BytesIO(), io.BytesIO()
    torch.save(ref.get_quantized_state(), ref_buffer)
    torch.save(ours.get_quantized_state(), buffer)
    ref_buffer.seek(0)
    buffer.seek(0)
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(ref_buffer, weights_only=True)  # it pickles the quantizer class
    state = torch.load(buffer, weights_only=True)
    fresh = _pair()[0]
    vq.restore_quantized_state(fresh, state)
    torch.testing.assert_close(_eval_out(fresh), _eval_out(model), rtol=0, atol=0)


def test_fixed_lsq_zero_tensor_is_not_nan() -> None:
    """A zero-initialised bias gets a zero LSQ step in the reference, hence NaN weights."""
    model, twin = _pair()
    vq.LSQ(model, bits=4, min_size=0).no_optimizer()
    diffq.LSQ(twin, bits=4, min_size=0).no_optimizer()
    with pytest.raises(AssertionError):
        _eval_out(twin)
    assert torch.isfinite(_eval_out(model)).all()
    model.train()
    assert torch.isfinite(model(_tokens())).all()
