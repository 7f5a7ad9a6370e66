"""Output folders: checked writable before any work, written through a staging folder, never left empty.

Rule (the one the workflow and every command that writes a folder follow): a run writes into a staging
folder next to the output folder (``.<name>.staging-<pid>``; inside the output folder when only that one is
writable). When the run ends, finished or not, what it wrote is moved into the output folder and every output
of an earlier run that this run did not write again is REMOVED, so the folder never mixes two runs. Only the
names the command owns are replaced or removed (``owned``); anything else in the folder (a journal the
operator keeps there, notes) is left alone. A failed command that wrote nothing leaves no new, empty folder.

    folder = OutputFolder(out, owned=("summary.json", "registration", ...))   # checks writable (InputDataError)
    folder.begin()              -> the staging path to write into
    folder.commit()             -> moves the staging outputs in (replaced / removed names in .replaced/.removed)
    folder.discard()            -> removes the staging folder and a folder this command created, when empty
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from SmartBiopsyCoreLib.errors import InputDataError

STAGING_PREFIX = "."
STAGING_INFIX = ".staging-"


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def _probe_writable(folder: Path) -> bool:
    """True when a file can really be created in ``folder`` (catches read-only mounts and immutable folders)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, name = tempfile.mkstemp(prefix=".smartbiopsy-write-check-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return True


def check_output_folder(out, option: str = "--out") -> Path:
    """Refuse an output folder that cannot be written, before any work (one sentence, ``InputDataError``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputDataError(f"{option} {out} exists and is not a folder; give a folder for the outputs")
    base = _nearest_existing(out.absolute())
    if not base.is_dir():
        raise InputDataError(f"{option} {out} cannot be created because {base} is a file, not a folder; "
                             "give another output folder")
    if not _probe_writable(base):
        what = "the output folder" if base == out.absolute() else f"{base} (where the output folder would be created)"
        raise InputDataError(f"{option} {out}: {what} is not writable; give a folder you can write to")
    return out


class OutputFolder:
    """One command's output folder as a transaction (see the module docstring for the rule)."""

    def __init__(self, out, owned=None, option: str = "--out"):
        self.out = check_output_folder(out, option)
        self.owned = None if owned is None else set(owned)
        self.existed = self.out.exists()
        self.staging: Path | None = None
        self.replaced: list[str] = []
        self.removed: list[str] = []
        self._created: list[Path] = []

    def begin(self) -> Path:
        """Create and return the staging folder (next to the output folder when its parent is writable)."""
        parent = self.out.absolute().parent
        name = f"{STAGING_PREFIX}{self.out.name}{STAGING_INFIX}{os.getpid()}"
        if not parent.exists():
            missing = []
            p = parent
            while not p.exists():
                missing.append(p)
                p = p.parent
            parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # innermost first: removed again when nothing is moved in
        if _probe_writable(parent):
            self.staging = parent / name
        else:  # only the output folder itself can be written: stage inside it
            self.staging = self.out.absolute() / name
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)
        return self.staging

    def _owned(self, name: str) -> bool:
        return self.owned is None or name in self.owned

    def commit(self) -> Path:
        """Move what the run wrote into the output folder; remove the earlier run's owned outputs it did not
        rewrite. Returns the output folder. Nothing is moved (and no folder created) when nothing was written."""
        staging = self.staging
        if staging is None or not staging.exists():
            return self.out
        _prune_empty_folders(staging)  # a step that failed after creating its folder wrote nothing
        new = sorted(p.name for p in staging.iterdir())
        if not new and not self.existed:
            self.discard()
            return self.out
        _relocate_paths(staging, str(staging), str(self.out.absolute()))
        self.out.mkdir(parents=True, exist_ok=True)
        trash = staging / f"{STAGING_PREFIX}previous"
        trash.mkdir()
        for entry in sorted(self.out.iterdir()):
            if entry.name.startswith(STAGING_PREFIX) and STAGING_INFIX in entry.name:
                continue
            if entry.name in new:
                self.replaced.append(entry.name)
            elif self._owned(entry.name):
                self.removed.append(entry.name)
            else:
                continue
            os.replace(entry, trash / entry.name)
        for name in new:
            os.replace(staging / name, self.out / name)
        shutil.rmtree(staging, ignore_errors=True)
        self.staging = None
        return self.out

    def discard(self) -> None:
        """Remove the staging folder, and the output folder (and parents) this command created if still empty."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if not self.existed:
            for p in [self.out.absolute(), *self._created]:
                if not p.exists():
                    continue
                try:
                    p.rmdir()  # only when empty
                except OSError:
                    break


#: text files whose absolute paths into the staging folder are rewritten to the output folder on commit
RELOCATED_SUFFIXES = (".json", ".jsonl", ".csv", ".html", ".txt", ".log", ".tfm")


def _relocate_paths(root: Path, old: str, new: str, max_bytes: int = 200_000_000) -> None:
    """Rewrite ``old`` (the staging folder's absolute path) to ``new`` in the text files under ``root``: outputs
    that record where they were written (session logs, export manifests) name the output folder."""
    needle = old.encode()
    for path in root.rglob("*"):
        if path.suffix.lower() not in RELOCATED_SUFFIXES or not path.is_file() or path.stat().st_size > max_bytes:
            continue
        data = path.read_bytes()
        if needle in data:
            tmp = path.with_name(path.name + ".relocate")
            tmp.write_bytes(data.replace(needle, new.encode()))
            os.replace(tmp, path)


def _prune_empty_folders(root: Path) -> None:
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            path.rmdir()  # only when empty
        except OSError:
            pass


def nearest_existing(path) -> Path:
    """``path`` itself when it exists, else its nearest existing parent (absolute)."""
    return _nearest_existing(Path(path).absolute())


def remove_if_new_and_empty(out, existing: Path | None) -> None:
    """After a failed command: remove ``out`` and the parents it created (below ``existing``, the nearest folder
    that existed before the command, from :func:`nearest_existing`) when they are empty."""
    if out is None or existing is None:
        return
    p = Path(out).absolute()
    existing = Path(existing).absolute()
    while p != existing and existing in p.parents:
        try:
            if not p.is_dir() or any(p.iterdir()):
                return
            p.rmdir()
        except OSError:
            return
        p = p.parent
