"""Static checks of the Slicer extension layer (desktop Slicer cannot run here).

What a Slicer build or the Extensions Index would reject, or what would break only when a user opens a
module, is checked from the sources: CMake lists vs files on disk, module files vs their .ui files,
parameter-node fields vs ``SlicerParameterName`` bindings (including whether Slicer has a GUI connector
for that widget class and field type), the catalog entry vs the Extensions Index schema, the template's
structure, and the help links.
"""
from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner")  # modules with a panel
CORE = "SmartBiopsyCore"  # the hidden library module every panel module depends on
ALL_MODULES = (CORE, *MODULES)

#: Widget classes that exist in Slicer 5.10+ (Qt, CTK, qMRML, qSlicer) and may appear in the .ui files.
KNOWN_WIDGETS = {
    # Qt
    "QWidget", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QComboBox", "QLineEdit",
    "QTextEdit", "QPlainTextEdit", "QSpinBox", "QDoubleSpinBox", "QSlider", "QTableWidget", "QTreeWidget",
    "QListWidget", "QGroupBox", "QFrame", "QTabWidget", "QStackedWidget", "QScrollArea", "QSplitter",
    "QProgressBar", "QDateTimeEdit", "QButtonGroup",
    # CTK
    "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkSliderWidget", "ctkRangeWidget", "ctkPathLineEdit",
    "ctkDirectoryButton", "ctkCheckBox", "ctkComboBox", "ctkDoubleSpinBox", "ctkMenuButton", "ctkCheckablePushButton",
    # qMRML / qSlicer
    "qMRMLWidget", "qMRMLNodeComboBox", "qMRMLCheckableNodeComboBox", "qMRMLSubjectHierarchyTreeView",
    "qMRMLSubjectHierarchyComboBox", "qMRMLSegmentSelectorWidget", "qMRMLSegmentsTableView", "qMRMLTableView",
    "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qMRMLTransformSliders", "qMRMLMatrixWidget",
    "qSlicerWidget", "qSlicerSimpleMarkupsWidget", "qSlicerMarkupsPlaceWidget",
}

#: Widget classes Slicer's parameterNodeWrapper can bind, by field kind (guiConnectors.py, exact class match).
BINDABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}

#: Keys allowed by slicer-extension-catalog-entry-schema-v1.0.1.json ("additionalProperties": false).
CATALOG_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                "build_subdirectory", "enabled", "tier"}
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_SCHEMA = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json"


# ----------------------------------------------------------------------------------------------- helpers
def _cmake_set(text: str, var: str, module: str) -> list[str]:
    m = re.search(r"set\(\s*" + re.escape(var) + r"\b(.*?)\)", text, re.S)
    assert m, f"{module}/CMakeLists.txt has no set({var} ...)"
    body = re.sub(r"#[^\n]*", "", m.group(1))
    return [tok.replace("${MODULE_NAME}", module) for tok in body.split()]


def _module_cmake(module: str) -> str:
    return (ROOT / module / "CMakeLists.txt").read_text()


def _module_tree(module: str) -> ast.Module:
    path = ROOT / module / f"{module}.py"
    return ast.parse(path.read_text(), str(path))


def _class(tree: ast.Module, name: str) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found")


def _ui(module: str) -> ET.ElementTree:
    return ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")


def _ui_widgets(module: str) -> dict[str, str]:
    """objectName -> class of every widget in the module's .ui."""
    return {w.get("name"): w.get("class") for w in _ui(module).iter("widget")}


