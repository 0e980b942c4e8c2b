"""Checkpoint files: where the pretrained weights live (:func:`vitquant_home`,
:func:`resolve_pretrained`), reading ``.pth`` / ``.npz`` / ``.safetensors`` files safely
(:func:`load_state_dict`, :func:`read_checkpoint`) and rewriting any of them as safetensors
(:func:`convert_checkpoint`).

Reading never unpickles objects: ``.pth`` files go through ``torch.load(weights_only=True)``
(which also accepts the ``argparse.Namespace`` that DeiT-style training checkpoints carry, a plain
attribute bag), ``.npz`` through ``np.load(allow_pickle=False)`` (Google's layout renamed to
timm's by :mod:`vitquant.models.npz`) and safetensors through its own parser. Adapting a state
dict to a model is :mod:`vitquant.models.checkpoints`' part.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vitquant._atomic import atomic_write
from vitquant.errors import CheckpointError, ConfigError
from vitquant.models.npz import find_google_prefix, google_to_state_dict

__all__ = [
    "vitquant_home",
    "resolve_pretrained",
    "load_state_dict",
    "clean_state_dict",
    "read_checkpoint",
    "convert_checkpoint",
]

_EXTENSIONS = ("safetensors", "pth", "npz")
_WRAPPERS = ("model", "state_dict", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")
#: harmless classes that ``weights_only`` loading accepts (DeiT/Q-ViT checkpoints pickle their
#: argparse arguments next to the weights)
_SAFE_GLOBALS: list[Any] = [argparse.Namespace]


# --- where pretrained files live ---------------------------------------------------------------
def vitquant_home() -> Path:
    """The local weight cache: ``$VITQUANT_HOME`` or ``~/.cache/vitquant``."""
    return Path(os.environ.get("VITQUANT_HOME") or "~/.cache/vitquant").expanduser()


def resolve_pretrained(name: str) -> Path:
    """The local file with the published weights of model ``name``; nothing is downloaded.

    Looks for ``<name>.safetensors``, ``<name>.pth`` and ``<name>.npz`` (in that order) in
    :func:`vitquant_home`.

    Raises:
        CheckpointError: no such file; the message says where to put one.
    """
    home = vitquant_home()
    for ext in _EXTENSIONS:
        path = home / f"{name}.{ext}"
        if path.is_file():
            return path
    raise CheckpointError(
        f"no pretrained weights for {name!r}: nothing is downloaded, so put {name}.safetensors, "
        f"{name}.pth or {name}.npz in {home} (set $VITQUANT_HOME to change it) or pass "
        "checkpoint_path=..."
    )


# --- reading files -----------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _corrupt(path: Path, kind: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable {kind} file (corrupt or truncated?): {_first_line(e)}"
    )


def _sniff(path: Path) -> str:
    """``"torch"``, ``"npz"`` or ``"safetensors"``, from the content (the suffix breaks ties)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise _corrupt(path, "zip (.pth/.npz)", e) from e
        return "npz" if names and all(n.endswith(".npy") for n in names) else "torch"
    if head[8:9] == b"{" or path.suffix == ".safetensors":
        return "safetensors"
    return "npz" if path.suffix == ".npz" else "torch"


