"""Scene bundles (``.mrb``) headless: save a scene with all its data, reopen it into a new scene.

MRML glue: takes the scene explicitly. In the desktop application ``slicer.util.saveScene`` does the same;
here the application logic of the headless runtime writes the bundle folder and zips it.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError

logger = logging.getLogger(__name__)


def _app_logic_for(scene):
    from SmartBiopsyCoreLib.runtime import runtime_of

    rt = runtime_of(scene)
    if rt is not None:
        return rt.app_logic
    import slicer

    logic = slicer.vtkSlicerApplicationLogic()
    logic.SetMRMLScene(scene)
    return logic


def save_scene_bundle(scene, path, app_logic=None) -> str:
    """Write ``scene`` and every storable node's data into the bundle ``path`` (.mrb). Returns the path."""
    path = os.fspath(path)
    if not path.lower().endswith(".mrb"):
        raise InputDataError(f"a scene bundle must end in .mrb (got {os.path.basename(path)})")
    logic = app_logic or _app_logic_for(scene)
    work = tempfile.mkdtemp(prefix="smartbiopsy-mrb-")
    try:
        name = os.path.splitext(os.path.basename(path))[0]
        bundle_dir = os.path.join(work, name)
        os.makedirs(bundle_dir)
        if not logic.SaveSceneToSlicerDataBundleDirectory(bundle_dir, None):
            raise SmartBiopsyError(f"could not write the scene data to {bundle_dir}; check free disk space")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp_zip = path + ".partial"
        if not logic.Zip(tmp_zip, bundle_dir):
            raise SmartBiopsyError(f"could not create the scene bundle {path}")
        os.replace(tmp_zip, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("scene bundle written: %s", path)
    return path


def load_scene_bundle(path, cache_dir: str | None = None):
    """Open a ``.mrb`` into a new headless runtime; returns the :class:`HeadlessRuntime`."""
    from SmartBiopsyCoreLib.runtime import new_runtime

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputDataError(f"scene bundle {path} does not exist")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise InputDataError(f"{os.path.basename(path)} is not a Slicer scene bundle (not a zip archive)")
    rt = new_runtime(cache_dir)
    extract = tempfile.mkdtemp(prefix="smartbiopsy-mrb-open-", dir=rt.cache_dir)
    if not rt.app_logic.OpenSlicerDataBundle(path, extract):
        raise InputDataError(f"{os.path.basename(path)} could not be opened as a Slicer scene bundle")
    return rt