def _parameter_fields(module: str) -> dict[str, ast.expr]:
    cls = _class(_module_tree(module), f"{module}ParameterNode")
    decorators = [ast.unparse(d) for d in cls.decorator_list]
    assert "parameterNodeWrapper" in decorators, f"{module}ParameterNode is not decorated with @parameterNodeWrapper"
    return {n.target.id: n.annotation for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _field_kind(annotation: ast.expr) -> tuple[str, bool, bool]:
    """(kind, bounded, has_choice) of a parameter-node annotation."""
    text = ast.unparse(annotation)
    base = text
    if text.startswith("Annotated["):
        base = ast.unparse(annotation.slice.elts[0])
    bounded = "WithinRange(" in text or ("Minimum(" in text and "Maximum(" in text)
    choice = "Choice(" in text
    if base in ("bool", "int", "float", "str"):
        return base, bounded, choice
    if base in ("Path", "pathlib.Path"):
        return "path", bounded, choice
    if re.fullmatch(r"(Optional\[)?vtkMRML\w+\]?", base) or base.startswith("Union[vtkMRML"):
        return "node", bounded, choice
    return base, bounded, choice


def _lib_py_files(module: str) -> list[str]:
    folder = ROOT / module
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py")
                  if "__pycache__" not in p.parts and not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------- CMake
def test_top_level_cmake_declares_project_metadata_and_every_module():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(SmartBiopsy\)", text, re.M)
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        m = re.search(rf'set\(EXTENSION_{key}\s+"([^"]+)"\)', text)
        assert m and m.group(1).strip() and m.group(1) != "NA" or key == "DEPENDS", f"EXTENSION_{key} missing or empty"
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"IGT"\)', text)
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    subdirs = re.findall(r"^add_subdirectory\((\w+)\)", text, re.M)
    on_disk = sorted(p.parent.name for p in ROOT.glob("*/CMakeLists.txt"))
    assert sorted(subdirs) == on_disk == sorted(ALL_MODULES)
    tail = [line.strip() for line in text.strip().splitlines() if line.strip() and not line.startswith("#")][-2:]
    assert tail == ["include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]


def test_extension_icon_and_screenshot_are_real_pngs():
    icon = (ROOT / "Resources" / "Icons" / "SmartBiopsy.png").read_bytes()
    assert icon[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", icon[16:24]) == (128, 128), "the extension icon must be 128x128"
    shots = list((ROOT / "Resources" / "Screenshots").glob("*.png"))
    assert shots, "no screenshot"
    text = (ROOT / "CMakeLists.txt").read_text()
    for shot in shots:
        assert shot.stat().st_size > 20_000, f"{shot.name} looks like a placeholder"
        assert shot.name in text, f"{shot.name} is not in EXTENSION_SCREENSHOTURLS"
    assert "Resources/Icons/SmartBiopsy.png" in text


@pytest.mark.parametrize("module", ALL_MODULES)
def test_every_python_file_of_a_module_is_listed_in_its_cmake(module):
    listed = _cmake_set(_module_cmake(module), "MODULE_PYTHON_SCRIPTS", module)
    on_disk = _lib_py_files(module)
    missing = sorted(set(on_disk) - set(listed))
    assert not missing, f"{module}/CMakeLists.txt MODULE_PYTHON_SCRIPTS lacks {missing} (they would not be packaged)"
    absent = sorted(f for f in listed if not (ROOT / module / f).is_file())
    assert not absent, f"{module}/CMakeLists.txt lists files that do not exist: {absent}"
    assert len(listed) == len(set(listed)), "duplicate entries"
    stray = [f for f in on_disk if "/" not in f and f != f"{module}.py"]
    assert not stray, f"only {module}.py may sit beside the module's Lib folder, found {stray}"


@pytest.mark.parametrize("module", ALL_MODULES)
def test_module_resources_are_listed_and_exist(module):
    text = _module_cmake(module)
    resources = _cmake_set(text, "MODULE_PYTHON_RESOURCES", module)
    for required in (f"Resources/Icons/{module}.png", f"Resources/UI/{module}.ui") if module != CORE else ():
        assert required in resources, f"{required} not in MODULE_PYTHON_RESOURCES"
    absent = [r for r in resources if not (ROOT / module / r).is_file()]
    assert not absent, f"listed resources missing on disk: {absent}"
    data = sorted(str(p.relative_to(ROOT / module)) for p in (ROOT / module / f"{module}Lib").rglob("*")
                  if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".csv", ".txt") and "__pycache__" not in p.parts)
    unlisted = [d for d in data if d not in resources]
    assert not unlisted, f"Lib data files not packaged (add to MODULE_PYTHON_RESOURCES): {unlisted}"
    req = ROOT / module / "Resources" / "requirements.txt"
    if req.exists():
        assert "Resources/requirements.txt" in resources


@pytest.mark.parametrize("module", ALL_MODULES)
def test_module_cmake_builds_scripted_module_with_tests(module):
    text = _module_cmake(module)
    assert re.search(rf"set\(MODULE_NAME {module}\)", text)
    m = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text, re.S)
    assert m, "no slicerMacroBuildScriptedModule"
    body = m.group(1)
    for part in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}",
                 "WITH_GENERIC_TESTS"):
        assert part in " ".join(body.split()), f"{part} missing"
    code = re.sub(r"#[^\n]*", "", text)
    assert re.search(r"if\(BUILD_TESTING\)\s*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)\s*endif\(\)", code)


