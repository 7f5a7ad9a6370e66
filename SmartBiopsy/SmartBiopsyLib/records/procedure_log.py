"""Procedure log of a multiregional CT-guided biopsy: dose, timing, needle manipulations, adverse events.

- Dose: dose-length product (DLP) per CT acquisition in mGy*cm as shown on the scanner's dose report, and
  the total.
- Timing: minutes from the planning topogram (scout) to the final CT acquisition; the procedure window
  (default 60 minutes) is flagged when exceeded.
- Needle manipulations: count of needle repositionings per target region (A, B, C).
- Adverse events: CTCAE term and grade 1-5 (grade 5 = death related to the event).

Times are ISO 8601 with a time zone, stored in UTC. The log is a dataclass with ``to_dict()`` /
``from_dict()``; :meth:`SpecimenJournal.append_procedure` stores it durably in the specimen journal.
No ``slicer`` import.
"""
from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import asdict, dataclass, field
from typing import Mapping

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.records.specimen_journal import REGIONS, _finite, _text, parse_utc

logger = logging.getLogger(__name__)

#: A single CT acquisition above this DLP is almost certainly a unit mistake (uGy*m, mGy*mm) or a typo.
MAX_PLAUSIBLE_DLP_MGY_CM = 10000.0
DEFAULT_WINDOW_MIN = 60.0
CTCAE_GRADES = (1, 2, 3, 4, 5)


