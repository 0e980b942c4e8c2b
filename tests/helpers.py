"""Test helpers importable from any test module (``from helpers import import_timm``)."""

from __future__ import annotations

import sys
import types

import torch

_TIMM: types.ModuleType | None = None


def import_timm() -> types.ModuleType:
    """Imports timm on the CPU-only torch of these machines.

    torchvision 0.28 (pulled by timm) is a CUDA build whose import fails with "operator
    torchvision::nms does not exist"; defining the two missing op schemas first makes the import
    work (only ``torchvision.ops.nms`` stays broken). Test set-up only: the library never imports
    timm or torchvision.
    """
    global _TIMM
    if _TIMM is None:
        try:
            import timm  # noqa: F401
        except (RuntimeError, ImportError):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _keep.append(lib)
            for mod in [m for m in sys.modules if m.startswith(("timm", "torchvision"))]:
                del sys.modules[mod]
        import timm

        _TIMM = timm
    return _TIMM


_keep: list[object] = []
