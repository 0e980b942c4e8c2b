"""The end-to-end demo behind ``make demo`` / ``vitquant demo``: a small ViT on Fashion-MNIST.

The demo is a list of *steps*, each adding one row to a results table. The first step trains the
float model (cached in ``runs/demo/float``: a second run finds the finished run and reuses it);
later steps (PTQ, QAT, DiffQ, int8 rows) register themselves with :func:`register_demo_step` and
read what earlier steps left in :attr:`DemoContext.artifacts` (``"float_dir"``,
``"float_checkpoint"``, ``"float_result"``, ``"float_config"``).

Fashion-MNIST: Xiao, Rasul and Vollgraf, 2017 (arXiv 1708.07747), 60k train / 10k test 28x28
grayscale images; the Debian package ``dataset-fashion-mnist`` installs it under
``/usr/share/datasets/fashion-mnist``. The float recipe is DeiT's (AdamW, warm-up + cosine, label
smoothing; Touvron et al., 2021) scaled down to ``vit_micro_patch7_28``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, DataError

__all__ = [
    "DemoConfig",
    "DemoRow",
    "DemoContext",
    "DEMO_STEPS",
    "register_demo_step",
    "float_train_config",
    "run_demo",
    "format_table",
    "FASHION_MNIST_DIR",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_INSTALL_HINT = (
    "install it with 'sudo apt-get install dataset-fashion-mnist' (Debian), or point "
    "--data-path / $VITQUANT_DATA at a folder with the four Fashion-MNIST IDX files"
)


@dataclass
class DemoConfig:
    """Options of the demo.

    Attributes:
        data_path: Fashion-MNIST folder (default: ``$VITQUANT_DATA`` or the Debian one).
        output: folder of the demo's runs.
        quick: the < 5 minute version (fewer epochs).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        num_workers: data loader workers.
        steps: names of the steps to run (default: all registered).
        float_overrides: changes to the float recipe (``{"epochs": 5}``; tests use a tiny model).
    """

    data_path: str = field(
        default_factory=lambda: os.environ.get("VITQUANT_DATA", FASHION_MNIST_DIR)
    )
    output: str = "runs/demo"
    quick: bool = False
    device: str = "auto"
    num_workers: int = 0
    steps: list[str] | None = None
    float_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoRow:
    """One line of the results table.

    Attributes:
        name: what the row shows (``"float32"``, ``"PTQ W8A8"`` ...).
        top1: top-1 accuracy on the test set, in %.
        top5: top-5 accuracy, in %.
        size_mb: model size in MiB (weights as they would be stored).
        seconds: time the step took (training or calibration), ``None`` when reused.
        note: anything else (``"cached"``, bits, ...).
    """

    name: str
    top1: float
    top5: float | None = None
    size_mb: float | None = None
    seconds: float | None = None
    note: str = ""


@dataclass
class DemoContext:
    """Shared by the steps: the options, the rows so far, and named artifacts."""

    config: DemoConfig
    rows: list[DemoRow] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)


DemoStep = Callable[[DemoContext], "DemoRow | list[DemoRow] | None"]
#: the steps, in the order they run: ``(name, function)``
DEMO_STEPS: list[tuple[str, DemoStep]] = []


def register_demo_step(name: str) -> Callable[[DemoStep], DemoStep]:
    """Decorator appending a step to :data:`DEMO_STEPS` (steps run in registration order).

    Example:
        >>> @register_demo_step("ptq-w8a8")
        ... def ptq(ctx: DemoContext) -> DemoRow: ...
    """

    def deco(fn: DemoStep) -> DemoStep:
        if any(n == name for n, _ in DEMO_STEPS):
            raise ValueError(f"demo step {name!r} is registered twice")
        DEMO_STEPS.append((name, fn))
        return fn

    return deco


def float_train_config(cfg: DemoConfig) -> Any:
    """The float model's training recipe (``vit_micro_patch7_28``, AdamW, cosine)."""
    from .train.config import TrainConfig

    recipe = dict(
        model="vit_micro_patch7_28",
        data_path=cfg.data_path,
        train_split="train",
        eval_split="test",
        epochs=3 if cfg.quick else 14,
        batch_size=128,
        opt="adamw",
        lr=2e-3,
        min_lr=1e-5,
        warmup_epochs=0.5 if cfg.quick else 1.0,
        augment="none",
        weight_decay=0.05,
        label_smoothing=0.0,
        clip_grad=1.0,
        seed=0,
        num_workers=cfg.num_workers,
        device=cfg.device,
        output=cfg.output,
    )
    return TrainConfig(**{**recipe, **cfg.float_overrides})


