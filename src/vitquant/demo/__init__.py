"""The demo behind ``make demo`` / ``vitquant demo`` (a small ViT on Fashion-MNIST), as a package.

:mod:`.main` runs the registered steps and the float training; one module per group of rows:
:mod:`.quant` (PTQ), :mod:`.qat` (QAT W4A4), :mod:`.ablation` (W2A2 parts of Q-ViT / VVTQ),
:mod:`.diffq`, :mod:`.export` (export, int8); :mod:`.report` writes the table (JSON, Markdown,
PNG); :mod:`.utils` holds shared helpers. The experiments behind ``docs/qat.md`` and
``docs/diffq.md`` live here too: :mod:`.qat_ablation` and :mod:`.diffq_experiment`. This is the
top layer: it may import every other part of vitquant, and nothing but the CLI imports it.
"""

from __future__ import annotations

from vitquant.demo import main as _main
from vitquant.demo.main import *  # noqa: F403  (the demo's public names)

__all__ = list(_main.__all__)
