"""``smartbiopsy demo`` offers the phantom disk cache opt-out; user runs never read the phantom cache."""
from pathlib import Path

from conftest import smartbiopsy

ROOT = Path(__file__).resolve().parents[2]


def test_demo_offers_the_phantom_cache_opt_out():
    p = smartbiopsy("demo", "--help")
    assert p.returncode == 0, p.stderr
    assert "--no-phantom-cache" in p.stdout


def test_only_the_demo_asks_for_the_phantom_disk_cache():
    users = [f.relative_to(ROOT).as_posix() for f in ROOT.glob("*/*Lib/**/*.py") if "disk_cache=" in f.read_text()]
    assert users == ["SmartBiopsy/SmartBiopsyLib/cli/cmd_demo.py"], users