# ----------------------------------------------------------------------------------------------- catalog
def test_catalog_entry_follows_the_extensions_index_schema():
    path = ROOT / "SmartBiopsy.json"
    data = json.loads(path.read_text())
    project = re.search(r"^project\((\w+)\)", (ROOT / "CMakeLists.txt").read_text(), re.M).group(1)
    assert path.stem == project, "the catalog file name is the extension name and must equal project()"
    assert CATALOG_REQUIRED <= set(data), f"missing {CATALOG_REQUIRED - set(data)}"
    assert set(data) <= CATALOG_KEYS, f"keys not allowed by the schema: {set(data) - CATALOG_KEYS}"
    assert data["$schema"] == CATALOG_SCHEMA
    assert data["category"] == "IGT" and data["tier"] in (1, 3, 5)
    assert data["scm_url"].startswith("https://github.com/") and data["scm_revision"]
    depends = re.search(r'set\(EXTENSION_DEPENDS\s+"([^"]*)"\)', (ROOT / "CMakeLists.txt").read_text()).group(1).split()
    assert sorted(data.get("build_dependencies", [])) == sorted(d for d in depends if d != "NA")
    assert "SlicerRadiomics" in data["build_dependencies"]


def test_licence_is_bsd3_with_project_copyright():
    text = (ROOT / "LICENSE.txt").read_text()
    assert "BSD 3-Clause" in text and "Copyright (c) 2026, SmartBiopsy contributors" in text


# ----------------------------------------------------------------------------------------------- module files
@pytest.mark.parametrize("module", ALL_MODULES)
def test_module_python_files_compile(module):
    for rel in _lib_py_files(module):
        path = ROOT / module / rel
        compile(path.read_text(), str(path), "exec")


@pytest.mark.parametrize("module", MODULES)
def test_module_file_follows_the_scripted_module_template(module):
    tree = _module_tree(module)
    for suffix in ("", "ParameterNode", "Widget", "Logic", "Test"):
        _class(tree, module + suffix)
    widget = _class(tree, f"{module}Widget")
    methods = {n.name: n for n in widget.body if isinstance(n, ast.FunctionDef)}
    for name in ("setup", "cleanup", "enter", "exit", "initializeParameterNode", "setParameterNode", "_checkCanApply",
                 "onSceneStartClose", "onSceneEndClose"):
        assert name in methods, f"{module}Widget.{name} missing"
    setup = ast.unparse(methods["setup"])
    for call in ("slicer.util.loadUI", "slicer.util.childWidgetVariables", "setMRMLScene(slicer.mrmlScene)",
                 "StartCloseEvent", "EndCloseEvent", "initializeParameterNode()"):
        assert call in setup, f"{module}Widget.setup lacks {call}"
    assert "removeObservers()" in ast.unparse(methods["cleanup"])
    assert "connectGui(self.ui)" in ast.unparse(methods["setParameterNode"])
    logic = _class(tree, f"{module}Logic")
    lm = {n.name: ast.unparse(n) for n in logic.body if isinstance(n, ast.FunctionDef)}
    assert {"getParameterNode", "process", "processParameterNode"} <= set(lm)
    assert f"{module}ParameterNode(super().getParameterNode())" in lm["getParameterNode"]
    logic_src = ast.unparse(logic)
    for popup in ("Display(", "QMessageBox", "QFileDialog", "createProgressDialog"):
        assert popup not in logic_src, f"{module}Logic must not show dialogs ({popup})"


