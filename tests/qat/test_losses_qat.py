"""Tests of the QAT losses: DGD, soft CE, KL distillation, bin regulariser and its schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitquant.errors import ConfigError
from vitquant.train.losses_qat import (
    CosineRampSchedule,
    bin_regularizer,
    dgd_loss,
    kl_distillation,
    similarity_matrix,
    soft_cross_entropy,
)


def _qk(layers: int = 3, b: int = 2, h: int = 2, n: int = 5, d: int = 4) -> list:
    return [(torch.randn(b, h, n, d), torch.randn(b, h, n, d)) for _ in range(layers)]


def test_similarity_matrix_matches_numpy() -> None:
    x = torch.randn(2, 3, 6, 4)
    g = x.numpy() @ np.swapaxes(x.numpy(), -1, -2)
    ref = g / np.linalg.norm(g, axis=-1, keepdims=True)
    np.testing.assert_allclose(similarity_matrix(x).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_similarity_matrix_zero_row_has_a_bounded_gradient() -> None:
    # a 2-bit query that rounds to all zeros: plain normalisation's gradient there is ~1/eps
    x = torch.randn(1, 1, 6, 4)
    x[..., 2, :] = 0.0
    x.requires_grad_()
    w = torch.randn(1, 1, 6, 6)
    (similarity_matrix(x) * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert float(x.grad.abs().max()) < 1e3
    plain = x.detach().clone().requires_grad_()
    g = plain @ plain.transpose(-2, -1)
    (F.normalize(g, dim=-1, eps=1e-12) * w).sum().backward()
    assert plain.grad is not None and float(plain.grad.abs().max()) > 1e6
    # rows above the floor are unit rows, the zero row stays zero
    out = similarity_matrix(x.detach())
    norms = out.norm(dim=-1)[0, 0]
    assert float(norms[2]) == 0.0
    torch.testing.assert_close(norms[[0, 1, 3, 4, 5]], torch.ones(5))


def test_dgd_zero_for_identical_and_positive_otherwise() -> None:
    t = _qk()
    s = [(q.clone(), k.clone()) for q, k in t]
    assert float(dgd_loss(s, t)) == pytest.approx(0.0, abs=1e-5)
    s[1] = (s[1][0] + 0.5 * torch.randn_like(s[1][0]), s[1][1])
    assert float(dgd_loss(s, t)) > 1e-3


def test_dgd_is_invariant_to_per_tensor_scale_and_has_gradients() -> None:
    # row normalisation cancels a global factor (e.g. the 1/sqrt(d) of attention)
    t = _qk()
    s = [(3.0 * q, 0.5 * k) for q, k in t]
    assert float(dgd_loss(s, t)) == pytest.approx(0.0, abs=1e-5)
    s = [(q + 0.1 * torch.randn_like(q), k) for q, k in t]
    s = [(q.requires_grad_(), k) for q, k in s]
    dgd_loss(s, t).backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q, _ in s)


def test_dgd_reference_sum_over_layers_and_heads() -> None:
    t, s = _qk(2, b=3), _qk(2, b=3)
    ref = 0.0
    for (qs, ks), (qt, kt) in zip(s, t):
        for a, c in ((qs, qt), (ks, kt)):
            for bi in range(3):
                for hi in range(2):
                    ga = similarity_matrix(a[bi, hi])
                    gc = similarity_matrix(c[bi, hi])
                    ref += float(torch.linalg.matrix_norm(gc - ga)) / 3
    assert float(dgd_loss(s, t)) == pytest.approx(ref, rel=1e-5)


def test_dgd_rejects_mismatched_layers() -> None:
    with pytest.raises(ConfigError):
        dgd_loss(_qk(2), _qk(3))
    with pytest.raises(ConfigError):
        dgd_loss(_qk(2, n=5), _qk(2, n=6))


def test_soft_cross_entropy_equals_torch_cross_entropy_with_probabilities() -> None:
    z = torch.randn(4, 7)
    p = torch.softmax(torch.randn(4, 7), -1)
    assert float(soft_cross_entropy(z, p)) == pytest.approx(float(F.cross_entropy(z, p)), rel=1e-6)


@pytest.mark.filterwarnings("ignore:reduction")
def test_kl_distillation_against_kldivloss() -> None:
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    ft = torch.nn.KLDivLoss()(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1))
    got = kl_distillation(s, t, tau=3.0, reduction="mean", tau_squared=False)
    assert float(got) == pytest.approx(float(ft), rel=1e-5)
    p, q = F.softmax(t / 2, -1).numpy(), F.softmax(s / 2, -1).numpy()
    ref = 4.0 * float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    assert float(kl_distillation(s, t, tau=2.0)) == pytest.approx(ref, rel=1e-5)
    with pytest.raises(ConfigError):
        kl_distillation(s, torch.randn(4, 9))


def _bin_reg_loop(w: torch.Tensor, s: float, qmin: int, qmax: int) -> float:
    """The seed's formulation: a Python loop over the bins with torch.var."""
    c = w.clamp(qmin * s, qmax * s)
    q = torch.round(c / s).clamp(qmin, qmax)
    total = float(((q * s - c) ** 2).mean())
    for b in range(qmin, qmax + 1):
        sel = c[q == b]
        if sel.numel() > 1:
            total += float(sel.var())
    return total


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bin_regularizer_matches_loop(bits: int) -> None:
    w = torch.randn(64, 32) * 0.05
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = 0.02
    got = bin_regularizer(w, torch.tensor(s), qmin, qmax)
    assert float(got) == pytest.approx(_bin_reg_loop(w, s, qmin, qmax), rel=1e-4)


