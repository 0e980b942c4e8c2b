"""Deprecated: the QAT code moved to vitquant.methods (qat, qvit, vvtq) and vitquant.train.qat_run
(old names forwarded until vitquant 0.3)."""

from vitquant._deprecated import forward

__getattr__ = forward(
    __name__,
    {
        "QKCapture": "vitquant.methods.qvit.capture",
        "InformationRectification": "vitquant.methods.qvit.irm",
        "OscillationTracker": "vitquant.methods.vvtq.oscillation",
        "SplitAttention": "vitquant.methods.vvtq.split_attention",
        "split_qkv": "vitquant.methods.vvtq.split_attention",
        "QATScheme": "vitquant.methods.qat.quantize",
        "build_qat_model": "vitquant.methods.qat.quantize",
        "init_qat": "vitquant.methods.qat.quantize",
        "run_qat": "vitquant.train.qat_run",
        "make_softlabels": "vitquant.train.qat_run",
    },
)