@pytest.mark.parametrize("module", MODULES)
def test_module_metadata_and_help_link(module):
    src = (ROOT / module / f"{module}.py").read_text()
    tree = _module_tree(module)
    init = ast.unparse(_class(tree, module))
    for attr in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{attr} =" in init, f"module metadata {attr} missing"
    assert re.search(r"categories = \[['\"]IGT", init), "the module belongs in the IGT category"
    assert "Johnston" in src and "Acad Radiol 2024" in src and "Xu" in src and "Front Oncol 2025" in src
    links = re.findall(r"(Docs/\w+\.md)", init)
    assert f"Docs/{module}.md" in links, "helpText must link the module's user page"
    for link in links:
        assert (ROOT / link).is_file(), f"helpText links {link}, which does not exist"


@pytest.mark.parametrize("module", MODULES)
def test_module_file_avoids_forbidden_patterns(module):
    src = (ROOT / module / f"{module}.py").read_text()
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module != "__main__", "from __main__ import ..."
        if isinstance(node, ast.Import):
            assert all(a.name != "imp" for a in node.names), "the imp module is removed from Python"
    assert not re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=", src), "sys.path edits"
    assert "TODO" not in src and "TemplateKey" not in src and "AnyWare" not in src, "template text left in"


@pytest.mark.parametrize("module", MODULES)
def test_button_handlers_show_errors_instead_of_raising(module):
    tree = _module_tree(module)
    widget = _class(tree, f"{module}Widget")
    src = ast.unparse(widget)
    handlers = set(re.findall(r'\.connect\([\'"]clicked\(bool\)[\'"],\s*self\.(\w+)\)', src))
    assert handlers, "no button handlers found"
    methods = {n.name: n for n in widget.body if isinstance(n, ast.FunctionDef)}
    for name in handlers:
        assert name in methods, f"{name} connected but not defined"
        body = methods[name].body
        first = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        wrapped = first and isinstance(first[0], ast.With) and \
            "slicer.util.tryWithErrorDisplay" in ast.unparse(first[0].items[0].context_expr) and \
            "waitCursor=True" in ast.unparse(first[0].items[0].context_expr)
        assert wrapped, f"{module}Widget.{name} must run inside slicer.util.tryWithErrorDisplay(..., waitCursor=True)"


