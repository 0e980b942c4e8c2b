"""Shared test set-up: offline hubs, deterministic seeds, and the timm import work-around."""

from __future__ import annotations

import os
import types

import pytest
import torch

from helpers import import_timm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def timm() -> types.ModuleType:
    """The timm module (imported with the work-around); the test fails if timm is missing."""
    return import_timm()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
