"""Capturing the queries and keys of every attention layer, for distribution-guided distillation.

Q-ViT's DGD (Li et al., NeurIPS 2022, arXiv 2210.06707) compares the patch-similarity matrices of
q and k between a float teacher and the quantized student in every layer and head. The models
route ``q·kᵀ`` through a ``qk_matmul`` module; :class:`QKCapture` hooks it:

* when ``qk_matmul`` holds operand quantizers (a prepared model), the *quantized* operands are
  captured from the outputs of ``a_quantizer`` / ``b_quantizer``;
* otherwise (a float teacher) its inputs are captured.

Queries arrive scaled by ``1/sqrt(head_dim)`` and keys transposed; the keys are transposed back
and the scale is left in place (the row normalisation of the similarity matrices cancels it).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["QKCapture", "attention_modules"]


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
