"""Quantizer names: the built-in registrations (explicit in ``vitquant.quant.quantizers``) and
the names ``quant_summary`` reports (the registered method, not the integer grid)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from vitquant.methods.lsq.quantizer import LSQPlusQuantizer, LSQQuantizer
from vitquant.methods.qvit.quantizer import QViTQuantizer
from vitquant.methods.repq.log2 import Log2Quantizer, Log2Sqrt2Quantizer
from vitquant.methods.vvtq.quantizer import VVTQQuantizer
from vitquant.quant import QuantConfig, format_summary, prepare, quant_summary
from vitquant.quant.quantizers import QUANTIZERS, UniformQuantizer, quantizer_name

# the table of the package docstring, written out independently of the registry
BUILTIN = {
    "uniform": UniformQuantizer,
    "log2": Log2Quantizer,
    "log2_sqrt2": Log2Sqrt2Quantizer,
    "lsq": LSQQuantizer,
    "lsq+": LSQPlusQuantizer,
    "qvit": QViTQuantizer,
    "vvtq": VVTQQuantizer,
}


def test_builtin_table_matches_registry() -> None:
    for name, cls in BUILTIN.items():
        assert QUANTIZERS.get(name) is cls, name
        assert quantizer_name(cls) == name
        assert quantizer_name(cls(4)) == name


@pytest.mark.slow  # a fresh interpreter imports torch (a few seconds)
def test_import_vitquant_registers_every_builtin_in_a_fresh_interpreter() -> None:
    code = (
        "import vitquant, sys\n"
        "from vitquant.quant.quantizers import QUANTIZERS\n"
        "print(','.join(QUANTIZERS.names()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert set(BUILTIN) <= set(out.stdout.strip().split(","))


def test_unregistered_subclass_reports_nearest_registered_base() -> None:
    class MyLSQ(LSQQuantizer):
        pass

    class MyVVTQ(VVTQQuantizer):
        pass

    assert quantizer_name(MyLSQ(4)) == "lsq"
    assert quantizer_name(MyVVTQ(4)) == "vvtq"


def test_summary_reports_registered_names_and_grid() -> None:
    x = torch.randn(8, 16)
    model = nn.ModuleDict()
    for name, cls in BUILTIN.items():
        q = cls(4, role="weight")
        q.calibrate_tensor(x.abs() if cls in (Log2Quantizer, Log2Sqrt2Quantizer) else x)
        model[name.replace("+", "_plus")] = q
    rows = {r["name"]: r for r in quant_summary(model)}
    assert len(rows) == len(BUILTIN)
    for name, cls in BUILTIN.items():
        row = rows[name.replace("+", "_plus")]
        assert row["quantizer"] == name
        assert QUANTIZERS.get(row["quantizer"]) is cls
        # the grid is what export sees: the calibrated quantizer's own QParams kind
        assert row["grid"] == model[name.replace("+", "_plus")].qparams().kind
    assert rows["lsq"]["grid"] == "uniform" and rows["log2"]["grid"] == "log2"
    table = format_summary(list(rows.values()))
    type_col = [line.split()[1] for line in table.splitlines()[2:-1]]
    assert sorted(type_col) == sorted(BUILTIN)


def test_summary_names_quantizers_chosen_by_config_overrides() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    cfg = QuantConfig(
        "ft2", wbits=4, abits=8, overrides={"0.weight_quantizer": {"quantizer": "lsq"}}
    )
    prepare(model, cfg)
    rows = {r["name"]: r for r in quant_summary(model)}
    assert isinstance(model[0].weight_quantizer, LSQQuantizer)
    assert rows["0.weight_quantizer"]["quantizer"] == "lsq"
    assert rows["2.weight_quantizer"]["quantizer"] == "uniform"
    assert {r["grid"] for r in rows.values()} == {"uniform"}
