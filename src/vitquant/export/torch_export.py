"""``torch.export`` of quantized models: :func:`export_program`, :func:`save_program`,
:func:`load_program`.

Both forms of a quantized vitquant model trace to an ``ExportedProgram`` (PyTorch's
``torch.export``, the graph format of ExecuTorch, AOTInductor and ``torch.compile``'s export
path):

* the **fake-quant model** (after ``prepare`` + ``calibrate`` or QAT): every quantizer is plain
  ATen ops (``div``, ``round``, ``clamp``, ``mul``), so the program runs anywhere PyTorch does and
  equals the eager model exactly;
* the **lowered int8 model** (:func:`vitquant.runtime.lower`): the integer GEMMs appear as
  ``aten._int_mm`` (backend ``"intmm"``) or as vitquant's custom operators
  (``vitquant::onednn_qlinear``, ``vitquant::int_mm_loop``, see :mod:`vitquant.runtime.ops`),
  each with a fake (shape) implementation so that tracing needs no special handling.

The batch axis is dynamic by default. :func:`export_program` checks the program against the
eager model on the example input (``verify=True``). A oneDNN-lowered program refers to weights
prepacked in this process (an integer handle, not a tensor): it runs here but cannot be saved;
:func:`save_program` refuses it and names the portable backend (``lower(model, "intmm")``).
Loading a program that holds vitquant operators needs vitquant imported, which
:func:`load_program` does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitquant.errors import CheckpointError, ConfigError, VitquantError

__all__ = ["export_program", "save_program", "load_program", "program_ops", "PROCESS_BOUND_OPS"]

#: operators whose arguments name objects of the exporting process (oneDNN packed weights)
PROCESS_BOUND_OPS = ("vitquant.onednn_qlinear",)


def _check_quantizers(model: nn.Module) -> None:
    from vitquant.quant.quantizers import Quantizer

    calibrating = [
        n for n, q in model.named_modules() if isinstance(q, Quantizer) and q.calibrating
    ]
    if calibrating:
        raise ConfigError(
            f"{len(calibrating)} quantizer(s) are still calibrating, e.g. {calibrating[0]}: "
            "finish calibrate() first"
        )
    missing = [
        n for n, q in model.named_modules()
        if isinstance(q, Quantizer) and q.enabled and not q.is_calibrated
    ]  # fmt: skip
    if missing:
        raise ConfigError(
            f"cannot export: {len(missing)} quantizer(s) were never calibrated, e.g. "
            f"{missing[0]} (run calibrate() or load a trained state)"
        )


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def export_program(
    model: nn.Module,
    example_input: Tensor,
    *,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = 1e-5,
) -> torch.export.ExportedProgram:
    """Traces ``model`` (fake-quant or lowered int8, in eval mode) with ``torch.export``.

    Args:
        model: a calibrated / QAT-trained fake-quant model, or ``vitquant.runtime.lower(model)``
            (any backend); put in eval mode.
        example_input: one input batch.
        dynamic_batch: make the batch axis dynamic (``torch.export.Dim``, 1..4096; a batch
            of one is traced as two copies, since ``torch.export`` specialises size 1). It
            traces without gradients, so LSQ-family quantizers (whose gradient scale reads the
            batch size) keep the batch dynamic; a model whose own code fixes the batch size is
            traced with the example's batch size, with a warning.
        verify: run the program on ``example_input`` (and, with a dynamic batch, on its first
            row alone) and check it against the eager model.
        atol: the largest allowed absolute logit difference for ``verify`` (relative to
            ``max(1, max |logit|)``).

    Returns:
        The ``torch.export.ExportedProgram``; ``program.module()(x)`` runs it.

    Raises:
        ConfigError: quantizers still calibrating or enabled but never calibrated, or a
            non-tensor example input.
        VitquantError: ``verify`` found a difference (a bug: please report it).

    Example:
        >>> ep = export_program(vitquant.runtime.lower(model, "intmm"), x)
        >>> save_program(ep, "vit_int8.pt2")
    """
    if not isinstance(example_input, Tensor):
        raise ConfigError("example_input must be a tensor (one input batch)")
    _check_quantizers(model)
    model.eval()
    shapes, traced = None, example_input
    if dynamic_batch:
        shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        if traced.shape[0] < 2:  # torch.export specialises a batch of 1; trace two copies
            traced = torch.cat([traced, traced]) if traced.shape[0] else traced
    program = _export(model, traced, shapes)
    if program is None:  # the model's code fixes the batch size: trace it static
        warnings.warn(
            "export_program: the model's forward specialises the batch size (e.g. LSQ's "
            "gradient scale reads it), so the program takes batches of "
            f"{example_input.shape[0]} only",
            stacklevel=2,
        )
        dynamic_batch = False
        program = _export(model, example_input, None)
        assert program is not None
    if verify:
        checks = [example_input] + ([example_input[:1]] if dynamic_batch else [])
        runner = program.module()
        for x in checks:
            with torch.no_grad():
                want, got = _first(model(x)), _first(runner(x))
            tol = atol * max(1.0, float(want.abs().max()))
            diff = float((want.float() - got.float()).abs().max())
            if got.shape != want.shape or diff > tol:
                raise VitquantError(
                    f"the exported program differs from the eager model (max |diff| {diff:.3g} "
                    f"> {tol:.3g} on a batch of {x.shape[0]})"
                )
    return program


def _export(
    model: nn.Module, x: Tensor, shapes: tuple[dict[int, Any], ...] | None
) -> torch.export.ExportedProgram | None:
    """``torch.export.export``; None when a dynamic batch axis was specialised by the code."""
    from torch._dynamo.exc import UserError

    with warnings.catch_warnings(), torch.no_grad():  # inference graphs (LSQ: no batch read)
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(model, (x,), dynamic_shapes=shapes)
        except UserError as e:
            if shapes is None or "specialized it to be a constant" not in str(e):
                raise
            return None


def program_ops(program: torch.export.ExportedProgram) -> set[str]:
    """The operators a program calls (``"aten._int_mm.default"``, ``"vitquant.int_mm_loop..."``)."""
    return {str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"}


def save_program(program: torch.export.ExportedProgram, path: str | os.PathLike[str]) -> Path:
    """``torch.export.save`` to ``path`` (a ``.pt2`` file), written atomically.

    Raises:
        ConfigError: the program holds oneDNN-prepacked weights of this process (lower with
            ``backend="intmm"`` for a program that loads elsewhere).
    """
    bound = sorted(op for op in program_ops(program) if op.startswith(PROCESS_BOUND_OPS))
    if bound:
        raise ConfigError(
            f"this program calls {bound[0]}, whose prepacked oneDNN weights live only in this "
            "process; lower the model with backend='intmm' to save a portable program"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix or '.pt2'}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on constants shared between tensors
        torch.export.save(program, str(tmp))
    os.replace(tmp, path)
    return path


def load_program(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """``torch.export.load`` with vitquant's custom operators registered first.

    Raises:
        CheckpointError: the file is missing or is not an exported program.
    """
    import vitquant.runtime.ops  # noqa: F401  (registers vitquant::int_mm_loop, ...)

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"exported program not found: {path}")
    try:
        return torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad archive
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load {path} as an exported program: {msg}") from None
