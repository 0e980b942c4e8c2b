"""Token alignment of Q-ViT's DGD between models with different prefix tokens.

A distilled DeiT teacher has ``[cls, dist, patches]``, a plain student ``[cls, patches]``: DGD
must compare the student's class token with the teacher's class token and patches with patches,
never a class token with the distillation token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from vitquant.errors import ConfigError
from vitquant.methods.base import StepState
from vitquant.methods.qvit.capture import QKCapture
from vitquant.methods.qvit.method import QViTConfig, QViTMethod
from vitquant.models import create_model
from vitquant.train.losses import DistillationLoss


def _record_qk(model: nn.Module) -> tuple[list[Any], list[tuple[np.ndarray, np.ndarray]]]:
    """Independent capture: the (q, k) operands entering every ``qk_matmul``, as numpy."""
    got: list[tuple[np.ndarray, np.ndarray]] = []

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        got.append((args[0].detach().numpy(), args[1].detach().transpose(-2, -1).numpy()))

    handles = [
        m.qk_matmul.register_forward_pre_hook(hook)
        for m in model.modules()
        if hasattr(m, "qk_matmul")
    ]
    return handles, got


def _gram(x: np.ndarray) -> np.ndarray:
    g = x @ np.swapaxes(x, -1, -2)
    return g / np.linalg.norm(g, axis=-1, keepdims=True)


def _reference(
    s: list[tuple[np.ndarray, np.ndarray]],
    t: list[tuple[np.ndarray, np.ndarray]],
    s_keep: list[int],
    t_keep: list[int],
) -> float:
    """Mean over layers, heads, q/k of the per-image Frobenius distance, averaged over images."""
    terms = []
    for (qs, ks), (qt, kt) in zip(s, t):
        for a, b in ((qs, qt), (ks, kt)):
            d = _gram(b[:, :, t_keep]) - _gram(a[:, :, s_keep])
            terms.append(np.sqrt((d**2).sum(axis=(-2, -1))))  # [B, heads]
    per_image = np.concatenate([x for x in terms], axis=1).mean(axis=1)
    return float(per_image.mean())


def _dgd(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    method = QViTMethod(QViTConfig(irm=False, dgd=True))
    method._student_cap = QKCapture(student)
    crit = DistillationLoss(teacher, "none")
    state = StepState(0, 0, 0, 1, 1, crit)
    out = student(x)
    _, logs = method.loss(out, torch.zeros(x.shape[0], dtype=torch.long), x, state)
    return float(logs["dgd"])


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = create_model("vit_nano_patch4_28").eval()
    dist = create_model("deit_nano_distilled_patch4_28").eval()
    with torch.no_grad():  # distinct class / distillation tokens, so a mix-up shows
        dist.cls_token.normal_(std=1.0)
        dist.dist_token.normal_(std=1.0)
        plain.cls_token.normal_(std=1.0)
    return plain, dist


def test_prefix_tokens_of_plain_and_distilled_models() -> None:
    from vitquant.methods.qvit.capture import prefix_tokens

    plain, dist = _models()
    assert prefix_tokens(plain) == ("cls",)
    assert prefix_tokens(dist) == ("cls", "dist")
    with pytest.raises(ConfigError):
        prefix_tokens(nn.Linear(2, 2))


@pytest.mark.parametrize("student_distilled", [False, True])
def test_dgd_aligns_cls_with_cls_and_patches_with_patches(student_distilled: bool) -> None:
    plain, dist = _models()
    student, teacher = (dist, plain) if student_distilled else (plain, dist)
    x = torch.randn(3, 1, 28, 28)
    hs, s_ref = _record_qk(student)
    ht, t_ref = _record_qk(teacher)
    with torch.no_grad():
        student(x)
        teacher(x)
    for h in hs + ht:
        h.remove()
    n_patch = s_ref[0][0].shape[2] - (2 if student_distilled else 1)
    keep_plain = [0] + list(range(1, 1 + n_patch))
    keep_dist = [0] + list(range(2, 2 + n_patch))  # the dist token (index 1) is dropped
    s_keep, t_keep = (keep_dist, keep_plain) if student_distilled else (keep_plain, keep_dist)
    ref = _reference(s_ref, t_ref, s_keep, t_keep)
    got = _dgd(student, teacher, x)
    assert got == pytest.approx(ref, rel=1e-4)
    # the old alignment (last min(N_s, N_t) tokens: cls against dist) gives another value
    n = min(s_ref[0][0].shape[2], t_ref[0][0].shape[2])
    s_old = list(range(s_ref[0][0].shape[2] - n, s_ref[0][0].shape[2]))
    t_old = list(range(t_ref[0][0].shape[2] - n, t_ref[0][0].shape[2]))
    assert abs(_reference(s_ref, t_ref, s_old, t_old) - ref) > 1e-3


@pytest.mark.parametrize("distilled", [False, True])
def test_dgd_same_layout_compares_every_token(distilled: bool) -> None:
    # two plain models: [cls, patches]; two distilled (Q-ViT's recipes): [cls, dist, patches]
    plain, dist = _models()
    model = dist if distilled else plain
    other = create_model("deit_nano_distilled_patch4_28" if distilled else "vit_nano_patch4_28")
    other.eval()
    x = torch.randn(2, 1, 28, 28)
    assert _dgd(model, model, x) == pytest.approx(0.0, abs=1e-5)
    hs, s_ref = _record_qk(model)
    ht, t_ref = _record_qk(other)
    with torch.no_grad():
        model(x)
        other(x)
    for h in hs + ht:
        h.remove()
    every = list(range(s_ref[0][0].shape[2]))
    assert _dgd(model, other, x) == pytest.approx(_reference(s_ref, t_ref, every, every), rel=1e-4)


def test_dgd_rejects_different_patch_counts() -> None:
    student = create_model("vit_nano_patch4_28").eval()
    teacher = create_model("vit_nano_patch4_28", img_size=32, in_chans=1).eval()
    x = torch.randn(2, 1, 28, 28)
    method = QViTMethod(QViTConfig(irm=False, dgd=True))
    method._student_cap = QKCapture(student)
    crit = DistillationLoss(teacher, "none")

    class _Resize(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net
            self.num_prefix_tokens = net.num_prefix_tokens
            self.cls_token = net.cls_token

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(nn.functional.interpolate(x, size=32))

    crit.teacher = _Resize(teacher)
    state = StepState(0, 0, 0, 1, 1, crit)
    out = student(x)
    with pytest.raises(ConfigError, match="patch tokens"):
        method.loss(out, torch.zeros(2, dtype=torch.long), x, state)