@pytest.mark.parametrize("module", MODULES)
def test_self_tests_call_registered_scenarios(module):
    tree = _module_tree(module)
    test = _class(tree, f"{module}Test")
    src = ast.unparse(test)
    called = set(re.findall(r'self\._run\([\'"](\w+)[\'"]\)', src))
    lib = ast.parse((ROOT / module / f"{module}Lib" / "scenarios.py").read_text())
    registered = set()
    for node in lib.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SCENARIOS" for t in node.targets):
            registered = {k.value for k in node.value.keys}
    assert registered and called == registered, f"self-tests {sorted(called)} vs scenarios {sorted(registered)}"
    tests = [n.name for n in test.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    run_test = ast.unparse(next(n for n in test.body if isinstance(n, ast.FunctionDef) and n.name == "runTest"))
    assert all(f"self.{t}()" in run_test for t in tests), "runTest must call every test_* method"
    assert "slicer.mrmlScene.Clear()" in ast.unparse(test), "each test must start from a cleared scene"


# ----------------------------------------------------------------------------------------------- .ui files
@pytest.mark.parametrize("module", MODULES)
def test_ui_is_well_formed_designer_xml_with_known_widgets(module):
    tree = _ui(module)
    root = tree.getroot()
    assert root.tag == "ui" and root.find("class").text == module
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module
    classes = {w.get("class") for w in root.iter("widget")}
    unknown = classes - KNOWN_WIDGETS
    assert not unknown, f"unknown widget classes in {module}.ui: {unknown}"
    custom = {c.find("class").text for c in root.iter("customwidget")}
    qt_builtin = {c for c in classes if c.startswith("Q")}
    assert classes - qt_builtin <= custom, f"custom widgets not declared: {(classes - qt_builtin) - custom}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate objectName"
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML")
            or w.get("class") in ("qSlicerSimpleMarkupsWidget", "qSlicerMarkupsPlaceWidget")} - {module}
    connected = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml <= connected, f"MRML widgets without the scene connection: {mrml - connected}"


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_name_used_by_the_module_exists(module):
    src = (ROOT / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", src))
    defined = set(_ui_widgets(module))
    missing = sorted(used - defined)
    assert not missing, f"{module}.py uses self.ui names absent from {module}.ui: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_bindings_match_fields_and_have_a_gui_connector(module):
    fields = _parameter_fields(module)
    bound = {}
    for w in _ui(module).iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                bound[p.find("string").text] = w.get("class")
    assert bound, f"{module}.ui binds no parameter"
    unknown = sorted(set(bound) - set(fields))
    assert not unknown, f"SlicerParameterName without a {module}ParameterNode field: {unknown}"
    for name, cls in bound.items():
        kind, bounded, choice = _field_kind(fields[name])
        assert kind in BINDABLE, f"field {name} has type {kind}, which the parameter node cannot bind"
        assert cls in BINDABLE[kind], f"{name}: Slicer has no connector from {cls} to {kind}"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert bounded, f"{name}: a slider needs a WithinRange bound"
        if cls == "QComboBox":
            assert choice, f"{name}: a QComboBox binding needs a Choice annotation"


# ----------------------------------------------------------------------------------------------- packaging
#: Import names desktop 3D Slicer 5.10 bundles (or that exist only inside Slicer).
SLICER_BUNDLED = {"numpy", "scipy", "SimpleITK", "pydicom", "vtk", "vtkmodules", "slicer", "qt", "ctk", "packaging"}
#: Optional imports a module works without, and why they have no line in its Resources/requirements.txt.
OPTIONAL_WITHOUT_INSTALL = {
    "crcmod": "C speed-up of the codec's CRC-64; the codec computes it in Python without crcmod",
    "radiomics": "pyradiomics comes with the SlicerRadiomics extension (EXTENSION_DEPENDS)",
    "edt": "multi-threaded exact distance maps; without it the planner uses SimpleITK's exact Maurer map (noted)",
    "itk": "itk-elastix is an optional engine of the local refinement (SimpleITK is the default); absent, it says so",
}
#: Import name -> distribution name on the package index (where they differ).
DISTRIBUTION = {"mpl_toolkits": "matplotlib", "radiomics": "pyradiomics", "yaml": "PyYAML", "slicer": "slicer-core",
                "itk": "itk-elastix", "fhir": "fhir.resources",
                "vtk": "slicer-core", "vtkmodules": "slicer-core"}
LIB_PACKAGES = {f"{m}Lib": m for m in ALL_MODULES}
MINIMUM_SLICER = "5.10"  # Python 3.12
MINIMUM_PYTHON = (3, 12)


def _third_party_imports(paths) -> dict[str, set[str]]:
    """Top-level third-party import name -> files importing it (function-level imports included)."""
    import sys

    own = set(LIB_PACKAGES) | set(ALL_MODULES)
    found: dict[str, set[str]] = {}
    for path in paths:
        for name in _imports_of(path):
            top = name.split(".")[0]
            if top and top not in sys.stdlib_module_names and top not in own and top != "__future__":
                found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _code_of(module: str) -> list[Path]:
    """The module file, its Lib and every Lib those import (what runs when a user works in the module)."""
    todo, seen, files = [module], set(), [ROOT / module / f"{module}.py"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        files += _lib_files(m)
        for path in [ROOT / m / f"{m}.py", *_lib_files(m)]:
            todo += [LIB_PACKAGES[n.split(".")[0]] for n in _imports_of(path) if n.split(".")[0] in LIB_PACKAGES]
    return [f for f in files if f.exists()]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.mark.parametrize("module", ALL_MODULES)
def test_requirements_list_what_slicer_lacks_and_are_offered_from_a_button(module):
    """Resources/requirements.txt = the packages the module's code imports that Slicer does not bundle
    (derived from the imports), each with a >= bound, offered from a button handler after the user agrees."""
    imports = _third_party_imports(_code_of(module))
    needed = {_canonical(DISTRIBUTION.get(n, n)) for n in imports if n not in SLICER_BUNDLED | set(OPTIONAL_WITHOUT_INSTALL)}
    req = ROOT / module / "Resources" / "requirements.txt"
    lines = [line.split("#")[0].strip() for line in req.read_text().splitlines()] if req.exists() else []
    lines = [line for line in lines if line]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9.]+(,<[0-9.]+)?", line) for line in lines), \
        f"each requirement needs a >= bound: {lines}"
    listed = {_canonical(line.split(">=")[0]) for line in lines}
    assert listed == needed, f"{module}: requirements.txt lists {sorted(listed)}, the code needs {sorted(needed)} " \
                             f"({ {n: sorted(f)[:2] for n, f in imports.items()} })"
    if not needed:
        return
    widget = _class(_module_tree(module), f"{module}Widget")
    callers = [n.name for n in widget.body if isinstance(n, ast.FunctionDef)
               and "ensureRequirements(self.resourcePath('requirements.txt')" in ast.unparse(n)]
    assert callers, f"{module}Widget never offers its requirements.txt (SmartBiopsyCore.ensureRequirements)"
    assert all(c.startswith("on") for c in callers), f"offer the install from a button handler only, not {callers}"
    top = [n for n in _module_tree(module).body if not isinstance(n, (ast.ClassDef, ast.FunctionDef))]
    assert "ensureRequirements(" not in "\n".join(ast.unparse(n) for n in top), "never install at import"


def test_install_helper_asks_before_installing():
    tree = _module_tree(CORE)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "ensureRequirements")
    src = ast.unparse(fn)
    assert "slicer.packaging" in src and "pip_ensure" in src and "load_requirements" in src
    ask, install = src.index("confirmOkCancelDisplay"), src.index("slicer.util.pip_install")
    assert ask < install, "ask with confirmOkCancelDisplay before slicer.util.pip_install"


