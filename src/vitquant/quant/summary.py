"""``quant_summary``: one row per quantizer, and a plain-text table of it for the CLI.

Like pytorch-quantization's ``print_quant_summary`` in the FasterTransformer ViT example, but as
data: what is quantized, how, and with which range; points without a quantizer are float.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vitquant.quant.quantizers import Quantizer
from vitquant.quant.quantizers.base import gran_str, quantizer_name

__all__ = ["quant_summary", "format_summary"]


def quant_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One dict per quantizer of ``model``.

    Keys: ``name`` (module path), ``kind`` (``"weight"``/``"activation"``), ``point`` (point kind),
    ``quantizer`` (the name it is registered under in ``QUANTIZERS``: ``uniform``, ``log2``,
    ``lsq``, ``qvit``, ...), ``grid`` (its integer grid, ``QParams.kind``: ``uniform``, ``log2``
    or ``log2_sqrt2``), ``bits``, ``signed``, ``symmetric``,
    ``granularity``, ``enabled``, ``calibrated``, ``amax`` (float, list per channel, or None),
    ``amin`` (asymmetric only), ``scale``, ``zero_point`` (float or list, None if uncalibrated),
    ``range`` (short text).
    """
    rows: list[dict[str, Any]] = []
    for name, m in model.named_modules():
        if not isinstance(m, Quantizer):
            continue

        def val(t: Any) -> Any:
            if t is None or t.numel() == 0:
                return None
            return t.item() if t.numel() == 1 else t.detach().cpu().flatten().tolist()

        rows.append(
            {
                "name": name,
                "kind": "weight" if m.role == "weight" else "activation",
                "point": getattr(m, "point", ""),
                "quantizer": quantizer_name(m),
                "grid": m.kind,
                "bits": m.bits,
                "signed": m.signed,
                "symmetric": m.symmetric,
                "granularity": gran_str(m.granularity),
                "enabled": m.enabled,
                "calibrated": m.is_calibrated,
                "amax": val(m.amax),
                "amin": val(m.amin),
                "scale": val(m.scale),
                "zero_point": val(m.zero_point),
                "range": m.range_summary(),
            }
        )
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table of :func:`quant_summary` rows with a count line at the end."""
    cols = [
        ("name", "quantizer"),
        ("point", "point"),
        ("quantizer", "type"),
        ("bits", "bits"),
        ("granularity", "granularity"),
        ("enabled", "on"),
        ("range", "range"),
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        v = row[key]
        if key == "bits":
            sign = "s" if row["signed"] else "u"
            return f"{v}{sign}{'' if row['symmetric'] else '/asym'}"
        if key == "enabled":
            return "yes" if v else "no"
        return str(v)

    table = [[title for _, title in cols]] + [[cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_w = sum(r["kind"] == "weight" for r in rows)
    n_on = sum(bool(r["enabled"]) for r in rows)
    n_cal = sum(bool(r["calibrated"]) for r in rows)
    lines.append(
        f"{len(rows)} quantizers ({n_w} weight, {len(rows) - n_w} activation); {n_on} enabled, "
        f"{n_cal} calibrated. Points without a quantizer stay float."
    )
    return "\n".join(lines)