def test_bin_regularizer_zero_on_grid_and_pulls_toward_centres() -> None:
    s = torch.tensor(0.1)
    on_grid = torch.randint(-2, 2, (100,)).float() * s
    assert float(bin_regularizer(on_grid, s, -2, 1)) == pytest.approx(0.0, abs=1e-10)
    w = (torch.randn(200) * 0.1).requires_grad_()
    loss = bin_regularizer(w, s, -2, 1)
    loss.backward()
    with torch.no_grad():
        w2 = w - 0.5 * w.grad
    assert float(bin_regularizer(w2, s, -2, 1)) < float(loss.detach())


def test_cosine_ramp_schedule() -> None:
    sch = CosineRampSchedule(t_max=100, start=0.0, end=0.01, ramp_start=0.25)
    assert sch(0) == 0.0 and sch(24.9) == 0.0
    assert sch(100) == pytest.approx(0.01)
    mid = 25 + 75 / 2
    assert sch(mid) == pytest.approx(0.005)
    vals = [sch(t) for t in range(0, 101)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert sch(62.5) == pytest.approx(0.01 + 0.5 * (0 - 0.01) * (1 + math.cos(0.5 * math.pi)))


def test_dgd_average_terms_divides_by_layers_heads_and_qk() -> None:
    t, s = _qk(3, h=2), _qk(3, h=2)
    total = dgd_loss(s, t)
    torch.testing.assert_close(dgd_loss(s, t, average_terms=True), total / (3 * 2 * 2))


def _dgd_of_models(student: torch.nn.Module, teacher: torch.nn.Module) -> torch.Tensor:
    from vitquant.methods.qvit.capture import QKCapture

    s_cap, t_cap = QKCapture(student), QKCapture(teacher, detach=True)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    student(x)
    with torch.no_grad():
        teacher(x)
    loss = dgd_loss(s_cap.pop(), t_cap.pop(), average_terms=True)
    s_cap.remove()
    t_cap.remove()
    return loss


def test_dgd_gradient_reaches_the_students_qk_projection() -> None:
    import copy

    from vitquant.methods.qat.quantize import QATScheme, build_qat_model, init_qat
    from vitquant.models import create_model

    torch.manual_seed(0)
    teacher = create_model("vit_nano_patch4_28").eval()
    student = build_qat_model(copy.deepcopy(teacher), QATScheme(3, 3, input_quantizer="qvit"))
    init_qat(student, [torch.randn(8, 1, 28, 28)], num_batches=1)
    student.eval()
    loss = _dgd_of_models(student, teacher)
    assert float(loss.detach()) > 1e-3
    loss.backward()
    c = teacher.embed_dim
    for i, blk in enumerate(student.blocks):
        g = blk.attn.qkv.weight.grad
        assert g is not None and torch.isfinite(g).all(), f"block {i}"
        assert float(g[: 2 * c].abs().sum()) > 0, f"no gradient on q/k rows of block {i}"
    # the last layer's values feed no later query or key: DGD gives them nothing
    last = student.blocks[-1].attn.qkv.weight.grad
    assert float(last[2 * c :].abs().sum()) == 0.0
    assert student.head.weight.grad is None or float(student.head.weight.grad.abs().sum()) == 0


def test_dgd_gradient_is_zero_when_the_student_is_the_teacher() -> None:
    import copy

    from vitquant.models import create_model

    torch.manual_seed(0)
    teacher = create_model("vit_nano_patch4_28").eval()
    student = copy.deepcopy(teacher)
    loss = _dgd_of_models(student, teacher)
    assert float(loss.detach()) == 0.0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and float(g.abs().sum()) == 0 for g in grads)
