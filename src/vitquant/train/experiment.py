"""Experiment folders named from their options, and the files they hold.

As DiffQ's examples name runs ``exp_bits=4`` from their overrides (Défossez et al., 2021,
arXiv 2104.09987; ``examples/cifar``), a run lives in
``<output>/<model>/<dataset>/exp_<options>``, where ``<options>`` lists, sorted, only the options
that differ from :class:`~vitquant.train.config.TrainConfig`'s defaults (and the method's), e.g.
``runs/vit_micro_patch7_28/fashion-mnist/exp_epochs=10,lr=0.002``; ``--name`` overrides the last
part. Rerunning the same command therefore finds the same folder and resumes.

A folder holds ``config.yaml`` (the resolved options), ``last.pt`` (full training state, written
every epoch and every N steps/minutes), ``best.pt`` (model weights at the best top-1),
``log.jsonl`` (one JSON object per line) and, once finished, ``result.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from vitquant.errors import ConfigError
from vitquant.train.checkpoint import atomic_write_text, write_json
from vitquant.train.config import RUNTIME_FIELDS, TrainConfig, format_value

__all__ = ["dataset_slug", "experiment_name", "experiment_dir", "Experiment", "format_value"]

_MAX_NAME = 120
_PATH_FIELDS = ("model", "data_path", "method_args")


def dataset_slug(data_path: str) -> str:
    """Short dataset name for folder names: ``/usr/share/datasets/fashion-mnist/`` ->
    ``fashion-mnist``; ``digits`` -> ``digits``."""
    base = Path(str(data_path).rstrip("/")).name or str(data_path)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", base) or "data"


def experiment_name(cfg: TrainConfig, method_defaults: dict[str, Any] | None = None) -> str:
    """``exp_<k>=<v>,...`` for the options of ``cfg`` that differ from the defaults.

    Args:
        cfg: the run's options.
        method_defaults: defaults of the method's options (``cfg.method_args`` entries equal to
            them are left out).

    Returns:
        ``"exp_default"`` when nothing differs; names longer than 120 characters are cut and end
        with a hash of the full name.
    """
    defaults = TrainConfig().to_dict()
    mine = cfg.to_dict()
    parts: dict[str, str] = {}
    for key, value in mine.items():
        if key in RUNTIME_FIELDS or key in _PATH_FIELDS:
            continue
        if value != defaults[key]:
            parts[key] = format_value(value)
    method_defaults = method_defaults or {}
    for key, value in cfg.method_args.items():
        if key not in method_defaults or value != method_defaults[key]:
            parts[key if key not in parts else f"method.{key}"] = format_value(value)
    if not parts:
        return "exp_default"
    name = "exp_" + ",".join(f"{k}={parts[k]}" for k in sorted(parts))
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_NAME - 9]}_{digest}"
    return name


def experiment_dir(cfg: TrainConfig, method_defaults: dict[str, Any] | None = None) -> Path:
    """``<output>/<model>/<dataset>/<name or exp_...>``."""
    name = cfg.name or experiment_name(cfg, method_defaults)
    return Path(cfg.output) / cfg.model / dataset_slug(cfg.data_path) / name


class Experiment:
    """The files of one experiment folder.

    Args:
        root: the folder (created on :meth:`write_config`).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config_path = self.root / "config.yaml"
        self.last_path = self.root / "last.pt"
        self.best_path = self.root / "best.pt"
        self.log_path = self.root / "log.jsonl"
        self.result_path = self.root / "result.json"

    def stored_config(self) -> TrainConfig | None:
        """The folder's ``config.yaml`` as a config, ``None`` if there is none."""
        if not self.config_path.is_file():
            return None
        try:
            data = yaml.safe_load(self.config_path.read_text())
            return TrainConfig.from_dict(data)
        except (yaml.YAMLError, TypeError, ConfigError) as e:
            raise ConfigError(
                f"{self.config_path} is unreadable ({e}); move the folder away"
            ) from e

    def check_config(self, cfg: TrainConfig) -> None:
        """Refuses ``cfg`` if the folder was made with other (result-changing) options.

        Raises:
            ConfigError: naming each option that differs, folder value vs. command value.
        """
        stored = self.stored_config()
        if stored is None:
            return
        diffs = stored.differences(cfg)
        if diffs:
            raise ConfigError(
                f"experiment folder {self.root} was made with other options: {'; '.join(diffs)}"
                " (use --name or another --output for a new run)"
            )

    def write_config(self, cfg: TrainConfig) -> None:
        """Writes ``config.yaml`` (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        """Appends one JSON line to ``log.jsonl``."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def read_log(self) -> list[dict[str, Any]]:
        """All records of ``log.jsonl`` (a torn last line is skipped)."""
        if not self.log_path.is_file():
            return []
        out = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def result(self) -> dict[str, Any] | None:
        """The final result of a finished run, ``None`` if it has not finished."""
        if not self.result_path.is_file():
            return None
        try:
            return json.loads(self.result_path.read_text())
        except json.JSONDecodeError:
            return None

    def write_result(self, result: dict[str, Any]) -> None:
        """Writes ``result.json``, which marks the run as finished."""
        write_json(self.result_path, result)
