"""Make optional packages unimportable for one test, as they are in desktop Slicer (matplotlib, pyradiomics).

``block_imports(monkeypatch, "matplotlib", "radiomics")`` drops the packages from ``sys.modules`` and puts a
finder first on ``sys.meta_path`` that raises ModuleNotFoundError for them; monkeypatch undoes both. In the
Slicer-package environment (scripts/test-slicer-env.sh) the packages are absent for real and this changes
nothing.
"""
from __future__ import annotations

import importlib.abc
import sys

#: What Slicer 5.10 does not bundle (import names): matplotlib (with its mpl_toolkits) and pyradiomics.
NOT_IN_SLICER = ("matplotlib", "mpl_toolkits", "radiomics")


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}' (made unimportable by the test)", name=fullname)
        return None


def block_imports(monkeypatch, *names) -> None:
    for mod in list(sys.modules):
        if mod.split(".")[0] in names:
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(sys, "meta_path", [_Blocker(names), *sys.meta_path])


def blocker_source(names) -> str:
    """Python source that installs the same blocker in a fresh interpreter (for subprocess checks)."""
    return ("import importlib.abc, sys\n"
            "class _B(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, fullname, path=None, target=None):\n"
            f"        if fullname.split('.')[0] in {set(names)!r}:\n"
            "            raise ModuleNotFoundError(fullname, name=fullname)\n"
            "sys.meta_path.insert(0, _B())\n")
