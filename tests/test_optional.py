"""Optional dependencies: torchvision checked against torch at import, clear errors naming the pip
extra when a package is missing or mismatched, the CUDA-build work-around applied only when
needed."""

from __future__ import annotations

import importlib.metadata
import re

import pytest
import torch

import vitquant._optional as opt
from vitquant.errors import ConfigError


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forgets the cached modules, so the next import call checks again."""
    monkeypatch.setattr(opt, "_MODULES", {})


def test_version_rule_matches_the_installed_pair() -> None:
    assert opt.expected_torchvision_version("2.13.0+cpu") == "0.28"
    assert opt.expected_torchvision_version("2.1.2") == "0.16"  # torch 2.1 <-> torchvision 0.16
    assert opt.expected_torchvision_version("1.13.1") is None  # the rule is for torch 2 only
    # the venv's own pair (installed by pip's resolver from torch's pin) obeys the rule
    tv = importlib.metadata.version("torchvision")
    assert tv.startswith(opt.expected_torchvision_version(torch.__version__) + ".")
    opt.check_torchvision_version(tv)  # no error
    assert opt.TORCHVISION_PIN.startswith(opt.expected_torchvision_version("2.13.0") + ".")


def test_import_torchvision_works_and_is_cached() -> None:
    tv = opt.import_torchvision()
    assert opt.import_torchvision() is tv
    from torchvision.transforms.v2 import functional as F

    x = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    assert torch.equal(F.horizontal_flip(x), x.flip(-1))  # a real op of the imported package
    assert opt.import_timm().__name__ == "timm"


def test_mismatched_version_is_a_clear_error_at_import(
    monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    monkeypatch.setattr(opt, "_dist_version", lambda name: "0.27.1")
    with pytest.raises(opt.MissingDependencyError) as info:
        opt.import_torchvision()
    msg = str(info.value)
    series = ".".join(torch.__version__.split(".")[:2])
    assert f"torchvision 0.27.1 does not match torch {torch.__version__}" in msg
    assert f"torch {series} needs torchvision {opt.expected_torchvision_version()}.x" in msg
    assert "vitquant[vision]" in msg or "pip install 'torchvision==" in msg
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ImportError)
    with pytest.raises(opt.MissingDependencyError, match="does not match torch"):
        opt.import_timm()  # timm goes through the same check


def test_mismatched_torch_names_its_pair(monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    monkeypatch.setattr(opt, "_torch_version", lambda: "2.12.0+cpu")
    with pytest.raises(opt.MissingDependencyError) as info:
        opt.import_torchvision()
    msg = str(info.value)
    assert "torch 2.12 needs torchvision 0.27.x" in msg
    assert "pip install 'torchvision==0.27.*' 'torch==2.12.0'" in msg


def test_missing_packages_name_the_extra(monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    monkeypatch.setattr(opt, "_dist_version", lambda name: None)
    monkeypatch.setattr(opt.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(
        opt.MissingDependencyError, match=re.escape("pip install 'vitquant[vision]'")
    ):
        opt.import_torchvision()
    with pytest.raises(opt.MissingDependencyError, match=re.escape("pip install 'vitquant[timm]'")):
        opt.import_timm()


def test_other_import_failures_are_not_patched_over(
    monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    calls = []

    def broken(name: str) -> None:
        calls.append(name)
        raise RuntimeError("undefined symbol: _ZN3c104cuda9SetDevice")

    monkeypatch.setattr(opt.importlib, "import_module", broken)
    monkeypatch.setattr(opt, "_define_missing_ops", lambda: pytest.fail("work-around applied"))
    with pytest.raises(opt.MissingDependencyError, match="cannot be imported beside torch"):
        opt.import_torchvision()
    assert calls == ["torchvision"]  # no retry


def test_workaround_only_for_the_missing_op(monkeypatch: pytest.MonkeyPatch, fresh: None) -> None:
    """The nms error leads to one retry after the schemas are defined."""
    real = opt.importlib.import_module
    calls = []

    def first_fails(name: str) -> object:
        calls.append(name)
        if len(calls) == 1:
            raise RuntimeError("operator torchvision::nms does not exist")
        return real(name)

    monkeypatch.setattr(opt.importlib, "import_module", first_fails)
    monkeypatch.setattr(opt, "_forget", lambda prefix: None)  # keep the working import
    monkeypatch.setattr(opt, "_define_missing_ops", lambda: True)
    assert opt.import_torchvision().__name__ == "torchvision"
    assert calls == ["torchvision", "torchvision"]
