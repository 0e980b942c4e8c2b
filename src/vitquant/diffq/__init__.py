"""Deprecated: DiffQ moved to vitquant.methods.diffq (its experiments to
vitquant.demo.diffq_experiment) (old names forwarded until vitquant 0.3)."""

from vitquant._deprecated import forward

__getattr__ = forward(
    __name__,
    {
        "BaseQuantizer": "vitquant.methods.diffq",
        "QuantizedParam": "vitquant.methods.diffq",
        "DiffQuantizer": "vitquant.methods.diffq",
        "UniformQuantizer": "vitquant.methods.diffq",
        "LSQ": "vitquant.methods.diffq",
        "QUANTIZERS": "vitquant.methods.diffq",
        "make_quantizer": "vitquant.methods.diffq",
        "restore_quantized_state": "vitquant.methods.diffq",
        "save_quantized_state": "vitquant.methods.diffq",
        "load_quantized_state": "vitquant.methods.diffq",
        "check_state": "vitquant.methods.diffq",
        "run_diffq": "vitquant.demo.diffq_experiment",
        "diffq_config": "vitquant.demo.diffq_experiment",
        "method_values": "vitquant.demo.diffq_experiment",
        "command_line": "vitquant.demo.diffq_experiment",
    },
)
