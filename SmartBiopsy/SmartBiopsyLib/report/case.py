"""The case folder as the report reads it: every JSON/CSV/NRRD artefact, loaded leniently (a missing or
unreadable file becomes None), and the section titles with the workflow stages they depend on."""

from __future__ import annotations

from pathlib import Path
import csv
import json

import numpy as np

from SmartBiopsyLib.report.figures import apply_matrix


#: Section headings, in order (tests look for them).
SECTION_TITLES = (
    "1 Case and procedure summary",
    "2 Fusion QA",
    "3 Habitat map and targets",
    "4 Trajectories on CT",
    "5 Notch ROIs and values",
    "6 Specimens",
    "7 Procedure summary",
    "8 Heterogeneity",
)


#: Which workflow stage produces each kind of artefact: a stage matches when its name (lower case)
#: contains one of the keywords.
SECTION_STAGE_KEYWORDS = {
    "inputs": ("load", "input", "phantom"),
    "fusion": ("regist", "fus"),
    "characterisation": ("character", "habitat", "map", "target"),
    "plan": ("plan", "trajector"),
    "robot": ("robot", "guid", "session"),
    "sampling": ("sampl", "needle", "notch", "confirm"),
    "specimens": ("specimen", "record", "patholog"),
}


class CaseFolder:
    """Lazy, tolerant access to a case output folder; remembers why an artefact could not be read."""

    def __init__(self, out_dir: Path):
        self.root = Path(out_dir)
        self.problems: dict[str, str] = {}
        self._cache: dict = {}
        self.summary = self.json("summary.json") or {}
        stages = self.summary.get("stages") if isinstance(self.summary, dict) else None
        self.stages = [s for s in (stages or []) if isinstance(s, dict)]

    # readers ----------------------------------------------------------------------------------
    def json(self, rel):
        key = ("json", rel)
        if key not in self._cache:
            p = self.root / rel
            data = None
            if p.is_file():
                try:
                    data = json.loads(p.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    self.problems[rel] = f"{rel} could not be read ({exc})"
            self._cache[key] = data
        return self._cache[key]

    def csv(self, rel):
        key = ("csv", rel)
        if key not in self._cache:
            p = self.root / rel
            rows = None
            if p.is_file():
                try:
                    with p.open(newline="", encoding="utf-8-sig") as fh:
                        rows = list(csv.DictReader(fh))
                except (OSError, csv.Error, UnicodeDecodeError) as exc:
                    self.problems[rel] = f"{rel} could not be read ({exc})"
            self._cache[key] = rows
        return self._cache[key]

    def volume(self, rel):
        key = ("vol", rel)
        if key not in self._cache:
            p = self.root / rel
            vol = None
            if p.is_file():
                try:
                    from SmartBiopsyCoreLib.dataio.imageio import load_image

                    vol = load_image(p)
                except Exception as exc:  # noqa: BLE001 - report, never fail
                    self.problems[rel] = f"{rel} could not be read ({exc})"
            self._cache[key] = vol
        return self._cache[key]

    # stages -----------------------------------------------------------------------------------
    def stage_for(self, kind: str):
        keys = SECTION_STAGE_KEYWORDS.get(kind, (kind,))
        for s in self.stages:
            name = str(s.get("name", "")).lower()
            if any(k in name for k in keys):
                return s
        return None

    def first_failed(self):
        return next((s for s in self.stages if s.get("status") == "failed"), None)

    def why(self, kind: str, rel: str) -> str:
        """The 'not available (...)' sentence for artefact ``rel`` produced by stage kind ``kind``."""
        if rel in self.problems:
            return f"not available ({self.problems[rel]})"
        st = self.stage_for(kind)
        failed = self.first_failed()
        if st is None:
            if failed is not None:
                return (f"not available (step {failed.get('name')} did not finish: {failed.get('message') or 'failed'}"
                        f"; {rel} was not produced)")
            return f"not available ({rel} was not produced)"
        name, status, msg = st.get("name"), st.get("status"), (st.get("message") or "").strip()
        if status == "done":
            return f"not available (step {name} finished but {rel} is missing)"
        if status == "skipped" and not msg and failed is not None:
            msg = f"skipped because step {failed.get('name')} failed: {failed.get('message') or 'failed'}"
        return f"not available (step {name} did not finish: {msg or status or 'not run'})"

    # derived ----------------------------------------------------------------------------------
    def mri_to_ct(self):
        fusion = self.json("registration/fusion.json")
        if isinstance(fusion, dict) and fusion.get("matrix_mri_to_ct_ras") is not None:
            m = np.asarray(fusion["matrix_mri_to_ct_ras"], float)
            if m.shape == (4, 4) and np.all(np.isfinite(m)):
                return m
        return None

    def targets(self) -> list:
        t = self.json("characterisation/targets.json")
        if isinstance(t, dict) and isinstance(t.get("targets"), list):
            return [x for x in t["targets"] if isinstance(x, dict)]
        return []

    def target_mri(self, t):
        """A target's MRI-world point: ``point_ras``, else ``point_ct_ras`` taken back through the fusion."""
        if t.get("point_ras") is not None:
            return np.asarray(t["point_ras"], float)
        m = self.mri_to_ct()
        if m is not None and t.get("point_ct_ras") is not None:
            return apply_matrix(np.linalg.inv(m), t["point_ct_ras"])[0]
        return None

    def target_ct(self, t):
        if t.get("point_ct_ras") is not None:
            return np.asarray(t["point_ct_ras"], float)
        m = self.mri_to_ct()
        if m is not None and t.get("point_ras") is not None:
            return apply_matrix(m, t["point_ras"])[0]
        return None

    def sampling_dirs(self) -> list[Path]:
        d = self.root / "sampling"
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if p.is_dir())
