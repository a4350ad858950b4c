"""Shared fixtures: node homes in tmp dirs, paths to demo and shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (CI has it)")
    return SHARED_DATA


@pytest.fixture
def node_home(tmp_path: Path) -> Path:
    from node.home import init_home

    home = tmp_path / "home"
    init_home(home, "site-a")
    return home
