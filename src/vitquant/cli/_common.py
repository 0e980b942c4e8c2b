"""Helpers shared by the ``vitquant`` sub-commands (not a command itself: the ``_`` prefix).

* :func:`add_config_arg` / :func:`apply_config_file`: ``--config recipe.yaml`` sets the defaults
  of a sub-command's options (keys are option names, ``-`` or ``_``; a section named after the
  sub-command, e.g. ``train:``, is used if present); flags on the command line override it.
* :func:`add_data_args`, :func:`add_runtime_args`: the usual ``--data-path``/``--device`` flags.
* :func:`print_metrics`, :func:`default_data_path`.
"""

from __future__ import annotations

import argparse
import difflib
import os
from collections.abc import Sequence
from typing import Any

from vitquant.errors import ConfigError

__all__ = [
    "add_config_arg",
    "apply_config_file",
    "add_data_args",
    "add_runtime_args",
    "print_metrics",
    "default_data_path",
    "FASHION_MNIST_DIR",
]

#: where the Debian package ``dataset-fashion-mnist`` puts Fashion-MNIST
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def model_stem(model: str) -> str:
    """The name output files are named after: ``model``, or a Hugging Face folder's own name."""
    path = os.path.normpath(model)
    return os.path.basename(path) if os.path.isdir(path) else model


def default_data_path() -> str:
    """``$VITQUANT_DATA`` or the Debian Fashion-MNIST folder."""
    return os.environ.get("VITQUANT_DATA", FASHION_MNIST_DIR)


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """Adds ``--config YAML`` (a recipe whose keys set this command's option defaults)."""
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="recipe: a YAML mapping of option names to values, used as defaults "
        "(command-line flags override it)",
    )


def _convert(action: argparse.Action, value: Any) -> Any:
    """Applies the option's type to string values (YAML reads ``1e-3`` as a string)."""
    conv = action.type if callable(action.type) else None
    if conv is None:
        return value
    if isinstance(value, list):
        return [conv(v) if isinstance(v, str) else v for v in value]
    if isinstance(value, str):
        try:
            return conv(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config value {value!r} for {action.dest} is invalid") from None
    return value


def apply_config_file(
    parser: argparse.ArgumentParser,
    subparser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: Sequence[str],
) -> argparse.Namespace:
    """Re-parses ``argv`` with the defaults of ``args.config`` (if the command has one).

    Args:
        parser: the top-level parser.
        subparser: the sub-command's parser (its defaults are set).
        args: the first parse.
        argv: the command line (without the program name).

    Returns:
        ``args`` unchanged without ``--config``, else the re-parsed namespace.

    Raises:
        ConfigError: unknown option names (with the closest ones) or invalid values.
    """
    path = getattr(args, "config", None)
    if not path:
        return args
    from vitquant.train.recipes import find_recipe, load_recipe

    recipe = find_recipe(path)
    data = load_recipe(recipe, getattr(args, "command", None))
    actions = {a.dest: a for a in subparser._actions if a.dest not in ("help", "config")}
    values: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, list(actions), n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(f"{recipe}: unknown option {key!r}{hint}")
        values[dest] = _convert(actions[dest], value)
    subparser.set_defaults(**values)
    return parser.parse_args(list(argv))


def add_data_args(
    parser: argparse.ArgumentParser | Any,
    *,
    data_default: str | None = None,
    batch_size: int = 256,
) -> None:
    """Adds ``--data-path``, ``--img-size``, ``--batch-size``."""
    parser.add_argument(
        "--data-path",
        default=data_default,
        help="dataset name (digits) or folder (Fashion-MNIST IDX files, image folders)"
        + (f"; default {data_default}" if data_default else ""),
    )
    parser.add_argument("--img-size", type=int, default=None, help="input resolution")
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help=f"batch size (default {batch_size})"
    )


PRESET_HELP = (
    "robust (default: ft1 points, per-channel weights, SmoothQuant), ft1, ft2, ft3, trt, repq, "
    "weight_only, lowbit (best PTQ at 6 bits and below: SmoothQuant search, output-MSE ranges, "
    "block reconstruction) (1/2 = ft1/ft2)"
)


def add_ptq_args(parser: argparse.ArgumentParser | Any) -> None:
    """Adds what every PTQ command takes: the float model (``--model``, ``--pretrained``), its
    data (``--data-path``, ``--dataset``, ``--img-size``), the calibration subset
    (``--num-calib-batch``, ``--calib-batchsz``) and the quantization (``--quant-mode``,
    ``--wbits``, ``--abits``, ``--calibrator``, ``--percentile``), as FasterTransformer's
    ``main.py --calib`` names them."""
    parser.add_argument(
        "--model", default=None, help="model name (vitquant models) or a Hugging Face folder"
    )
    parser.add_argument(
        "--pretrained",
        "--pretrained-dir",
        dest="pretrained",
        default=None,
        metavar="FILE",
        help="float weights (.npz, .pth, .safetensors)",
    )
    parser.add_argument(
        "--data-path", default=None, help=f"dataset folder or name (default {default_data_path()})"
    )
    parser.add_argument(
        "--dataset", default=None, help="built-in dataset name (fashion-mnist, ...)"
    )
    parser.add_argument("--img-size", type=int, default=None, help="input resolution")
    parser.add_argument("--num-calib-batch", type=int, default=10, help="calibration batches")
    parser.add_argument("--calib-batchsz", type=int, default=8, help="calibration batch size")
    parser.add_argument("--quant-mode", default="robust", help=PRESET_HELP)
    parser.add_argument("--wbits", type=int, default=8, help="weight bits (2..16)")
    parser.add_argument("--abits", type=int, default=8, help="activation bits (2..16)")
    parser.add_argument(
        "--calibrator",
        default=None,
        help="max, percentile, mse or entropy (activations; default: the preset's, percentile "
        "but mse in lowbit)",
    )
    parser.add_argument(
        "--percentile",
        type=float,
        default=99.99,
        help="of the percentile calibrator (and analyze's outlier statistic)",
    )


def add_runtime_args(parser: argparse.ArgumentParser | Any) -> None:
    """Adds ``--device`` and ``--num-workers``."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="data loader worker processes (default 0)"
    )


def print_metrics(metrics: dict[str, Any], title: str = "") -> None:
    """One line: ``<title> top-1 91.23% top-5 99.80% loss 0.2512 (10000 images)``."""
    head = f"{title} " if title else ""
    parts = [f"top-1 {metrics['top1']:.2f}%", f"top-5 {metrics['top5']:.2f}%"]
    if metrics.get("loss") is not None:
        parts.append(f"loss {metrics['loss']:.4f}")
    if metrics.get("images") is not None:
        parts.append(f"({metrics['images']} images)")
    print(head + " ".join(parts), flush=True)