def test_runtime_dependencies_are_exactly_what_the_library_code_imports():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {_canonical(re.split(r"[<>=!~ ;\[]", d)[0]): d for d in project["dependencies"]}
    lib_files = [p for m in ALL_MODULES for p in _lib_files(m)]
    imported = {_canonical(DISTRIBUTION.get(n, n)) for n in _third_party_imports(lib_files)}
    extras = project.get("optional-dependencies", {})
    radiomics = [_canonical(re.split(r"[<>=!~ ;\[]", d)[0]) for d in extras.get("radiomics", [])]
    assert radiomics == ["pyradiomics"] and ">=" in extras["radiomics"][0], "pyradiomics is the radiomics extra"
    optional_extras = {"pyradiomics", "itk-elastix", "highdicom", "fhir-resources"}  # radiomics, elastix, export extras
    assert set(deps) == imported - optional_extras, \
        f"runtime dependencies {sorted(deps)} but the libraries import {sorted(imported - optional_extras)}"
    elastix = [_canonical(re.split(r"[<>=!~ ;\[]", d)[0]) for d in extras.get("elastix", [])]
    assert elastix == ["itk-elastix"], "itk-elastix is the elastix extra"
    assert "vtk" not in deps, "vtk comes with slicer-core's exact pin"
    assert all(">=" in d for d in deps.values()), "every runtime dependency needs a lower bound"
    dev = {_canonical(re.split(r"[<>=!~ ;\[]", d)[0]) for d in extras.get("dev", [])}
    assert "pyigtl" in dev and "pyigtl" not in deps, "pyigtl is used by tests and benchmarks only"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {".".join(p.parent.relative_to(ROOT / m).parts) for m in ALL_MODULES for p in
                (ROOT / m / f"{m}Lib").rglob("__init__.py") if "__pycache__" not in p.parts}
    assert set(setuptools["packages"]) == packages, "pyproject packages must list every Lib package"
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert re.search(r'--no-build-isolation -e "?\.\[[a-z,]*radiomics', boot), "bootstrap installs the radiomics extra"


