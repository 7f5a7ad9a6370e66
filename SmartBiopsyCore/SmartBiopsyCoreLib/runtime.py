"""Headless Slicer runtime: a real MRML scene with the module logics SmartBiopsy needs, without Qt.

Built from the pip package ``slicer-core`` (Slicer's own C++ MRML classes and module logics wrapped for
Python). Like the desktop application, the scene gets a ``vtkCacheManager`` and a ``vtkDataIOManager``
(reading a scene bundle ``.mrb`` fails without them), a ``vtkSlicerApplicationLogic``, default colour
nodes, and the volumes, markups, segmentations, transforms, tables and subject-hierarchy logics.

Inside the desktop application nobody calls this: the module Logic passes ``slicer.mrmlScene``.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: slicer-core versions this runtime was tested with (pyproject pins the same range).
TESTED_SLICER_CORE = ">=5.11,<5.14"


@dataclass
class HeadlessRuntime:
    """A scene and the logics attached to it. Keep a reference while the scene is in use."""

    scene: object
    app_logic: object
    logics: dict = field(default_factory=dict)
    cache_dir: str = ""

    def logic(self, name: str):
        """Module logic by short name: colors, volumes, markups, segmentations, transforms, tables, subjecthierarchy."""
        try:
            return self.logics[name]
        except KeyError:
            raise KeyError(f"no '{name}' logic in the headless runtime; available: {sorted(self.logics)}") from None

    def clear(self) -> None:
        """Remove every non-singleton node (like File > Close Scene) and restore default colour nodes."""
        self.scene.Clear(False)


def _import_slicer():
    try:
        import slicer  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the Slicer MRML libraries are not installed; install the headless package with "
            "'pip install slicer-core' (tested " + TESTED_SLICER_CORE + ") or run inside 3D Slicer"
        ) from exc
    return slicer


def new_runtime(cache_dir: str | None = None) -> HeadlessRuntime:
    """Build a headless runtime: real ``vtkMRMLScene`` plus application and module logics."""
    slicer = _import_slicer()

    scene = slicer.vtkMRMLScene()
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="smartbiopsy-cache-")
    os.makedirs(cache_dir, exist_ok=True)

    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(cache_dir)
    scene.SetCacheManager(cache)
    data_io = slicer.vtkDataIOManager()
    data_io.SetCacheManager(cache)
    scene.SetDataIOManager(data_io)
    scene.SetRootDirectory(cache_dir)

    app_logic = slicer.vtkSlicerApplicationLogic()
    # The colour logic looks for optional colour files below the home directory; the pip package ships
    # none (the built-in tables are created in code), so point it at the cache to keep the log clean.
    os.makedirs(os.path.join(cache_dir, "share", "ColorFiles"), exist_ok=True)
    app_logic.SetHomeDirectory(cache_dir)
    app_logic.SetShareDirectory("share")
    app_logic.SetMRMLScene(scene)
    data_io_logic = slicer.vtkDataIOManagerLogic()
    data_io_logic.SetMRMLApplicationLogic(app_logic)
    data_io_logic.SetAndObserveDataIOManager(data_io)

    logics: dict = {"dataio": data_io_logic}

    def attach(short: str, cls_name: str, module_name: str):
        cls = getattr(slicer, cls_name)
        logic = cls()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic(module_name, logic)
        logics[short] = logic
        return logic

    attach("colors", "vtkSlicerColorLogic", "Colors")
    attach("subjecthierarchy", "vtkSlicerSubjectHierarchyModuleLogic", "SubjectHierarchy")
    attach("volumes", "vtkSlicerVolumesLogic", "Volumes")
    attach("transforms", "vtkSlicerTransformLogic", "Transforms")
    attach("markups", "vtkSlicerMarkupsLogic", "Markups")
    attach("segmentations", "vtkSlicerSegmentationsModuleLogic", "Segmentations")
    attach("tables", "vtkSlicerTablesLogic", "Tables")
    attach("models", "vtkSlicerModelsLogic", "Models")
    attach("sequences", "vtkSlicerSequencesLogic", "Sequences")

    if hasattr(logics["volumes"], "SetColorLogic"):
        logics["volumes"].SetColorLogic(logics["colors"])
    logger.debug("headless MRML runtime ready (cache %s)", cache_dir)
    return HeadlessRuntime(scene=scene, app_logic=app_logic, logics=logics, cache_dir=cache_dir)


def new_scene(cache_dir: str | None = None):
    """Convenience: the scene of a new :func:`new_runtime` (the runtime is kept alive on the scene)."""
    rt = new_runtime(cache_dir)
    # Keep the logics alive as long as the scene object: Python wrappers hold the references.
    _ALIVE[id(rt.scene)] = rt
    return rt.scene


def runtime_of(scene) -> HeadlessRuntime | None:
    """The runtime that created ``scene`` with :func:`new_scene`, if any."""
    return _ALIVE.get(id(scene))


_ALIVE: dict[int, HeadlessRuntime] = {}
