"""The old import paths of moved modules keep working for one release, with a DeprecationWarning.

Each old module is the new module itself (one object, so ``isinstance`` and ``monkeypatch``
agree); old packages whose names went to several homes forward each name. Checked in a fresh
interpreter, since an alias warns only on its first import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MOVED = {
    "vitquant.qat.irm": "vitquant.methods.qvit.irm",
    "vitquant.qat.quantize": "vitquant.methods.qat.quantize",
    "vitquant.qat.ablation": "vitquant.demo.qat_ablation",
    "vitquant.quant.quantizers.lsq": "vitquant.methods.lsq.quantizer",
    "vitquant.quant.quantizers.log2": "vitquant.methods.repq.log2",
    "vitquant.quant.sweep": "vitquant.methods.ptq.sweep",
    "vitquant.export.bitpack": "vitquant.quant.bitpack",
    "vitquant.data.softlabels": "vitquant.methods.vvtq.softlabels",
    "vitquant.train.methods.qvit": "vitquant.methods.qvit.method",
    "vitquant.diffq.diffq": "vitquant.methods.diffq.diffq",
    "vitquant.recipes": "vitquant.train.recipes",
    "vitquant.demo_utils": "vitquant.demo.utils",
}

FORWARDED = {
    ("vitquant.qat", "build_qat_model"): "vitquant.methods.qat.quantize",
    ("vitquant.qat", "run_qat"): "vitquant.train.qat_run",
    ("vitquant.diffq", "DiffQuantizer"): "vitquant.methods.diffq",
    ("vitquant.diffq", "run_diffq"): "vitquant.demo.diffq_experiment",
    ("vitquant.train.methods", "METHODS"): "vitquant.methods",
    ("vitquant.train.losses_qat", "dgd_loss"): "vitquant.methods.qvit.losses",
    ("vitquant.quant.quantizers", "LSQQuantizer"): "vitquant.methods.lsq.quantizer",
    ("vitquant.quant", "Log2Quantizer"): "vitquant.methods.repq.log2",
}


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_old_module_path_is_the_new_module_and_warns(old: str, new: str) -> None:
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    a = importlib.import_module({old!r})\n"
        f"b = importlib.import_module({new!r})\n"
        "assert a is b, (a, b)\n"
        "msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]\n"
        f"assert any({new!r} in m for m in msgs), msgs\n"
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("where", "new"), sorted(FORWARDED.items()))
def test_old_package_names_are_forwarded_with_a_warning(where: tuple[str, str], new: str) -> None:
    old, name = where
    code = (
        "import importlib, warnings\n"
        f"m = importlib.import_module({old!r})\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    obj = getattr(m, {name!r})\n"
        f"assert obj is getattr(importlib.import_module({new!r}), {name!r})\n"
        "assert any(issubclass(x.category, DeprecationWarning) for x in w)\n"
        "try:\n"
        "    m.no_such_name\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('unknown names must raise AttributeError')\n"
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr


def test_old_module_runs_as_a_script() -> None:
    r = _python("import runpy; runpy.run_module('vitquant.qat.ablation', run_name='__main__')")
    assert r.returncode == 2 and "--finetune" in r.stderr  # argparse: the new module's options