def test_minimum_slicer_version_is_declared_everywhere_and_tested():
    core = _module_tree(CORE)
    declared = next(ast.literal_eval(n.value) for n in core.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") == "MINIMUM_SLICER_VERSION")
    assert declared == MINIMUM_SLICER
    cmake = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r'if\(Slicer_VERSION VERSION_LESS "([0-9.]+)"\)\s*message\(FATAL_ERROR', cmake)
    assert m and m.group(1) == MINIMUM_SLICER, "CMakeLists.txt must refuse an older Slicer"
    assert f"3D Slicer {MINIMUM_SLICER} or later" in (ROOT / "README.md").read_text()
    assert f"3D Slicer {MINIMUM_SLICER}" in (ROOT / "Docs" / "Developers.md").read_text()
    for module in MODULES:
        assert f"Requires 3D Slicer {MINIMUM_SLICER} or later" in ast.unparse(_class(_module_tree(module), module))
    script = (ROOT / "scripts" / "test-slicer-env.sh").read_text()
    assert f"SLICER_VERSION={MINIMUM_SLICER}\n" in script
    assert f"SLICER_PYTHON={MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]}\n" in script
    assert "scripts/test-slicer-env.sh" in (ROOT / "scripts" / "test.sh").read_text()


def test_code_is_valid_for_the_python_of_the_minimum_slicer():
    """Slicer 5.10 runs Python 3.12: no syntax newer than that (scripts/test-slicer-env.sh runs the suites on it)."""
    for module in ALL_MODULES:
        for rel in _lib_py_files(module):
            path = ROOT / module / rel
            ast.parse(path.read_text(), str(path), feature_version=MINIMUM_PYTHON)


def test_figures_use_the_object_oriented_api_without_global_state():
    """No pyplot and no backend switch: inside Slicer matplotlib's global state belongs to the user."""
    bad = []
    for module in ALL_MODULES:
        for path in [ROOT / module / f"{module}.py", *_lib_files(module)]:
            names = _imports_of(path)
            if any(n.startswith(("matplotlib.pyplot", "pylab")) for n in names):
                bad.append(f"{path.relative_to(ROOT)} imports pyplot")
            src = path.read_text()
            if re.search(r"matplotlib\.use\(|\.use\(\s*['\"]\w+['\"]|\bplt\.|rcParams\[", src):
                bad.append(f"{path.relative_to(ROOT)} changes matplotlib's global state")
    assert not bad, "\n".join(bad)


def test_needle_choices_match_the_needle_catalogue():
    from TrajectoryPlannerLib.planning.needles import DEFAULT_NEEDLE, needle_names

    for module in ("SmartBiopsy", "TrajectoryPlanner"):
        tree = _module_tree(module)
        choices = next(ast.literal_eval(n.value) for n in tree.body
                       if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "NEEDLES")
        assert sorted(choices) == sorted(needle_names()), f"{module}.NEEDLES differs from the needle catalogue"
        default = ast.unparse(_parameter_fields(module)["needleModel"])
        assert "NEEDLES" in default
        assert DEFAULT_NEEDLE in (ROOT / module / f"{module}.py").read_text()