def _t(value: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclass
class ScanRecord:
    """One CT acquisition: label (e.g. 'planning', 'confirmation A'), ISO 8601 UTC time, DLP in mGy*cm."""

    label: str
    time_utc: str
    dlp_mgy_cm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdverseEvent:
    """An adverse event graded with CTCAE (term as in CTCAE, e.g. 'Hemorrhage' / 'Pain'; grade 1-5)."""

    term: str
    grade: int
    time_utc: str = ""
    attribution: str = ""
    notes: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProcedureLog:
    """Record of one biopsy procedure (see module docstring for units).

    ``planning_topogram_utc`` is when the planning topogram was acquired; the elapsed time runs to the last
    scan in ``scans``. ``window_min`` is the allowed procedure window in minutes.
    """

    participant_id: str = ""
    planning_topogram_utc: str = ""
    scans: list = field(default_factory=list)
    manipulations: dict = field(default_factory=lambda: {r: 0 for r in REGIONS})
    adverse_events: list = field(default_factory=list)
    window_min: float = DEFAULT_WINDOW_MIN
    operator: str = ""

    def __post_init__(self):
        self.participant_id = _text(self.participant_id, "participant ID", required=False, max_len=200)
        self.operator = _text(self.operator, "operator", required=False, max_len=200)
        if self.planning_topogram_utc:
            self.planning_topogram_utc = parse_utc(self.planning_topogram_utc, "planning topogram time")
        w = _finite(self.window_min, "procedure window")
        if w <= 0:
            raise InputDataError(f"procedure window {self.window_min!r} min must be positive (default 60).")
        self.window_min = w

    # -- entries
    def set_planning_topogram(self, time_utc) -> None:
        """Set the planning-topogram time (ISO 8601 with zone). Scans recorded earlier than it are rejected."""
        t = parse_utc(time_utc, "planning topogram time")
        if self.scans and any(_t(s.time_utc) < _t(t) for s in self.scans):
            raise InputDataError("the planning topogram must precede every recorded scan; check the times.")
        self.planning_topogram_utc = t

    def add_scan(self, label: str, time_utc, dlp_mgy_cm) -> ScanRecord:
        """Record one CT acquisition with its DLP (mGy*cm, from the scanner dose report)."""
        label = _text(label, "scan label", max_len=200)
        t = parse_utc(time_utc, f"time of scan '{label}'")
        dlp = _finite(dlp_mgy_cm, f"DLP of scan '{label}'")
        if dlp < 0:
            raise InputDataError(f"DLP of scan '{label}' is negative ({dlp}); copy it from the dose report.")
        if dlp > MAX_PLAUSIBLE_DLP_MGY_CM:
            raise InputDataError(
                f"DLP of scan '{label}' is {dlp:g} mGy*cm, implausibly high for one acquisition; check the unit "
                f"(mGy*cm expected, not uGy*m or mGy*mm)."
            )
        if self.planning_topogram_utc and _t(t) < _t(self.planning_topogram_utc):
            raise InputDataError(f"scan '{label}' at {t} is before the planning topogram ({self.planning_topogram_utc}); check the times.")
        rec = ScanRecord(label=label, time_utc=t, dlp_mgy_cm=dlp)
        self.scans.append(rec)
        self.scans.sort(key=lambda s: _t(s.time_utc))
        return rec

    def add_manipulation(self, region: str, count: int = 1) -> int:
        """Count needle manipulations (repositionings) for region A/B/C; returns the region's new total."""
        r = region.strip().upper() if isinstance(region, str) else region
        if r not in REGIONS:
            raise InputDataError(f"region {region!r} is unknown; use A, B or C.")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InputDataError(f"manipulation count {count!r} must be a whole number of at least 1.")
        self.manipulations[r] = int(self.manipulations.get(r, 0)) + count
        return self.manipulations[r]

    def add_adverse_event(self, term: str, grade, time_utc=None, attribution: str = "", notes: str = "") -> AdverseEvent:
        """Record a CTCAE adverse event; grade must be an integer 1-5."""
        term = _text(term, "adverse event term", max_len=200)
        if isinstance(grade, bool):
            raise InputDataError(f"CTCAE grade of '{term}' must be 1-5, got {grade!r}.")
        try:
            g = float(grade)
        except (TypeError, ValueError):
            raise InputDataError(f"CTCAE grade of '{term}' must be 1-5, got {grade!r}.") from None
        if g != int(g) or int(g) not in CTCAE_GRADES:
            raise InputDataError(f"CTCAE grade of '{term}' must be a whole number 1-5, got {grade!r}.")
        ev = AdverseEvent(term=term, grade=int(g),
                          time_utc=parse_utc(time_utc, f"time of adverse event '{term}'") if time_utc else "",
                          attribution=_text(attribution, "attribution", required=False, max_len=200),
                          notes=_text(notes, "notes", required=False))
        self.adverse_events.append(ev)
        if ev.grade >= 3:
            logger.warning("CTCAE grade %d adverse event recorded: %s", ev.grade, term)
        return ev

    # -- derived
    @property
    def total_dlp_mgy_cm(self) -> float:
        return float(sum(s.dlp_mgy_cm for s in self.scans))

    @property
    def elapsed_min(self) -> float | None:
        """Minutes from the planning topogram to the last scan; None if either is missing."""
        if not self.planning_topogram_utc or not self.scans:
            return None
        return (_t(self.scans[-1].time_utc) - _t(self.planning_topogram_utc)).total_seconds() / 60.0

    @property
    def window_exceeded(self) -> bool | None:
        """True when the elapsed time exceeds the window; None if it cannot be computed yet."""
        e = self.elapsed_min
        return None if e is None else e > self.window_min

    @property
    def total_manipulations(self) -> int:
        return int(sum(self.manipulations.values()))

    def to_dict(self) -> dict:
        return {
            "participant_id": self.participant_id,
            "operator": self.operator,
            "planning_topogram_utc": self.planning_topogram_utc,
            "scans": [s.to_dict() for s in self.scans],
            "total_dlp_mgy_cm": self.total_dlp_mgy_cm,
            "elapsed_min": self.elapsed_min,
            "window_min": self.window_min,
            "window_exceeded": self.window_exceeded,
            "manipulations": dict(self.manipulations),
            "total_manipulations": self.total_manipulations,
            "adverse_events": [a.to_dict() for a in self.adverse_events],
            "max_ctcae_grade": max((a.grade for a in self.adverse_events), default=0),
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ProcedureLog":
        """Rebuild (and re-validate) a log from :meth:`to_dict` output; derived fields are recomputed."""
        if not isinstance(d, Mapping):
            raise InputDataError("a procedure log must be a mapping of field names to values.")
        log = cls(participant_id=d.get("participant_id", ""), planning_topogram_utc=d.get("planning_topogram_utc", ""),
                  window_min=d.get("window_min", DEFAULT_WINDOW_MIN), operator=d.get("operator", ""))
        for s in d.get("scans", []) or []:
            if not isinstance(s, Mapping):
                raise InputDataError("each scan in the procedure log must be a mapping (label, time_utc, dlp_mgy_cm).")
            log.add_scan(s.get("label"), s.get("time_utc"), s.get("dlp_mgy_cm"))
        man = d.get("manipulations", {}) or {}
        if not isinstance(man, Mapping):
            raise InputDataError("needle manipulations must map region (A/B/C) to a count.")
        for r, n in man.items():
            if n:
                log.add_manipulation(r, n)
        for a in d.get("adverse_events", []) or []:
            if not isinstance(a, Mapping):
                raise InputDataError("each adverse event must be a mapping (term, grade, ...).")
            log.add_adverse_event(a.get("term"), a.get("grade"), a.get("time_utc") or None,
                                  a.get("attribution", ""), a.get("notes", ""))
        return log
