"""Fisher weights of block outputs for reconstruction: :func:`block_fisher_weights`.

BRECQ (Li et al., ICLR 2021, arXiv 2102.05426, section 3.2) replaces the plain output MSE of a
reconstructed block by a loss weighted with the diagonal of the Fisher information of its output
``z``, ``sum_i F_ii (z_q,i - z_i)^2`` with ``F_ii = E[(dL/dz_i)^2]``: an error in an output
element that moves the task loss much counts for more than one the rest of the network ignores.
FIMA-Q and APHQ-ViT (both CVPR 2025) refine the same idea for ViTs.

Here the calibration images are unlabelled, so the loss is the cross-entropy of the float model
against its own top-1 prediction (the empirical Fisher with pseudo-labels), and ``dL/dz`` is
taken once, in the float model, for every block at the same time (one forward and backward pass
over the calibration images: the float model does not change while the quantized one is
reconstructed). Per block the squared gradients are normalised to mean 1 and mixed with the
plain MSE's uniform weight, ``w = (1 - mix) + mix * g^2 / mean(g^2)``, so ``mix=0`` is MSE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vitquant.errors import ConfigError

__all__ = ["block_fisher_weights"]

_BATCH = 64  # images per forward and backward pass


def block_fisher_weights(
    model_float: nn.Module, blocks: Sequence[nn.Module], images: Tensor, mix: float = 1.0
) -> list[Tensor]:
    """Per-element loss weights of each block's output (``w`` of the module docstring).

    Args:
        model_float: the float classifier (its output: logits, ``(batch, classes)``); its
            parameters and their gradients are not modified.
        blocks: submodules of ``model_float``, each run once per forward pass, returning a tensor.
        images: the calibration images (every one is used, in order).
        mix: weight of the Fisher term against the uniform weight (0..1).

    Returns:
        One tensor per block, shaped like the block's output on ``images`` (bfloat16, on the CPU
        or the model's device), mean 1 over its elements; all ones where the gradients vanish.

    Raises:
        ConfigError: ``mix`` outside 0..1, an output that is not 2-D logits, or a block that does
            not run exactly once per forward pass.
    """
    if not 0.0 <= float(mix) <= 1.0:
        raise ConfigError(f"fisher mix={mix!r} must be in [0, 1]")
    dev = next((p.device for p in model_float.parameters()), torch.device("cpu"))
    outs: list[Tensor] = []

    def keep(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not isinstance(out, Tensor):
            raise ConfigError("fisher weights: a block returned something other than a tensor")
        outs.append(out)

    hooks = [b.register_forward_hook(keep) for b in blocks]
    sums: list[list[Tensor]] = [[] for _ in blocks]
    was = model_float.training
    model_float.eval()
    try:
        with torch.enable_grad():
            for chunk in images.split(_BATCH):
                outs.clear()
                x = chunk.to(dev).requires_grad_(True)
                logits = model_float(x)
                if not isinstance(logits, Tensor) or logits.dim() != 2:
                    raise ConfigError("fisher weights: the model must return 2-D logits")
                if len(outs) != len(blocks):
                    raise ConfigError(
                        f"fisher weights: {len(outs)} block outputs for {len(blocks)} blocks "
                        "(each block must run once per forward pass)"
                    )
                labels = logits.detach().argmax(dim=-1)
                loss = F.cross_entropy(logits, labels, reduction="sum")
                grads = torch.autograd.grad(loss, outs, allow_unused=True)
                for i, (g, o) in enumerate(zip(grads, outs, strict=True)):
                    sums[i].append((torch.zeros_like(o) if g is None else g).detach().pow(2))
    finally:
        for h in hooks:
            h.remove()
        outs.clear()
        model_float.train(was)
    weights = []
    for parts in sums:
        g2 = torch.cat(parts)
        mean = g2.mean()
        if not bool(torch.isfinite(mean)) or float(mean) <= 0.0:
            weights.append(torch.ones_like(g2, dtype=torch.bfloat16))
            continue
        w = (1.0 - float(mix)) + float(mix) * (g2 / mean)
        weights.append(w.to(torch.bfloat16))
    return weights
