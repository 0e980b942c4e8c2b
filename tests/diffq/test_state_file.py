"""The saved states on a 0.8M-parameter ViT: file size, ``weights_only`` loading, and a bit-exact
restore in a fresh Python process (one child process restores the three methods' files)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vitquant
from vitquant.methods.diffq import LSQ, DiffQuantizer, UniformQuantizer, save_quantized_state

MODEL = "vit_micro_patch4_28"

CHILD = textwrap.dedent(
    """
    import sys, torch, vitquant
    from vitquant.methods.diffq import restore_quantized_state
    for path in sys.argv[2:]:
        state = torch.load(path, weights_only=True)
        model = vitquant.create_model(sys.argv[1])
        restore_quantized_state(model, state)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, path + ".restored")
    """
)

MAKERS = {
    "diffq": lambda m: DiffQuantizer(m, group_size=8),
    "uniform": lambda m: UniformQuantizer(m, bits=4, float16=True),
    "lsq": lambda m: LSQ(m, bits=3),
}


def test_saved_states_small_safe_and_bit_exact_in_fresh_process(tmp_path: Path) -> None:
    expected, paths = {}, []
    for name, make in MAKERS.items():
        torch.manual_seed(0)
        model = vitquant.create_model(MODEL)
        assert sum(p.numel() for p in model.parameters()) >= 500_000
        quantizer = make(model)
        with torch.no_grad():  # spread DiffQ's bit widths over 2..15
            for pname, p in model.named_parameters():
                if pname.endswith("_diffq"):
                    p.uniform_(-4, 4)
        path = save_quantized_state(quantizer, tmp_path / f"{name}.th")
        size_mb = path.stat().st_size / 2**20
        assert size_mb <= 1.10 * quantizer.true_model_size(), name
        assert size_mb == pytest.approx(quantizer.packed_model_size())
        torch.load(path, weights_only=True)  # no pickled classes
        with quantizer.enter_quantize():
            weights = {k: v.clone() for k, v in model.state_dict().items()}
        expected[path] = {k: v for k, v in weights.items() if not k.endswith(("_diffq", "_lsq"))}
        paths.append(str(path))

    src = str(Path(vitquant.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-c", CHILD, MODEL, *paths]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    for path, weights in expected.items():
        restored = torch.load(str(path) + ".restored", weights_only=True)
        assert restored.keys() == weights.keys()
        for key, value in weights.items():
            assert torch.equal(restored[key], value), (path.name, key)
