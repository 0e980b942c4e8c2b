"""Deprecated: the QAT losses moved to their methods (old names forwarded until vitquant 0.3)."""

from vitquant._deprecated import forward

__getattr__ = forward(
    __name__,
    {
        "similarity_matrix": "vitquant.methods.qvit.losses",
        "dgd_loss": "vitquant.methods.qvit.losses",
        "soft_cross_entropy": "vitquant.methods.vvtq.losses",
        "bin_regularizer": "vitquant.methods.vvtq.losses",
        "CosineRampSchedule": "vitquant.methods.vvtq.losses",
        "kl_distillation": "vitquant.methods.ft_qat.losses",
    },
)