def _param_mib(model_state: dict[str, Any]) -> float:
    return sum(v.numel() * v.element_size() for v in model_state.values()) / 2**20


@register_demo_step("float")
def train_float(ctx: DemoContext) -> DemoRow:
    """Trains (or reuses) the float model; leaves ``float_*`` artifacts for later steps."""
    from .train import fit
    from .train.checkpoint import load_checkpoint
    from .train.experiment import experiment_name

    cfg = ctx.config
    train_cfg = float_train_config(cfg)
    # named from the recipe, so that a changed recipe trains anew instead of clashing
    run_dir = Path(cfg.output) / "float" / experiment_name(train_cfg)
    t0 = time.monotonic()
    result = fit(train_cfg, exp_dir=run_dir)
    cached = result.get("resumed") == "finished"
    ckpt = run_dir / "last.pt"
    state = load_checkpoint(run_dir / "best.pt")
    ctx.artifacts.update(
        float_dir=run_dir,
        float_checkpoint=ckpt,
        float_best=run_dir / "best.pt",
        float_result=result,
        float_config=train_cfg,
    )
    return DemoRow(
        name="float32",
        top1=float(result["top1"]),
        top5=float(result["top5"]),
        size_mb=_param_mib(state["model"]),
        seconds=None if cached else time.monotonic() - t0,
        note=f"{train_cfg.model}, {train_cfg.epochs} epochs" + (", cached" if cached else ""),
    )


def run_demo(cfg: DemoConfig) -> list[DemoRow]:
    """Runs the demo's steps in order and returns their rows.

    Raises:
        DataError: Fashion-MNIST is not where ``cfg.data_path`` says (with how to get it).
        ConfigError: an unknown step name.
    """
    if not Path(cfg.data_path).is_dir():
        raise DataError(f"Fashion-MNIST not found at {cfg.data_path}: {_INSTALL_HINT}")
    names = [n for n, _ in DEMO_STEPS]
    wanted = cfg.steps or names
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise ConfigError(f"unknown demo step(s) {', '.join(unknown)}; known: {', '.join(names)}")
    ctx = DemoContext(cfg)
    for name, step in DEMO_STEPS:
        if name not in wanted:
            continue
        out = step(ctx)
        rows = out if isinstance(out, list) else [out] if out is not None else []
        ctx.rows.extend(rows)
    return ctx.rows


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table; ``Δ top-1`` is against the first row (the float model)."""
    cols = ("top-1 %", "Δ top-1", "top-5 %")
    head = (
        f"{'model':<22} "
        + " ".join(f"{c:>8}" for c in cols)
        + f" {'size MiB':>9} {'time':>8}  note"
    )
    lines = [head, "-" * len(head)]
    ref = rows[0].top1 if rows else 0.0
    for r in rows:
        delta = "" if r is rows[0] else f"{r.top1 - ref:+.2f}"
        top5 = f"{r.top5:.2f}" if r.top5 is not None else ""
        size = f"{r.size_mb:.3f}" if r.size_mb is not None else ""
        secs = f"{r.seconds:.0f}s" if r.seconds is not None else ""
        lines.append(
            f"{r.name:<22} {r.top1:>8.2f} {delta:>8} {top5:>8} {size:>9} {secs:>8}  {r.note}"
        )
    return "\n".join(lines)


from . import demo_quant as _demo_quant  # noqa: E402,F401  (registers the quantization rows)
