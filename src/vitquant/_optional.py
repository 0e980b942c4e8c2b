"""Optional third-party packages (torchvision, timm), each imported once, with clear errors.

torchvision is released in lock-step with torch: torch ``2.m`` needs torchvision ``0.(m+15)``
(torch 2.13 <-> torchvision 0.28; the table of the torchvision README). A torchvision built for
another torch fails deep inside its import or, worse, inside a data loader worker, so
:func:`import_torchvision` checks the installed versions first and raises a
:class:`MissingDependencyError` naming both versions and the pip command (the ``vision`` extra
pins the torchvision of the torch vitquant is tested with).

A torchvision wheel of the right version but built for CUDA, beside a CPU-only torch (what
``pip install torch==2.13.0 timm`` gives), cannot load its C++ ops; its import then stops at
``torch.library.register_fake("torchvision::nms")`` with "operator torchvision::nms does not
exist". Only in that case, the two missing operator schemas (``nms``, ``qnms``) are defined
before the import is retried: everything vitquant uses (transforms, datasets, models) works, and
only ``torchvision.ops.nms`` itself stays unusable.

timm imports torchvision, so :func:`import_timm` goes through :func:`import_torchvision`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
import threading
import types

import torch

from vitquant.errors import ConfigError

__all__ = [
    "MissingDependencyError",
    "TORCHVISION_PIN",
    "expected_torchvision_version",
    "check_torchvision_version",
    "import_torchvision",
    "import_timm",
]

TORCHVISION_PIN = "0.28.0"
"""The torchvision of the ``vision`` extra (for torch 2.13, the torch vitquant is tested with)."""

# schemas of the C++ ops that torchvision's Python code registers fake kernels for at import
_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")
_LOCK = threading.RLock()
_MODULES: dict[str, types.ModuleType] = {}
_LIBS: list[torch.library.Library] = []  # the schemas live as long as their Library object


class MissingDependencyError(ConfigError, ImportError):
    """An optional dependency that is not installed or does not match the installed torch.

    A :class:`~vitquant.errors.ConfigError` (the CLI prints it as one line) and an
    ``ImportError`` (``except ImportError`` around an optional import still catches it).
    """


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _dist_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (None when it is not installed)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_version() -> str:
    return str(torch.__version__)


def expected_torchvision_version(torch_version: str | None = None) -> str | None:
    """The torchvision ``"0.N"`` series made for ``torch_version`` (default: the installed one).

    ``None`` when the rule (torch ``2.m`` -> torchvision ``0.(m+15)``) does not apply (not a
    torch 2 version string).

    Example:
        >>> expected_torchvision_version("2.13.0+cpu")
        '0.28'
    """
    mm = _major_minor(_torch_version() if torch_version is None else torch_version)
    if mm is None or mm[0] != 2:
        return None
    return f"0.{mm[1] + 15}"


def _install_hint(torch_version: str) -> str:
    """The pip command that installs the torchvision made for ``torch_version``, torch pinned."""
    base = torch_version.split("+", 1)[0]
    expected = expected_torchvision_version(torch_version)
    if expected is None or expected == TORCHVISION_PIN.rsplit(".", 1)[0]:
        return f"pip install 'vitquant[vision]' 'torch=={base}'"
    return (
        f"pip install 'torchvision=={expected}.*' 'torch=={base}' (the vision extra pins "
        f"torchvision {TORCHVISION_PIN}, for torch 2.13)"
    )


def check_torchvision_version(torchvision_version: str, torch_version: str | None = None) -> None:
    """Raises :class:`MissingDependencyError` when torchvision was not made for this torch.

    Args:
        torchvision_version: the installed torchvision (``"0.28.0+cu130"``).
        torch_version: the installed torch (default: ``torch.__version__``).

    Raises:
        MissingDependencyError: the two versions do not belong together (both are named, with
            the pip command that installs the matching pair).
    """
    torch_version = _torch_version() if torch_version is None else torch_version
    expected = expected_torchvision_version(torch_version)
    got = _major_minor(torchvision_version)
    if expected is None or got is None or f"{got[0]}.{got[1]}" == expected:
        return
    series = ".".join(torch_version.split(".")[:2])
    raise MissingDependencyError(
        f"torchvision {torchvision_version} does not match torch {torch_version} (torch "
        f"{series} needs torchvision {expected}.x): {_install_hint(torch_version)}"
    )


def _define_missing_ops() -> bool:
    """Defines the torchvision op schemas that are missing; True when it defined any."""
    missing = []
    for name in _OP_SCHEMAS:
        try:
            getattr(torch.ops.torchvision, name)
        except (AttributeError, RuntimeError):
            missing.append(name)
    if not missing:
        return False
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(_OP_SCHEMAS[name])
    _LIBS.append(lib)
    return True


def _forget(prefix: str) -> None:
    """Drops the half-imported modules of a failed import of package ``prefix``."""
    for name in [m for m in sys.modules if m == prefix or m.startswith(prefix + ".")]:
        del sys.modules[name]


def _import_checked_torchvision() -> types.ModuleType:
    torch_version = _torch_version()
    version = _dist_version("torchvision")
    if version is None and importlib.util.find_spec("torchvision") is None:
        raise MissingDependencyError(
            "torchvision is not installed (vitquant needs it for image folders, zipped ImageNet "
            f"and torchvision models): {_install_hint(torch_version)}"
        )
    if version is not None:
        check_torchvision_version(version, torch_version)
    what = f"torchvision {version}" if version else "torchvision"

    def failed(exc: Exception) -> MissingDependencyError:
        return MissingDependencyError(
            f"{what} cannot be imported beside torch {torch_version} ({exc}): "
            f"{_install_hint(torch_version)}"
        )

    try:
        module = importlib.import_module("torchvision")
    except RuntimeError as exc:
        # a CUDA build of the right version beside a CPU torch: define its op schemas, retry once
        if not _MISSING_OP.search(str(exc)):
            raise failed(exc) from exc
        _forget("torchvision")
        if not _define_missing_ops():
            raise failed(exc) from exc
        try:
            module = importlib.import_module("torchvision")
        except (RuntimeError, ImportError) as again:
            _forget("torchvision")
            raise failed(again) from again
    except ImportError as exc:
        raise failed(exc) from exc
    if version is None:
        check_torchvision_version(str(getattr(module, "__version__", "")), torch_version)
    return module


def import_torchvision() -> types.ModuleType:
    """The ``torchvision`` module, imported once, checked against the installed torch.

    Returns:
        The module (its ``transforms.v2``, ``datasets`` and ``models`` are importable).

    Raises:
        MissingDependencyError: torchvision is not installed, or its version is not the one
            made for the installed torch (the message names both and the pip command).

    Example:
        >>> tv = import_torchvision()
        >>> from torchvision.transforms.v2 import functional as F
    """
    with _LOCK:
        module = _MODULES.get("torchvision")
        if module is None:
            module = _import_checked_torchvision()
            _MODULES["torchvision"] = module
        return module


def import_timm() -> types.ModuleType:
    """The ``timm`` module, imported once (torchvision first, see :func:`import_torchvision`).

    Raises:
        MissingDependencyError: timm is not installed (``pip install 'vitquant[timm]'``), or
            the torchvision it needs is missing or mismatched.
    """
    with _LOCK:
        module = _MODULES.get("timm")
        if module is None:
            if _dist_version("timm") is None and importlib.util.find_spec("timm") is None:
                base = _torch_version().split("+", 1)[0]
                raise MissingDependencyError(
                    f"timm is not installed: pip install 'vitquant[timm]' 'torch=={base}'"
                )
            import_torchvision()
            module = importlib.import_module("timm")
            _MODULES["timm"] = module
        return module