def test_user_pages_state_units_and_definitions():
    text = {m: (ROOT / "Docs" / f"{m}.md").read_text() for m in MODULES}
    assert "100·(post − pre)/pre" in text["SmartBiopsy"] or "100 (post - pre) / pre" in text["SmartBiopsy"]
    for m, t in text.items():
        assert "RAS" in t and "mm" in t, f"Docs/{m}.md does not state the coordinate frame and units"
    assert "10⁻⁶ mm²/s" in text["SmartBiopsy"] and "%" in text["SmartBiopsy"]
    assert "STOP" in text["TrajectoryPlanner"] and "EMERGENCY" in text["TrajectoryPlanner"]


# ----------------------------------------------------------------------------------------------- layering
def _imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use the absolute package name)"
            names.add(node.module or "")
    return names


def _lib_files(module: str):
    return sorted(p for p in (ROOT / module / f"{module}Lib").rglob("*.py") if "__pycache__" not in p.parts)


def test_core_is_a_hidden_library_module_and_every_panel_module_depends_on_it():
    core = ast.unparse(_class(_module_tree(CORE), CORE))
    assert "self.parent.hidden = True" in core
    for module in MODULES:
        init = ast.unparse(_class(_module_tree(module), module))
        assert re.search(r"self\.parent\.dependencies = \[[^\]]*'SmartBiopsyCore'", init), \
            f"{module} must list SmartBiopsyCore in its dependencies"


def test_capability_libs_share_only_the_core():
    """RegistrationFusionLib and TrajectoryPlannerLib import only the core; the core imports no capability."""
    rules = {CORE: {"SmartBiopsyLib", "RegistrationFusionLib", "TrajectoryPlannerLib"},
             "RegistrationFusion": {"SmartBiopsyLib", "TrajectoryPlannerLib"},
             "TrajectoryPlanner": {"SmartBiopsyLib", "RegistrationFusionLib"}}
    bad = []
    for module, forbidden in rules.items():
        for path in _lib_files(module):
            for name in _imports_of(path):
                if name.split(".")[0] in forbidden:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_only_the_command_line_imports_command_modules():
    bad = []
    for module in ALL_MODULES:
        for path in [ROOT / module / f"{module}.py", *_lib_files(module)]:
            in_cli = "cli" in path.relative_to(ROOT / module).parts
            for name in _imports_of(path):
                if name.startswith("SmartBiopsyLib.cli") and not in_cli:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
                if in_cli and path.name.startswith("cmd_") and re.match(r"SmartBiopsyLib\.cli\.cmd_", name):
                    bad.append(f"{path.relative_to(ROOT)} imports another command module {name}")
    assert not bad, "\n".join(bad)


def test_every_lib_package_says_what_lives_there():
    for module in ALL_MODULES:
        for init in (ROOT / module / f"{module}Lib").rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc.strip()) > 30, f"{init.relative_to(ROOT)} has no docstring saying what lives there"


def test_no_sys_path_edits_in_library_code():
    for module in ALL_MODULES:
        for path in _lib_files(module):
            src = path.read_text()
            assert not re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=", src), \
                f"{path.relative_to(ROOT)} edits sys.path"


def test_panel_logic_in_the_libs_is_mrml_glue_only():
    """<Module>Lib/logic.py (what each widget calls) takes the scene explicitly: no application singletons, no Qt."""
    for module in MODULES:
        path = ROOT / module / f"{module}Lib" / "logic.py"
        assert path.is_file(), f"{module}Lib/logic.py missing: the panel's logic belongs in the Lib"
        tree = ast.parse(path.read_text(), str(path))
        used = {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        for forbidden in ("slicer.app", "slicer.mrmlScene", "slicer.modules", "slicer.util"):
            assert not any(u == forbidden or u.startswith(forbidden + ".") for u in used), \
                f"{path.relative_to(ROOT)} uses {forbidden}"
        assert not {"qt", "ctk", "slicer.util"} & {i.split(".")[0] if i != "slicer.util" else i for i in _imports_of(path)}, \
            f"{path.relative_to(ROOT)} imports Qt/CTK/slicer.util"
        logic_cls = ast.unparse(_class(_module_tree(module), f"{module}Logic"))
        assert f"{module}Lib" in logic_cls and "logic" in logic_cls, f"{module}Logic does not call {module}Lib.logic"
