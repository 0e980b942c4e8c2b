"""torchvision's ViT (``torchvision.models.VisionTransformer``, ``vit_b_16`` and its family) made
quantizable.

torchvision's ``EncoderBlock`` (Dosovitskiy et al., "An image is worth 16x16 words", ICLR 2021,
as torchvision writes it) is a pre-norm block: ``ln_1 -> self_attention (nn.MultiheadAttention,
batch_first) -> dropout -> + input``, then ``ln_2 -> mlp (MLPBlock: Linear, GELU, Dropout,
Linear, Dropout) -> + x``. Its residual adds are plain ``+`` in ``forward``, which no module swap
can reach, so :class:`QuantEncoderBlock` computes exactly the same function with the two adds as
:class:`~vitquant.quant.modules.ops.QuantAdd` modules ``add1``/``add2`` (``a`` = the skip input,
``b`` = the branch, as FasterTransformer's ``add{1,2}_{residual,local}_input``). It holds the
original block's submodules under their names, so state dicts (and torchvision's checkpoints)
are unchanged. The rest needs nothing model-specific: ``prepare`` turns ``self_attention`` into a
:class:`~vitquant.quant.modules.attention.QuantMultiheadAttention` (packed input projection,
q·kᵀ, softmax, attn·v, ``out_proj``), the MLP's Linears into ``QuantLinear``, and ``ln_1``/``ln_2``
into ``QuantLayerNorm`` (the block's LayerNorm inputs).

torchvision is never imported here: the block is recognised by its class name, module and
attributes, so this module works (and does nothing) where torchvision is absent.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from vitquant.quant.modules.ops import QuantAdd

__all__ = ["QuantEncoderBlock", "is_torchvision_encoder_block", "swap_torchvision_blocks"]

_BLOCK_ATTRS = ("ln_1", "self_attention", "dropout", "ln_2", "mlp")


def is_torchvision_encoder_block(m: nn.Module) -> bool:
    """True for torchvision's ViT ``EncoderBlock`` and for :class:`QuantEncoderBlock`."""
    if isinstance(m, QuantEncoderBlock):
        return True
    t = type(m)
    return (
        t.__name__ == "EncoderBlock"
        and t.__module__.startswith("torchvision.models")
        and all(hasattr(m, a) for a in _BLOCK_ATTRS)
        and isinstance(m.self_attention, nn.MultiheadAttention)
    )


class QuantEncoderBlock(nn.Module):
    """torchvision ``EncoderBlock`` with its residual adds as ``add1``/``add2`` modules.

    Args:
        num_heads: the block's number of heads (torchvision keeps it as an attribute).
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.add1 = QuantAdd()
        self.add2 = QuantAdd()

    @classmethod
    def from_torchvision(cls, m: nn.Module) -> QuantEncoderBlock:
        """The equivalent of torchvision's ``EncoderBlock`` ``m``, holding its submodules."""
        heads = getattr(m, "num_heads", None)
        new = cls(int(heads if heads is not None else m.self_attention.num_heads))
        for name, child in m.named_children():
            setattr(new, name, child)
        new.train(m.training)
        return new

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (torchvision's argument name)
        torch._assert(
            input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}"
        )
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.add1(input, self.dropout(x))
        return self.add2(x, self.mlp(self.ln_2(x)))


def swap_torchvision_blocks(model: nn.Module) -> int:
    """Replaces every torchvision ``EncoderBlock`` of ``model`` by a :class:`QuantEncoderBlock`.

    Called by :func:`vitquant.quant.prepare`; the blocks' submodules and parameters are kept, so
    the state dict and the float function are unchanged.

    Returns:
        The number of blocks replaced.
    """
    count = 0
    for fqn, m in list(model.named_modules()):
        if not fqn or isinstance(m, QuantEncoderBlock) or not is_torchvision_encoder_block(m):
            continue
        new = QuantEncoderBlock.from_torchvision(m)
        if set(new.state_dict()) != set(m.state_dict()):
            warnings.warn(f"prepare: {fqn} (EncoderBlock) not swapped: state differs", stacklevel=3)
            continue
        parent_name, _, attr = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        count += 1
    return count
