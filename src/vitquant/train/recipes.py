"""Recipes: YAML files that hold the options of a published experiment.

A recipe (``recipes/*.yaml`` in the source tree) reproduces one experiment of the papers and
codebases vitquant follows: FasterTransformer's ViT PTQ/QAT (NVIDIA), Q-ViT (Li et al., NeurIPS
2022), VVTQ (Huang et al., TMLR 2024), DiffQ (Défossez et al., 2021). Its layout::

    about:                      # free-form description, never read as options
      title: Q-ViT DeiT-T 4-bit
      launch: torchrun --nproc_per_node 4 -m vitquant train --config recipes/qvit_deit_t_w4.yaml
    calibrate:                  # options of `vitquant calibrate` (when the recipe has a PTQ step)
      model: ViT-B_16
      ...
    train:                      # options of `vitquant train`
      method: qvit
      lr: 3.0e-4
      ...

Keys are the command's long option names (``data-path`` or ``data_path``). A file without any
command section is a flat mapping of one command's options. ``vitquant <command> --config
FILE`` uses the section of that command as the defaults of its options, so flags given on the
command line override the recipe (:mod:`vitquant.cli._common`).

This module is the library side and never sees argparse: :func:`load_recipe` returns the options
of one command as a dict, :func:`train_config_from_recipe` builds a
:class:`~vitquant.train.TrainConfig` (method options go to ``method_args``), :func:`find_recipe`
and :func:`list_recipes` locate the recipes shipped in ``recipes/``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any

from vitquant.errors import ConfigError

__all__ = [
    "ABOUT_KEY",
    "COMMANDS",
    "RECIPES_DIR",
    "find_recipe",
    "list_recipes",
    "load_recipe",
    "read_recipe",
    "recipe_about",
    "train_config_from_recipe",
]

#: the key holding a recipe's description (never options)
ABOUT_KEY = "about"

#: sub-commands a recipe may hold a section for
COMMANDS = ("train", "calibrate", "eval", "export")

#: the recipes shipped with the source tree (``<repo>/recipes``)
RECIPES_DIR = Path(__file__).resolve().parents[3] / "recipes"


def find_recipe(name: str | os.PathLike[str]) -> Path:
    """The path of a recipe: an existing file, or the name of a shipped one.

    Args:
        name: a path (``recipes/qvit_deit_t_w4.yaml``) or a shipped recipe's name with or
            without ``.yaml`` (``qvit_deit_t_w4``).

    Raises:
        ConfigError: neither a file nor a shipped recipe (the closest names are listed).
    """
    p = Path(name)
    if p.is_file():
        return p
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    shipped = RECIPES_DIR / f"{stem}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(stem, list_recipes(), n=3)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ConfigError(f"recipe not found: {name}{hint}")


def list_recipes() -> list[str]:
    """Names of the shipped recipes (``recipes/*.yaml`` without the suffix), sorted."""
    if not RECIPES_DIR.is_dir():
        return []
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole recipe file as a mapping (YAML ``safe_load``: no objects are built).

    Raises:
        ConfigError: missing file, invalid YAML, or not a mapping.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError(f"{p} is not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of option names to values")
    return data


def _sections(data: dict[str, Any], command: str | None = None) -> list[str]:
    names = (*COMMANDS, command) if command else COMMANDS
    return [k for k in data if k in names and isinstance(data[k], dict)]


def load_recipe(path: str | os.PathLike[str], command: str | None = None) -> dict[str, Any]:
    """The options a recipe gives one command, keys with ``_`` (``data_path``).

    Args:
        path: the recipe file.
        command: ``"train"``, ``"calibrate"``, ... (``None``: a flat recipe's options).

    Returns:
        ``{option: value}``; the ``about`` block is left out.

    Raises:
        ConfigError: unreadable file, a sectioned recipe without a section for ``command``, a
            section that is not a mapping, or an option named twice (``lr`` and ``lr``).
    """
    data = read_recipe(path)
    sections = _sections(data, command)
    if sections:
        if command not in sections:
            if command in data:
                raise ConfigError(f"{path}: section {command!r} must be a mapping of options")
            have = ", ".join(sections)
            raise ConfigError(f"{path} has no {command!r} section (it has: {have})")
        body = data[command]
    else:
        body = {k: v for k, v in data.items() if k != ABOUT_KEY}
    out: dict[str, Any] = {}
    for key, value in body.items():
        dest = str(key).replace("-", "_")
        if dest in out:
            raise ConfigError(f"{path}: option {key!r} is given twice")
        out[dest] = value
    return out


def recipe_about(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe's ``about`` block (title, paper, launch command, reference result), or {}."""
    about = read_recipe(path).get(ABOUT_KEY) or {}
    if not isinstance(about, dict):
        raise ConfigError(f"{path}: {ABOUT_KEY!r} must be a mapping")
    return about


def _coerce(value: Any, annotation: Any, key: str, path: Any) -> Any:
    """YAML 1.1 reads ``3e-4`` as a string: convert strings for int/float fields."""
    if not isinstance(value, str):
        return value
    args = set(typing.get_args(annotation)) or {annotation}
    for tp in (int, float):
        if tp in args:
            try:
                return tp(value)
            except ValueError:
                raise ConfigError(f"{path}: {key} = {value!r} is not a number") from None
    return value


def train_config_from_recipe(path: str | os.PathLike[str], **overrides: Any) -> Any:
    """The :class:`~vitquant.train.TrainConfig` of a recipe's ``train`` options.

    Core options become fields, the method's own options (``wbits``, ``penalty``, ...) go to
    ``method_args``; ``overrides`` (same names) replace the recipe's values, as command-line
    flags do.

    Args:
        path: a recipe file or the name of a shipped recipe.
        **overrides: options that replace the recipe's (``data_path="digits"``, ``epochs=1``).

    Raises:
        ConfigError: an option that neither ``vitquant train`` nor the recipe's method has (named
            with the file), or invalid values.
    """
    from vitquant.methods import get_method
    from vitquant.train.config import TrainConfig

    file = find_recipe(path)
    options = {
        **load_recipe(file, "train"),
        **{k.replace("-", "_"): v for k, v in overrides.items()},
    }
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"method_args"}
    method = str(options.get("method", TrainConfig.method))
    method_cls = get_method(method)
    mine = method_cls.option_names()
    core: dict[str, Any] = {}
    method_args: dict[str, Any] = {}
    for key, value in options.items():
        if key in fields:
            core[key] = _coerce(value, hints[key], key, file)
        if key in mine:
            method_args[key] = value
        if key not in fields and key not in mine:
            close = difflib.get_close_matches(key, sorted(fields | mine), n=3)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ConfigError(f"{file}: unknown option {key!r} for method {method!r}{hint}")
    method_hints = typing.get_type_hints(method_cls.Config)
    method_args = {k: _coerce(v, method_hints.get(k), k, file) for k, v in method_args.items()}
    core["method_args"] = method_cls.config_from_dict(method_args).to_dict()
    return TrainConfig(**core)
