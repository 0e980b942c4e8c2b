"""Capturing the queries and keys of every attention layer, for distribution-guided distillation.

Q-ViT's DGD (Li et al., NeurIPS 2022, arXiv 2210.06707) compares the patch-similarity matrices of
q and k between a float teacher and the quantized student in every layer and head. The models
route ``q·kᵀ`` through a ``qk_matmul`` module; :class:`QKCapture` hooks it:

* when ``qk_matmul`` holds operand quantizers (a prepared model), the *quantized* operands are
  captured from the outputs of ``a_quantizer`` / ``b_quantizer``;
* otherwise (a float teacher) its inputs are captured.

Queries arrive scaled by ``1/sqrt(head_dim)`` and keys transposed; the keys are transposed back
and the scale is left in place (the row normalisation of the similarity matrices cancels it).

The captured tensors hold every token, prefix tokens first. :func:`prefix_tokens` names a
model's (class token, DeiT's distillation token) and :func:`dgd_tokens` keeps the tokens DGD
compares, so that a distilled teacher's ``[cls, dist, patches]`` meets a plain student's
``[cls, patches]`` as class token with class token and patch with patch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vitquant.errors import ConfigError

__all__ = ["QKCapture", "attention_modules", "prefix_tokens", "dgd_tokens", "NAMED_PREFIX_TOKENS"]


#: prefix tokens DGD compares between teacher and student when both models have them
NAMED_PREFIX_TOKENS = ("cls", "dist")


def prefix_tokens(model: nn.Module) -> tuple[str, ...]:
    """The prefix tokens of a ViT, in order: ``("cls",)``, DeiT's ``("cls", "dist")``, ...

    Reads the model's ``num_prefix_tokens`` (vitquant's and timm's ViTs) and which of
    ``cls_token`` / ``dist_token`` it has (they come first, in that order); any further prefix
    token (timm's register tokens) is ``"other"``. A wrapper with ``.module`` (data-parallel) is
    looked through.

    Raises:
        ConfigError: the model does not say how many prefix tokens it has, or has fewer than
            its class and distillation tokens.
    """
    net = model
    while not hasattr(net, "num_prefix_tokens") and isinstance(
        getattr(net, "module", None), nn.Module
    ):
        net = net.module  # type: ignore[assignment]
    n = getattr(net, "num_prefix_tokens", None)
    if not isinstance(n, int) or n < 0:
        raise ConfigError(
            f"DGD needs to know the prefix tokens of {type(model).__name__}: it has no "
            "num_prefix_tokens attribute"
        )
    names = [t for t in NAMED_PREFIX_TOKENS if getattr(net, f"{t}_token", None) is not None]
    if len(names) > n:
        raise ConfigError(
            f"{type(net).__name__} has {', '.join(names)} tokens but num_prefix_tokens={n}"
        )
    return tuple(names + ["other"] * (n - len(names)))


def dgd_tokens(x: Tensor, prefix: tuple[str, ...], keep: tuple[str, ...]) -> Tensor:
    """The tokens of ``x`` (``[..., N, D]``, prefix tokens first) that DGD compares: the prefix
    tokens named in ``keep`` (in ``keep``'s order), then every patch token."""
    if prefix == keep:
        return x
    n = len(prefix)
    idx = [prefix.index(t) for t in keep] + list(range(n, x.shape[-2]))
    return x.index_select(-2, torch.tensor(idx, device=x.device))


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of ``model`` (those with a ``qk_matmul``), in forward order."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(getattr(m, "qk_matmul", None), nn.Module)
    ]


class QKCapture:
    """Records ``(q, k)`` of every attention layer during forward passes of ``model``.

    Args:
        model: a ViT (float or prepared).
        detach: store detached tensors (for a teacher).

    Attributes:
        prefix: the model's :func:`prefix_tokens` (e.g. ``("cls", "dist")``).

    Raises:
        ConfigError: the model does not say how many prefix tokens it has.

    Example:
        >>> cap = QKCapture(student)
        >>> logits = student(x)
        >>> pairs = cap.pop()          # [(q, k)] per layer, each [B, heads, N, head_dim]
        >>> cap.remove()
    """

    def __init__(self, model: nn.Module, detach: bool = False) -> None:
        self.detach = detach
        self._handles: list[RemovableHandle] = []
        self._q: dict[int, Tensor] = {}
        self._k: dict[int, Tensor] = {}
        self.prefix = prefix_tokens(model)
        self.layers = attention_modules(model)
        for i, (_, attn) in enumerate(self.layers):
            mm = attn.qk_matmul
            aq, bq = getattr(mm, "a_quantizer", None), getattr(mm, "b_quantizer", None)
            if isinstance(aq, nn.Module) and isinstance(bq, nn.Module):
                self._handles.append(aq.register_forward_hook(self._out_hook(i, self._q, False)))
                self._handles.append(bq.register_forward_hook(self._out_hook(i, self._k, True)))
            else:
                self._handles.append(mm.register_forward_pre_hook(self._in_hook(i)))

    def _keep(self, t: Tensor) -> Tensor:
        return t.detach() if self.detach else t

    def _out_hook(self, i: int, store: dict[int, Tensor], transpose: bool) -> Any:
        def hook(_: nn.Module, __: Any, out: Tensor) -> None:
            store[i] = self._keep(out.transpose(-2, -1) if transpose else out)

        return hook

    def _in_hook(self, i: int) -> Any:
        def hook(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            a, b = args[0], args[1]
            self._q[i] = self._keep(a)
            self._k[i] = self._keep(b.transpose(-2, -1))

        return hook

    def pop(self) -> list[tuple[Tensor, Tensor]]:
        """The captured ``(q, k)`` per layer of the last forward, and forgets them."""
        n = len(self.layers)
        if len(self._q) != n or len(self._k) != n:
            got = len(self._q)
            self.clear()
            raise RuntimeError(f"captured q/k of {got} of {n} attention layers")
        pairs = [(self._q[i], self._k[i]) for i in range(n)]
        self.clear()
        return pairs

    def clear(self) -> None:
        """Forgets the captured tensors."""
        self._q.clear()
        self._k.clear()

    def remove(self) -> None:
        """Removes the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()