def _pickled_globals(path: Path, e: BaseException) -> list[str]:
    """The Python classes/functions a torch file pickles (beyond what we accept)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    names: list[str] = []
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        with contextlib.suppress(Exception):
            names = [n for n in finder(str(path)) if n not in allowed]
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(e))
    return names


def _read_torch(path: Path, trust: bool = False) -> Any:
    safe = getattr(torch.serialization, "safe_globals", None)
    ctx = safe(_SAFE_GLOBALS) if safe is not None else contextlib.nullcontext()
    try:
        with ctx:
            return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        names = _pickled_globals(path, e)
        if not names:
            raise _corrupt(path, "PyTorch", e) from e
        raise CheckpointError(
            f"{path} pickles Python objects ({', '.join(names[:4])}) and vitquant never unpickles; "
            "if you trust the file, convert it once with vitquant.models.checkpoints."
            "convert_checkpoint(SRC, 'DST.safetensors', unsafe_trust_file=True) (CLI: `vitquant "
            "convert SRC DST.safetensors --unsafe-trust-file`) or load it yourself and torch.save "
            "only its state_dict"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise _corrupt(path, "PyTorch", e) from e


def _read_npz(path: Path) -> tuple[dict[str, Tensor], bool]:
    """The tensors of an ``.npz`` (Google's layout renamed to timm's); whether it was Google's."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            arrays = {k: f[k] for k in f.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(
                f"{path} stores pickled Python objects and vitquant never unpickles; "
                "save the arrays as plain numeric arrays (np.savez) instead"
            ) from e
        raise _corrupt(path, ".npz", e) from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise _corrupt(path, ".npz", e) from e
    if find_google_prefix(frozenset(arrays)) is not None:
        return google_to_state_dict(arrays), True
    return {k: torch.from_numpy(np.array(a, copy=True)) for k, a in arrays.items()}, False


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(path, "safetensors", e) from e


def _unwrap(obj: Any, where: str) -> dict[str, Tensor]:
    """The tensors of a state dict nested in ``model`` / ``state_dict`` / ``module`` entries."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"{where} holds no tensors (keys: {', '.join(list(obj)[:5])})")
    return sd


def clean_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strips the ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) key prefixes."""
    out: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        while k.startswith(_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def _read(path: str | os.PathLike[str], trust: bool = False) -> tuple[dict[str, Tensor], str]:
    """The cleaned state dict and its format: ``"torch"``, ``"safetensors"``, ``"npz"`` or
    ``"google"`` (a Google-layout ``.npz``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"checkpoint {'is a directory' if p.is_dir() else 'not found'}: {p}")
    fmt = _sniff(p)
    obj: Any
    if fmt == "npz":
        obj, google = _read_npz(p)
        fmt = "google" if google else fmt
    elif fmt == "safetensors":
        obj = _read_safetensors(p)
    else:
        obj = _read_torch(p, trust)
    return clean_state_dict(_unwrap(obj, str(p))), fmt


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Reads a checkpoint of any supported kind as a plain ``{name: tensor}`` dict (on CPU).

    ``.pth`` wrappers (``model``, ``state_dict``, ...) and ``module.``/``_orig_mod.`` prefixes are
    removed and Google ``.npz`` layouts are renamed to timm's names; nothing is resampled.

    Raises:
        CheckpointError: missing, corrupt, or unsafe (pickled objects) file.
    """
    return _read(path)[0]


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], str]:
    """A file's state dict (as :func:`load_state_dict`) and its format (``"torch"``,
    ``"safetensors"``, ``"npz"`` or ``"google"``), for
    :func:`~vitquant.models.checkpoints.load_checkpoint`'s ``read``."""
    return _read(path)


# --- conversion --------------------------------------------------------------------------------
def convert_checkpoint(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], unsafe_trust_file: bool = False
) -> Path:
    """Writes the state dict of any supported checkpoint as a ``.safetensors`` file (atomically).

    Args:
        src: a ``.pth``, ``.npz`` or ``.safetensors`` file; wrappers and prefixes are removed and
            Google names become timm's.
        dst: the output, ending in ``.safetensors``.
        unsafe_trust_file: UNSAFE, only for files you trust: read a ``.pth`` with
            ``torch.load(weights_only=False)``, which runs any code pickled in it. Needed for
            training checkpoints that pickle Python objects other than ``argparse.Namespace``.

    Returns:
        The output path.
    """
    from safetensors.torch import save as st_save

    out = Path(dst).expanduser()
    if out.suffix != ".safetensors":
        raise ConfigError(f"convert writes safetensors: name the output *.safetensors, not {out}")
    state_dict, _ = _read(src, trust=unsafe_trust_file)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.nbytes:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    data = st_save(tensors, metadata={"format": "pt", "source": Path(src).name})
    return atomic_write(out, lambda f: f.write(data))
