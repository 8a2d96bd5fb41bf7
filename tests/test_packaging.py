"""The four top-level packages import from this checkout, not from a same-named PyPI package."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["lightning_app", "models", "datamodules", "metrics"])
def test_package_resolves_to_repo(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO / name
