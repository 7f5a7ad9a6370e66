"""Shared pytest set-up: module folders on sys.path (as Slicer does), real-data location, phantom cache."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner")
for _module in MODULES:
    _p = str(ROOT / _module)
    if _p not in sys.path:
        sys.path.insert(0, _p)


def cli_env() -> dict:
    """The environment for running the command from this checkout: the four module folders on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(ROOT / m) for m in MODULES), env.get("PYTHONPATH", "")])
    return env


CLI = [sys.executable, "-m", "SmartBiopsyLib.cli"]


def smartbiopsy(*args, cwd=None, timeout=600, input=None):
    """Run ``smartbiopsy ARGS`` as a user does (a separate process); returns the CompletedProcess."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=cli_env(),
                          timeout=timeout, input=input)

# the demo's on-disk phantom cache goes to a temporary folder during tests (never the user's ~/.cache)
os.environ.setdefault("SMARTBIOPSY_PHANTOM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "smartbiopsy-test-phantom-cache"))

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
    from SmartBiopsyCoreLib.phantom.sarcoma import generate_phantom

    return generate_phantom(0)


@pytest.fixture
def scene():
    """A fresh real MRML scene from the headless runtime (slicer-core)."""
    from SmartBiopsyCoreLib.runtime import new_runtime

    rt = new_runtime()
    yield rt.scene
    rt.scene.Clear(True)
