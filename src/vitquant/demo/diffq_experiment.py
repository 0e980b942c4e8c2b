"""One DiffQ (or fixed-bit QAT baseline) fine-tuning run of a trained float ViT, as a library call.

Défossez, Adi and Synnaeve (2021), "Differentiable Model Compression via Pseudo Quantization
Noise", arXiv 2104.09987, fine-tune a trained model with ``penalty * model_size()`` added to the
loss; their fairseq example names each run from its DiffQ options (``exp_bits=4``,
``exp_group_size=16,penalty=5``) and reruns resume. :func:`run_diffq` does the same through
``vitquant.train.fit``:

* the run copies every result-changing option of the float run (model, data, batch size,
  augmentation...) and sets the fine-tuning ones (``epochs``, ``lr``, no warm-up, ``finetune``);
* those common options go to ``<output>/recipe.yaml``, so the equivalent command line,
  ``vitquant diffq run -p P -g G --bits-lr L --output OUT -- --config OUT/recipe.yaml``, lands in
  the same folder ``OUT/<model>/<dataset>/exp_bits_lr=L,group_size=G,penalty=P`` and resumes or
  reports it (returned as ``command``);
* the result holds the top-1, the true model size (``true_model_size()``, MB of 2^20 bytes, float
  parameters included at their stored size), the compression over float32 and the average bits.

The training package is imported inside the functions: ``vitquant.train`` imports this package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitquant._atomic import atomic_write
from vitquant.errors import ConfigError

__all__ = ["experiment_label", "diffq_config", "run_diffq", "method_values", "command_line"]

#: fields of the float run's config that the fine-tuning run does not copy
_NOT_COPIED = ("method", "method_args")


def experiment_label(values: dict[str, Any], label: str | None = None) -> str:
    """``exp_<k>=<v>,...`` of the DiffQ options given (sorted), then ``label``: the seed's names.

    Example:
        >>> experiment_label({"penalty": 1.0, "group_size": 16})
        'exp_group_size=16,penalty=1'
    """
    from vitquant.train.experiment import format_value

    parts = [f"{k}={format_value(v)}" for k, v in sorted(values.items())]
    name = "exp_" + ",".join(parts) if parts else "exp_default"
    return f"{name},{label}" if label else name


def method_values(
    penalty: float = 0.0, group_size: int = 16, bits: int = 0, bits_lr: float = 3e-2
) -> dict[str, Any]:
    """The ``diffq`` method options a run sets: they name its folder (the CLI's ``-p -g -b``).

    DiffQ (``bits == 0``) sets ``penalty``, ``group_size`` and ``bits_lr``; the QAT baseline
    (``bits > 0``) only ``bits``.

    Raises:
        ConfigError: both ``penalty`` and ``bits``, or neither.
    """
    if bits and penalty:
        raise ConfigError("give a penalty (DiffQ) or bits (QAT baseline), not both")
    if bits:
        return {"bits": int(bits)}
    if penalty <= 0:
        raise ConfigError(f"penalty {penalty} must be > 0 for a DiffQ run (or give bits)")
    return {"penalty": float(penalty), "group_size": int(group_size), "bits_lr": float(bits_lr)}


def _float_run(float_run: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    from vitquant.train.experiment import Experiment

    exp = Experiment(float_run)
    cfg, result = exp.stored_config(), exp.result()
    if cfg is None or result is None:
        raise ConfigError(
            f"{float_run} is not a finished training run (no config.yaml/result.json)"
        )
    return cfg, result


def diffq_config(
    float_run: str | os.PathLike[str],
    values: dict[str, Any],
    *,
    epochs: int = 2,
    lr: float = 2e-4,
    train_subset: int = 0,
    eval_subset: int = 0,
    output: str | os.PathLike[str] = "runs/diffq_sweep",
    device: str = "auto",
) -> tuple[Any, dict[str, Any]]:
    """The training config of one run and its recipe (the options common to a sweep).

    Args:
        float_run: finished float training run folder (its ``best.pt`` is fine-tuned).
        values: :func:`method_values`.
        epochs, lr, train_subset, eval_subset: fine-tuning options (no warm-up).
        output: root of the experiment folders.
        device: ``auto``, ``cpu``, ``cuda``...

    Returns:
        ``(TrainConfig, recipe)``; ``recipe`` maps ``vitquant train`` option names to values.
    """
    from vitquant.methods import get_method
    from vitquant.train.config import RUNTIME_FIELDS, TrainConfig

    base, _ = _float_run(float_run)
    recipe = {
        k: v for k, v in base.to_dict().items() if k not in RUNTIME_FIELDS and k not in _NOT_COPIED
    }
    recipe.update(
        finetune=str(float_run),
        epochs=int(epochs),
        lr=float(lr),
        warmup_epochs=0.0,
        train_subset=int(train_subset),
        eval_subset=int(eval_subset),
    )
    method_args = get_method("diffq").config_from_dict(dict(values)).to_dict()
    cfg = TrainConfig.from_dict(
        {
            **base.to_dict(),
            **recipe,
            "method": "diffq",
            "method_args": method_args,
            "output": str(output),
            "name": experiment_label(values),
            "device": device,
        }
    )
    return cfg, recipe


def _write_recipe(path: Path, recipe: dict[str, Any]) -> None:
    """Writes ``recipe`` to ``path``; an existing recipe must hold the same options."""
    import yaml

    if path.is_file():
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        if old != recipe:
            diff = sorted(
                k for k in set(old or {}) | set(recipe) if (old or {}).get(k) != recipe.get(k)
            )
            raise ConfigError(
                f"{path} holds other common options ({', '.join(diff)}): use another output"
            )
        return
    text = yaml.safe_dump(recipe, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


def command_line(values: dict[str, Any], output: str | os.PathLike[str]) -> str:
    """The ``vitquant diffq run`` command that resumes or reports the run of ``values``."""
    from vitquant.train.experiment import format_value

    flags = {"penalty": "-p", "group_size": "-g", "bits": "-b", "bits_lr": "--bits-lr"}
    parts = ["vitquant diffq run"]
    parts += [f"{flags[k]} {format_value(v)}" for k, v in values.items()]
    recipe = Path(output) / "recipe.yaml"
    parts += [f"--output {output}", f"-- --config {recipe}"]
    return " ".join(parts)


def run_diffq(
    float_run: str | os.PathLike[str],
    penalty: float | None = None,
    group_size: int = 16,
    epochs: int = 2,
    train_subset: int = 0,
    *,
    bits: int = 0,
    lr: float = 2e-4,
    bits_lr: float = 3e-2,
    eval_subset: int = 0,
    output: str | os.PathLike[str] = "runs/diffq_sweep",
    device: str = "auto",
    quiet: bool = True,
) -> dict[str, Any]:
    """Fine-tunes ``float_run`` with DiffQ (or QAT with ``bits``); resumes or reports a rerun.

    Args:
        float_run: finished float run folder (``vitquant train``).
        penalty: DiffQ's weight of the model size in MB in the loss (default 10; none with
            ``bits``).
        group_size: weights sharing one learnt bit width.
        epochs: fine-tuning epochs (cosine schedule, no warm-up).
        train_subset: training images per epoch (0: all).
        bits: fixed bits of the QAT baseline (then ``penalty`` must be 0).
        lr: learning rate of the weights; ``bits_lr``: Adam learning rate of the bit logits.
        eval_subset: evaluation images (0: the whole evaluation split).
        output: root of the experiment folders (``recipe.yaml`` goes there).
        device: ``auto``, ``cpu``, ``cuda``...
        quiet: print only the final line.

    Returns:
        ``name``, ``experiment``, ``command`` (the equivalent CLI), ``top1``, ``top5``,
        ``float_top1`` and ``delta_top1`` (``None`` with ``eval_subset``), ``true_size_mb``,
        ``float_size_mb``, ``compression`` (float32 size / true size), ``bits_per_weight``
        (DiffQ), ``train_time_s`` and the method values.

    Raises:
        ConfigError: not a finished float run, contradictory options, or ``output`` already
            holding a recipe with other common options.
    """
    from vitquant.train import fit
    from vitquant.train.experiment import Experiment

    if penalty is None:
        penalty = 0.0 if bits else 10.0
    values = method_values(penalty, group_size, bits, bits_lr)
    cfg, recipe = diffq_config(
        float_run,
        values,
        epochs=epochs,
        lr=lr,
        train_subset=train_subset,
        eval_subset=eval_subset,
        output=output,
        device=device,
    )
    _write_recipe(Path(output) / "recipe.yaml", recipe)
    result = fit(cfg, quiet=quiet)
    last = next(r for r in reversed(Experiment(result["experiment"]).read_log()) if "top1" in r)
    _, float_result = _float_run(float_run)
    float_top1 = float_result.get("top1") if not eval_subset else None
    return {
        "name": cfg.name,
        "experiment": result["experiment"],
        "command": command_line(values, output),
        "top1": result["top1"],
        "top5": result["top5"],
        "float_top1": float_top1,
        "delta_top1": result["top1"] - float_top1 if float_top1 is not None else None,
        "true_size_mb": last["model_size_mb"],
        "float_size_mb": last["float_size_mb"],
        "compression": last["compression"],
        "bits_per_weight": last.get("bits_per_weight"),
        "train_time_s": result.get("train_time_s"),
        "epochs": epochs,
        "train_subset": train_subset,
        **values,
    }
