"""Other libraries' transformer blocks seen as vitquant's pre-norm ViT block, so that
:meth:`~vitquant.runtime.fused.Int8Block.from_block` fuses them.

A view is a transient module that holds the block's own submodules under the names
``Int8Block`` reads (``norm1``, ``attn.qkv``/``qk_matmul``/``softmax``/``av_matmul``/``proj``,
``mlp.fc1``/``act``/``fc2``, ``add1``/``add2``, identities for LayerScale and DropPath); it is
never part of a model. So far: torchvision's ``EncoderBlock`` (after ``prepare``, a
:class:`~vitquant.quant.modules.torchvision.QuantEncoderBlock`).
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import nn

from vitquant.runtime.fused import _identity_like

__all__ = ["torchvision_block_view"]


class _BlockView(nn.Module):
    """Another block's submodules under the names :class:`Int8Block` reads (built transiently by
    :func:`torchvision_block_view`; never part of a model)."""


def torchvision_block_view(block: nn.Module) -> nn.Module | None:
    """A prepared torchvision ``EncoderBlock`` (``QuantEncoderBlock``) seen as a pre-norm ViT
    block, so :meth:`Int8Block.from_block` fuses it; None when its layout is not the standard one.

    ``ln_1``/``ln_2`` become ``norm1``/``norm2``; the ``QuantMultiheadAttention``'s packed input
    projection (``in_proj_weight``/``in_proj_bias`` and its quantizers) becomes ``attn.qkv``
    (q, k, v stacked as in vitquant's ViT), ``out_proj`` ``attn.proj``; the MLP's
    ``Linear, GELU, Dropout, Linear, Dropout`` become ``fc1, act, fc2``; dropouts are identities.
    """
    mha, mlp = getattr(block, "self_attention", None), getattr(block, "mlp", None)
    if mha is None or mlp is None or not hasattr(mha, "qk_matmul"):
        return None
    if not getattr(mha, "batch_first", False) or getattr(mha, "in_proj_weight", None) is None:
        return None
    layers = list(mlp.children()) if isinstance(mlp, nn.Sequential) else []
    if len(layers) != 5 or not all(isinstance(layers[i], nn.Linear) for i in (0, 3)):
        return None
    if not all(_identity_like(layers[i]) for i in (2, 4)) or not _identity_like(block.dropout):
        return None
    attn = _BlockView()
    attn.qkv = SimpleNamespace(
        weight=mha.in_proj_weight, bias=mha.in_proj_bias, _buffers={},
        input_quantizer=getattr(mha, "in_proj_input_quantizer", None),
        weight_quantizer=getattr(mha, "in_proj_weight_quantizer", None),
        output_quantizer=getattr(mha, "in_proj_output_quantizer", None),
    )  # fmt: skip
    attn.proj, attn.softmax = mha.out_proj, mha.softmax
    attn.qk_matmul, attn.av_matmul = mha.qk_matmul, mha.av_matmul
    attn.num_heads, attn.head_dim = int(mha.num_heads), int(mha.head_dim)
    attn.scale = float(mha.head_dim) ** -0.5
    attn.q_norm, attn.k_norm, attn.norm = nn.Identity(), nn.Identity(), nn.Identity()
    view = _BlockView()
    view.norm1, view.norm2, view.add1, view.add2 = block.ln_1, block.ln_2, block.add1, block.add2
    view.attn = attn
    view.mlp = _BlockView()
    view.mlp.fc1, view.mlp.act, view.mlp.fc2 = layers[0], layers[1], layers[3]
    for name in ("ls1", "drop_path1", "ls2", "drop_path2"):
        setattr(view, name, nn.Identity())
    return view
