"""The end-to-end demo behind ``make demo`` / ``vitquant demo``: a small ViT on Fashion-MNIST.

The demo is a list of *steps*, each adding rows to one results table (method, bits, top-1, change
against float, true size, compression, int8 speed-up). The first step trains the float model
(cached in ``runs/demo/float``: a second run finds the finished run and reuses it); later steps
register themselves with :func:`register_demo_step` and read what earlier steps left in
:attr:`DemoContext.artifacts` (``"float_dir"``, ``"float_checkpoint"``, ``"float_result"``,
``"float_config"``, ``"float_size_mb"``, and ``"model:<row name>"`` for quantized models):

* :mod:`vitquant.demo.quant`: PTQ W8A8 (ft1, ft2, the default), W4A4 min-max, ViT-specific and
  lowbit;
* :mod:`vitquant.demo.qat`: QAT W4A4 with LSQ, Q-ViT and VVTQ (cached fine-tuning runs);
* :mod:`vitquant.demo.ablation`: W2A2 rows, LSQ against Q-ViT ± IRM ± DGD and VVTQ ± regulariser
  and freezing;
* :mod:`vitquant.demo.diffq`: DiffQ at two size penalties (cached fine-tuning runs);
* :mod:`vitquant.demo.export`: the packed export of a W4 model and the int8 runtime.

:func:`run_demo_report` runs them with a ``[k/N] step`` line and the wall time of each;
:mod:`vitquant.demo.report` writes the table as JSON, Markdown and an accuracy-vs-size PNG.

Fashion-MNIST: Xiao, Rasul and Vollgraf, 2017 (arXiv 1708.07747), 60k train / 10k test 28x28
grayscale images; the Debian package ``dataset-fashion-mnist`` installs it under
``/usr/share/datasets/fashion-mnist``. The float recipe is DeiT's (AdamW, warm-up + cosine;
Touvron et al., 2021) scaled down to ``vit_micro_patch7_28``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitquant.errors import ConfigError, DataError

__all__ = [
    "DemoConfig",
    "DemoRow",
    "DemoContext",
    "DemoReport",
    "DEMO_STEPS",
    "register_demo_step",
    "float_train_config",
    "run_demo",
    "run_demo_report",
    "format_table",
    "FASHION_MNIST_DIR",
    "QUICK_EVAL_IMAGES",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: test images evaluated in quick mode (the normal mode uses the whole test set)
QUICK_EVAL_IMAGES = 2000
_INSTALL_HINT = (
    "install it with 'sudo apt-get install dataset-fashion-mnist' (Debian), or point "
    "--data-path / $VITQUANT_DATA at a folder with the four Fashion-MNIST IDX files"
)


@dataclass
class DemoConfig:
    """Options of the demo.

    Attributes:
        data_path: Fashion-MNIST folder (default: ``$VITQUANT_DATA`` or the Debian one).
        output: folder of the demo's runs (float, QAT and DiffQ experiment folders).
        out: folder of ``results.json``, ``results.md`` and ``accuracy_vs_size.png``
            (default: ``output``, or ``output/quick`` in quick mode).
        quick: the < 5 minute version (short float training, small training subsets, 2000 test
            images).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        num_workers: data loader workers.
        steps: names of the steps to run (default: all registered).
        eval_subset: test images to evaluate (``None``: 2000 in quick mode, all otherwise).
        float_overrides: changes to the float recipe (``{"epochs": 5}``; tests use a tiny model).
        finetune_overrides: changes to every QAT and DiffQ fine-tuning recipe
            (``{"train_subset": 256}``).
        progress: print the ``[k/N]`` step lines and the training progress.
    """

    data_path: str = field(
        default_factory=lambda: os.environ.get("VITQUANT_DATA", FASHION_MNIST_DIR)
    )
    output: str = "runs/demo"
    out: str | None = None
    quick: bool = False
    device: str = "auto"
    num_workers: int = 0
    steps: list[str] | None = None
    eval_subset: int | None = None
    float_overrides: dict[str, Any] = field(default_factory=dict)
    finetune_overrides: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def eval_images(self) -> int:
        """Test images every row is evaluated on (0: the whole test set)."""
        if self.eval_subset is not None:
            return int(self.eval_subset)
        return QUICK_EVAL_IMAGES if self.quick else 0

    def results_dir(self) -> Path:
        """Where the results files go: ``out``, else ``output`` (``output/quick`` in quick mode,
        so that a first look never overwrites the full run's table)."""
        if self.out:
            return Path(self.out)
        return Path(self.output) / "quick" if self.quick else Path(self.output)


@dataclass
class DemoRow:
    """One line of the results table.

    Attributes:
        name: the method (``"float32"``, ``"PTQ W8A8 ft1"`` ...).
        top1: top-1 accuracy on the demo's test images, in %.
        top5: top-5 accuracy, in %.
        size_mb: true model size in MiB (2**20 bytes): weights as a packed export stores them.
        seconds: time the row's work took (training or calibration), ``None`` when reused.
        note: anything else (``"cached"``, recipe ...).
        bits: weight/activation bits, ``"W/A"`` (``"32/32"``, ``"4/4"``, ``"~3.2/32"``).
        compression: float32 size / this row's size.
        speedup: int8 runtime latency speed-up over float32 eager (int8 rows only).
        step: the step that made the row.
    """

    name: str
    top1: float
    top5: float | None = None
    size_mb: float | None = None
    seconds: float | None = None
    note: str = ""
    bits: str = ""
    compression: float | None = None
    speedup: float | None = None
    step: str = ""


@dataclass
class DemoContext:
    """Shared by the steps: the options, the rows so far, and named artifacts."""

    config: DemoConfig
    rows: list[DemoRow] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def say(self, *parts: Any) -> None:
        """Prints a progress line (unless ``config.progress`` is off)."""
        if self.config.progress:
            print(*parts, flush=True)


@dataclass
class DemoReport:
    """What :func:`run_demo_report` returns: the rows and the wall time of each step.

    Attributes:
        rows: the table.
        steps: ``[(step name, seconds)]`` in the order they ran.
        config: the demo's options.
        float_recipe: the float training recipe (a dict).
        started: the start time (ISO 8601, local time zone).
        seconds: total wall time.
    """

    rows: list[DemoRow]
    steps: list[tuple[str, float]]
    config: DemoConfig
    float_recipe: dict[str, Any]
    started: str
    seconds: float


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
    """The float model's training recipe (``vit_micro_patch7_28``, AdamW, cosine).

    Quick mode trains 3 epochs on a 20000-image subset and evaluates on 2000 test images.
    """
    from vitquant.train.config import TrainConfig

    recipe = dict(
        model="vit_micro_patch7_28",
        data_path=cfg.data_path,
        train_split="train",
        eval_split="test",
        train_subset=20000 if cfg.quick else 0,
        eval_subset=cfg.eval_images(),
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
    """Trains (or reuses) the float model; leaves ``float_*`` artifacts for later steps.

    Every later row starts from ``last.pt`` (no model selection on the test set), so the float
    row reports the last epoch's evaluation.
    """
    from vitquant.train import fit
    from vitquant.train.checkpoint import load_checkpoint
    from vitquant.train.experiment import experiment_name

    cfg = ctx.config
    train_cfg = float_train_config(cfg)
    # named from the recipe, so that a changed recipe trains anew instead of clashing
    run_dir = Path(cfg.output) / "float" / experiment_name(train_cfg)
    t0 = time.monotonic()
    result = fit(train_cfg, exp_dir=run_dir, quiet=not cfg.progress)
    cached = result.get("resumed") == "finished"
    ckpt = run_dir / "last.pt"
    size = _param_mib(load_checkpoint(ckpt)["model"])
    ctx.artifacts.update(
        float_dir=run_dir,
        float_checkpoint=ckpt,
        float_best=run_dir / "best.pt",
        float_result=result,
        float_config=train_cfg,
        float_size_mb=size,
    )
    subset = f", {train_cfg.train_subset} images" if train_cfg.train_subset else ""
    return DemoRow(
        name="float32",
        top1=float(result["top1"]),
        top5=float(result["top5"]),
        size_mb=size,
        seconds=None if cached else time.monotonic() - t0,
        note=f"{train_cfg.model}, {train_cfg.epochs} epochs{subset}"
        + (", cached" if cached else ""),
        bits="32/32",
        compression=1.0,
    )


def run_demo_report(cfg: DemoConfig) -> DemoReport:
    """Runs the demo's steps in order, printing ``[k/N] step ...`` and each step's wall time.

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
    todo = [(n, step) for n, step in DEMO_STEPS if n in wanted]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t_start = time.monotonic()
    timings: list[tuple[str, float]] = []
    for k, (name, step) in enumerate(todo, 1):
        ctx.say(f"[{k}/{len(todo)}] {name} ...")
        t0 = time.monotonic()
        out = step(ctx)
        secs = time.monotonic() - t0
        timings.append((name, secs))
        rows = out if isinstance(out, list) else [out] if out is not None else []
        for r in rows:
            r.step = r.step or name
        ctx.rows.extend(rows)
        ctx.say(f"[{k}/{len(todo)}] {name} done in {secs:.1f} s")
    recipe = ctx.artifacts.get("float_config")
    return DemoReport(
        rows=ctx.rows,
        steps=timings,
        config=cfg,
        float_recipe=recipe.to_dict() if recipe is not None else {},
        started=started,
        seconds=time.monotonic() - t_start,
    )


def run_demo(cfg: DemoConfig) -> list[DemoRow]:
    """Runs the demo's steps in order and returns their rows (see :func:`run_demo_report`)."""
    return run_demo_report(cfg).rows


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def table_cells(rows: list[DemoRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table; ``Δ top-1`` is against the first row (float)."""
    head = ["method", "W/A bits", "top-1 %", "Δ top-1", "size MiB", "compression", "int8 speed-up"]
    head.append("note")
    ref = rows[0].top1 if rows else 0.0
    cells = []
    for r in rows:
        cells.append(
            [
                r.name,
                r.bits,
                f"{r.top1:.2f}",
                "" if r is rows[0] else f"{r.top1 - ref:+.2f}",
                _fmt(r.size_mb, ".3f"),
                _fmt(r.compression, ".1f", "x"),
                _fmt(r.speedup, ".2f", "x"),
                r.note,
            ]
        )
    return head, cells


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table; ``Δ top-1`` is against the first row (the float model)."""
    head, cells = table_cells(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head[:-1])]
    left = {0, 1}

    def line(values: list[str]) -> str:
        parts = [
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        ]
        return "  ".join(parts) + "  " + values[-1]

    out = [line(head), "-" * (sum(widths) + 2 * len(widths) + 4)]
    out += [line(c) for c in cells]
    return "\n".join(out)


# the quantization rows, in table order: each module registers its steps when imported
def _import_steps() -> None:
    import importlib

    for mod in ("quant", "qat", "ablation", "diffq", "export"):
        importlib.import_module(f".{mod}", __package__)


_import_steps()
