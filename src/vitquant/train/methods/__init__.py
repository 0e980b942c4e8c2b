"""Deprecated: the training methods moved to :mod:`vitquant.methods` (old names forwarded until
vitquant 0.3)."""

from vitquant._deprecated import forward

__getattr__ = forward(
    __name__,
    {
        "METHODS": "vitquant.methods",
        "MethodConfig": "vitquant.methods",
        "MethodContext": "vitquant.methods",
        "StepState": "vitquant.methods",
        "TrainMethod": "vitquant.methods",
        "get_method": "vitquant.methods",
        "build_method": "vitquant.methods",
        "BROKEN": "vitquant.methods",
    },
)
