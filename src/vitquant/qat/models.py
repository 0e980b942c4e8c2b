"""Deprecated: the QAT model names moved to vitquant.methods.{qat,qvit,vvtq}.models (old names
forwarded until vitquant 0.3)."""

from vitquant._deprecated import forward

__getattr__ = forward(
    __name__,
    {
        "base_architecture": "vitquant.methods.qat.models",
        "QVIT_BITS": "vitquant.methods.qvit.models",
        "has_split_attention": "vitquant.methods.vvtq.models",
        "load_fused_checkpoint": "vitquant.methods.vvtq.models",
    },
)
