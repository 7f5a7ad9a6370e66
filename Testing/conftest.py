"""Shared pytest set-up: module folders on sys.path (as Slicer does), real-data location, phantom cache."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _module in ("SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    _p = str(ROOT / _module)
    if _p not in sys.path:
        sys.path.insert(0, _p)

SHARED_DATA = Path(os.environ.get("SMARTBIOPSY_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real read-only scans (../shared/data); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def phantom0():
    """The default phantom case (seed 0, rigid MRI pose), generated once per test session."""
    from SmartBiopsyLib.phantom import generate_phantom

    return generate_phantom(0)


@pytest.fixture
def scene():
    """A fresh real MRML scene from the headless runtime (slicer-core)."""
    from SmartBiopsyLib.runtime import new_runtime

    rt = new_runtime()
    yield rt.scene
    rt.scene.Clear(True)
