"""Regenerate each module's CMakeLists.txt script and resource lists from the files on disk.

Run after adding or removing a .py file in a module or its Lib; Testing/core/test_extension_static.py fails
when the lists and the files disagree.
"""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
for m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion", "TrajectoryPlanner"):
    folder = ROOT / m
    py = sorted(str(p.relative_to(folder)) for p in (folder / f"{m}Lib").rglob("*.py") if "__pycache__" not in p.parts and not p.name.startswith("."))
    data = sorted(str(p.relative_to(folder)) for p in (folder / f"{m}Lib").rglob("*")
                  if p.is_file() and p.suffix in (".yaml", ".yml", ".json", ".csv", ".txt") and "__pycache__" not in p.parts)
    # the hidden library module (SmartBiopsyCore) has no panel: no icon, no .ui
    res = [r for r in (f"Resources/Icons/${{MODULE_NAME}}.png", f"Resources/UI/${{MODULE_NAME}}.ui")
           if (folder / r.replace("${MODULE_NAME}", m)).exists()]
    if (folder / "Resources" / "requirements.txt").exists():
        res.append("Resources/requirements.txt")
    res += [d.replace(f"{m}Lib", "${MODULE_NAME}Lib", 1) for d in data]
    scripts = ["${MODULE_NAME}.py"] + [p.replace(f"{m}Lib", "${MODULE_NAME}Lib", 1) for p in py]
    text = f"""#-----------------------------------------------------------------------------
set(MODULE_NAME {m})

#-----------------------------------------------------------------------------
# Every .py of the module and its Lib (Testing/core/test_extension_static.py fails when one is missing)
set(MODULE_PYTHON_SCRIPTS
""" + "".join(f"  {s}\n" for s in scripts) + """  )

set(MODULE_PYTHON_RESOURCES
""" + "".join(f"  {r}\n" for r in res) + """  )

#-----------------------------------------------------------------------------
slicerMacroBuildScriptedModule(
  NAME ${MODULE_NAME}
  SCRIPTS ${MODULE_PYTHON_SCRIPTS}
  RESOURCES ${MODULE_PYTHON_RESOURCES}
  WITH_GENERIC_TESTS
  )

#-----------------------------------------------------------------------------
if(BUILD_TESTING)
  # Register the unittest subclass in the main script as a ctest.
  # Note that the test will also be available at runtime.
  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)
endif()
"""
    (folder / "CMakeLists.txt").write_text(text)
    print(m, len(scripts), "scripts", len(res), "resources")
