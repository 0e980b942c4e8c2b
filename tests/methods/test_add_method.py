"""Adding a method is one new folder: the walkthrough of ``docs/architecture.md``, run as written.

The two files of the section "Adding a method" are taken from the document itself, written as a
folder ``toy/`` on the search path of :mod:`vitquant.methods` (the same as a folder inside the
package, without writing into the source tree), and ``vitquant train --method toy`` trains with
them in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"

RUN = """
import sys
import vitquant.methods as M
M.__path__.append(sys.argv[1])
M._import_all()
from vitquant.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _walkthrough_files() -> dict[str, str]:
    """``{file name: source}`` of the section's python block, split at its ``# src/...`` lines."""
    text = DOC.read_text()
    section = text[text.index("## Adding a method") :]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "docs/architecture.md: no python block under 'Adding a method'"
    files: dict[str, str] = {}
    current = None
    for line in block.group(1).splitlines():
        m = re.match(r"# src/vitquant/methods/toy/(\w+\.py)$", line)
        if m:
            current = m.group(1)
            files[current] = ""
        elif current is not None:
            files[current] += line + "\n"
    return files


def _run(ext: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-c", RUN, str(ext), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_a_new_folder_is_a_new_method(tmp_path: Path) -> None:
    files = _walkthrough_files()
    assert set(files) == {"__init__.py", "method.py"}
    pkg = tmp_path / "ext" / "toy"
    pkg.mkdir(parents=True)
    for name, source in files.items():
        (pkg / name).write_text(source)

    help_text = _run(tmp_path / "ext", "train", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "toy" in help_text.stdout and "--bits" in help_text.stdout

    out = tmp_path / "runs"
    args = ["train", "--method", "toy", "--bits", "4", "--model", "vit_nano_patch4_28"]
    args += ["--data-path", "digits", "--epochs", "1", "--batch-size", "32"]
    args += ["--train-subset", "128", "--eval-subset", "64", "--quiet", "--output", str(out)]
    r = _run(tmp_path / "ext", *args)
    assert r.returncode == 0, r.stderr
    (exp,) = [p.parent for p in out.rglob("result.json")]
    result = json.loads((exp / "result.json").read_text())
    assert 0.0 <= result["top1"] <= 100.0
    state = torch.load(exp / "last.pt", weights_only=True)["model"]
    # the model that trained is the toy method's quantized one, calibrated at 4 bits
    extra = [v for k, v in state.items() if k.endswith("quantizer._extra_state")]
    assert extra and all(e["bits"] == 4 for e in extra), "no 4-bit quantizer in the checkpoint"
    assert "method: toy" in (exp / "config.yaml").read_text()
