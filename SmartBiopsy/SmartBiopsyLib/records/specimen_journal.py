"""Specimen chain of custody: an append-only, crash-safe journal of biopsy cores and their pathology.

One :class:`SpecimenRecord` per core (specimen pot). Everything that happens to the record set is an *event*
appended as one line of a JSON Lines file; nothing already written is ever rewritten, corrections are new
events. The current state (specimens, latest pathology per pot, procedure log) is replayed from the journal
and mirrored in an atomically replaced snapshot file for quick reading.

Files (for journal ``specimens.jsonl``):
- ``specimens.jsonl`` - the journal, the only source of truth. Each line is canonical JSON
  ``{"event": {...}, "kind": ..., "seq": n, "sha256": ...}`` where ``sha256`` is the SHA-256 of the same
  object's canonical JSON without the ``sha256`` key (sorted keys, no spaces, UTF-8). ``seq`` counts from 1
  without gaps.
- ``specimens.snapshot.json`` - current state, rewritten atomically (temp file, fsync, ``os.replace``,
  directory fsync) after each append; derived, never read back as truth.
- ``specimens.jsonl.torn`` - bytes of an unacknowledged, torn last line cut off before the next append
  (kept for audit).

Durability: :meth:`SpecimenJournal.append_specimen` (and the other append methods) return only after the
line was written with one ``write`` on an ``O_APPEND`` descriptor and ``os.fsync``-ed (and the directory
fsync-ed when the file was created). A process killed at any moment therefore loses no acknowledged event;
at most the one line being written is torn. On reading, a torn *last* line (no newline, bad JSON or bad
checksum) is ignored with a warning; damage anywhere else raises :class:`JournalCorruptError`.

Single writer: appends take an exclusive ``fcntl`` lock where available (POSIX); on other systems only one
process may write a journal at a time.

Units and frames: needle tip in Slicer RAS millimetres, direction a unit RAS vector (tip-ward); times ISO 8601
UTC; map values in the map's units (ADC 1e-6 mm^2/s, FF/EF percent); volumes mm^3; Ki-67 percent.
"""
from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from SmartBiopsyCoreLib.errors import InputDataError, SmartBiopsyError

try:  # POSIX only; Slicer on Windows runs without the advisory lock
    import fcntl as _fcntl
except ImportError:  # pragma: no cover
    _fcntl = None

logger = logging.getLogger(__name__)

REGIONS = ("A", "B", "C")
MAP_VALUE_KEYS = ("mean", "median", "min", "sd", "n_voxels", "volume_mm3")
POT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,63}$")
MAP_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
JOURNAL_FORMAT = "smartbiopsy-specimen-journal/1"

#: Pathology value limits. Ki-67 labelling index in percent; FNCLCC grade 1-3. NSR: the sarcoma study's
#: exact definition could not be verified here, so it is stored as reported (a non-negative number, the
#: ratio's own scale) with an upper bound that only catches unit or typing mistakes.
PATHOLOGY_FIELDS = {
    "ki67_percent": (0.0, 100.0),
    "nsr": (0.0, 1000.0),
    "fnclcc_grade": (1, 3),
}


class JournalCorruptError(SmartBiopsyError):
    """The journal is damaged somewhere other than a torn last line (never repaired silently)."""


# ----------------------------------------------------------------------------------------------- helpers

def _json_default(obj):
    """Accept numpy scalars/arrays and result dataclasses (``to_dict``) inside records (e.g. notch ROI corners)."""
    for attr in ("to_dict", "tolist", "item"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    raise TypeError(f"{type(obj).__name__} cannot be stored in the journal")


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)


def _checksum(obj_without_sum: dict) -> str:
    return hashlib.sha256(_canonical(obj_without_sum).encode("utf-8")).hexdigest()


def utc_now_iso() -> str:
    """Current time as ISO 8601 UTC with a trailing Z, millisecond precision."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_utc(value, what: str = "time") -> str:
    """Validate an ISO 8601 time with a time zone and return it normalised to UTC ('...Z').

    Naive times (no zone) are rejected: a chain-of-custody time must be unambiguous.
    """
    if isinstance(value, _dt.datetime):
        t = value
    else:
        if not isinstance(value, str) or not value.strip():
            raise InputDataError(f"{what} is missing; give an ISO 8601 UTC time such as 2024-05-01T09:30:00Z.")
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            t = _dt.datetime.fromisoformat(text)
        except ValueError:
            raise InputDataError(f"{what} {value!r} is not an ISO 8601 time; use e.g. 2024-05-01T09:30:00Z.") from None
    if t.tzinfo is None or t.utcoffset() is None:
        raise InputDataError(f"{what} {value!r} has no time zone; add 'Z' for UTC (e.g. 2024-05-01T09:30:00Z).")
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _finite(value, what: str) -> float:
    if isinstance(value, bool):
        raise InputDataError(f"{what} is a yes/no value, not a number.")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputDataError(f"{what} ({value!r}) is not a number.") from None
    if not math.isfinite(f):
        raise InputDataError(f"{what} is {value!r}; a finite number is required.")
    return f


def _vec3(value, what: str) -> list:
    try:
        items = list(value)
    except TypeError:
        raise InputDataError(f"{what} must be three numbers (R, A, S), got {value!r}.") from None
    if len(items) != 3:
        raise InputDataError(f"{what} must have three components (R, A, S), got {len(items)}.")
    return [_finite(v, f"{what} component {i}") for i, v in enumerate(items)]


def _text(value, what: str, required: bool = True, max_len: int = 2000) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputDataError(f"{what} must be text, got {type(value).__name__}.")
    v = value.strip()
    if required and not v:
        raise InputDataError(f"{what} is empty; fill it in.")
    if len(v) > max_len:
        raise InputDataError(f"{what} is longer than {max_len} characters; shorten it.")
    if any(ord(c) < 32 and c not in "\t\n" for c in v):
        raise InputDataError(f"{what} contains control characters; retype it.")
    return v


def validate_pot_id(pot_id) -> str:
    """Pot ID as printed on the specimen pot: 1-64 characters, letters/digits then also . _ / -."""
    if not isinstance(pot_id, str) or not POT_ID_PATTERN.match(pot_id.strip()):
        raise InputDataError(
            f"pot ID {pot_id!r} is not valid; use the label on the pot (letters, digits, '.', '_', '/', '-', up to 64 characters)."
        )
    return pot_id.strip()


# ----------------------------------------------------------------------------------------------- records

@dataclass
class MapValues:
    """Statistics of one co-registered map inside the notch ROI (units of the map; volume in mm^3)."""

    mean: float
    median: float
    min: float
    sd: float
    n_voxels: int
    volume_mm3: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_any(cls, value, map_name: str) -> "MapValues":
        """Validate a dict (or MapValues / object with these attributes) and return MapValues."""
        if isinstance(value, MapValues):
            value = value.to_dict()
        elif not isinstance(value, Mapping):
            if all(hasattr(value, k) for k in MAP_VALUE_KEYS):
                value = {k: getattr(value, k) for k in MAP_VALUE_KEYS}
            else:
                raise InputDataError(
                    f"values for map '{map_name}' must give {', '.join(MAP_VALUE_KEYS)}; got {type(value).__name__}."
                )
        missing = [k for k in MAP_VALUE_KEYS if k not in value]
        if missing:
            raise InputDataError(f"values for map '{map_name}' lack {', '.join(missing)}; re-run the notch measurement.")
        extra = sorted(set(value) - set(MAP_VALUE_KEYS))
        if extra:
            raise InputDataError(f"values for map '{map_name}' have unknown fields {', '.join(extra)}; remove them.")
        f = {k: _finite(value[k], f"{map_name} {k}") for k in ("mean", "median", "min", "sd", "volume_mm3")}
        nv = value["n_voxels"]
        if isinstance(nv, bool) or _finite(nv, f"{map_name} n_voxels") != int(_finite(nv, f"{map_name} n_voxels")):
            raise InputDataError(f"{map_name} n_voxels ({nv!r}) must be a whole number.")
        nv = int(nv)
        if nv < 1:
            raise InputDataError(
                f"map '{map_name}' has no voxels in the notch ROI; check that the map covers the biopsy site before recording."
            )
        if f["sd"] < 0:
            raise InputDataError(f"{map_name} sd is negative ({f['sd']}); a standard deviation cannot be negative.")
        if f["volume_mm3"] <= 0:
            raise InputDataError(f"{map_name} volume_mm3 must be positive, got {f['volume_mm3']}.")
        tol = 1e-9 * max(1.0, abs(f["min"]))
        if f["mean"] < f["min"] - tol or f["median"] < f["min"] - tol:
            raise InputDataError(
                f"{map_name} minimum ({f['min']}) exceeds its mean or median; the values are inconsistent, re-measure."
            )
        return cls(mean=f["mean"], median=f["median"], min=f["min"], sd=f["sd"], n_voxels=nv, volume_mm3=f["volume_mm3"])


def values_from_notch(notch_values) -> dict:
    """Map statistics of a :class:`SmartBiopsyLib.sampling.notch.NotchValues` as the {map: MapValues} of a specimen record.

    ``n_voxels`` is the number of map voxels the notch ROI touches (partial-volume weights are in the notch
    record itself); ``volume_mm3`` the effective sampled volume.
    """
    maps = getattr(notch_values, "maps", None)
    if not maps:
        raise InputDataError("the notch has no map values; sample the maps in the notch first")
    return {name: MapValues(mean=float(st.mean), median=float(st.median), min=float(st.min), sd=float(st.sd),
                            n_voxels=int(st.voxels_touched), volume_mm3=float(st.volume_mm3))
            for name, st in maps.items()}


@dataclass
class SpecimenRecord:
    """One biopsy core in its specimen pot.

    ``needle_tip_ras`` mm in Slicer RAS; ``needle_direction_ras`` unit vector pointing from entry toward tip;
    ``notch_roi`` a JSON-serialisable description of the sampled region (mode, size in mm, corners, ...);
    ``values`` map name -> :class:`MapValues`; ``time_utc`` ISO 8601 UTC.
    """

    pot_id: str
    region: str
    target_name: str
    needle_tip_ras: list
    needle_direction_ras: list
    notch_roi: dict
    values: dict
    operator: str
    time_utc: str = ""
    participant_id: str = ""
    notes: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = {k: (v.to_dict() if isinstance(v, MapValues) else dict(v)) for k, v in self.values.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "SpecimenRecord":
        if not isinstance(d, Mapping):
            raise InputDataError("a specimen record must be a mapping of field names to values.")
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(d) - known)
        if extra:
            raise InputDataError(f"specimen record has unknown fields {', '.join(extra)}; remove them.")
        try:
            rec = cls(**dict(d))
        except TypeError as exc:
            raise InputDataError(f"specimen record is incomplete ({exc}); supply every required field.") from None
        return rec.validated()

    def validated(self) -> "SpecimenRecord":
        """Return a normalised copy or raise InputDataError saying what to fix."""
        pot = validate_pot_id(self.pot_id)
        region = self.region.strip().upper() if isinstance(self.region, str) else self.region
        if region not in REGIONS:
            raise InputDataError(f"region {self.region!r} of pot {pot} is unknown; use A, B or C.")
        direction = _vec3(self.needle_direction_ras, "needle direction")
        norm = math.sqrt(sum(c * c for c in direction))
        if norm < 1e-9:
            raise InputDataError("needle direction is a zero vector; record the needle axis from the confirmation CT.")
        direction = [c / norm for c in direction]
        if not isinstance(self.notch_roi, Mapping):
            raise InputDataError("notch ROI description must be a mapping (e.g. mode, length_mm, width_mm).")
        try:
            notch = json.loads(_canonical(dict(self.notch_roi)))
        except (TypeError, ValueError):
            raise InputDataError("notch ROI description contains values that cannot be stored (non-finite numbers or objects).") from None
        if not isinstance(self.values, Mapping) or not self.values:
            raise InputDataError(f"pot {pot} has no map values; measure the notch ROI before recording the specimen.")
        values = {}
        for name, v in self.values.items():
            if not isinstance(name, str) or not MAP_NAME_PATTERN.match(name):
                raise InputDataError(f"map name {name!r} is not valid; use a short name such as adc, ff or ef.")
            values[name] = MapValues.from_any(v, name)
        return SpecimenRecord(
            pot_id=pot, region=region,
            target_name=_text(self.target_name, "target name", max_len=200),
            needle_tip_ras=_vec3(self.needle_tip_ras, "needle tip"),
            needle_direction_ras=direction, notch_roi=notch, values=values,
            operator=_text(self.operator, "operator", max_len=200),
            time_utc=parse_utc(self.time_utc, "specimen time") if self.time_utc else utc_now_iso(),
            participant_id=_text(self.participant_id, "participant ID", required=False, max_len=200),
            notes=_text(self.notes, "notes", required=False),
        )


@dataclass
class PathologyResult:
    """Pathology of one pot: Ki-67 labelling index (percent), NSR (as reported), FNCLCC grade (1-3).

    Fields not reported are None. ``source`` names the imported file; ``seq`` the journal event holding it.
    """

    pot_id: str
    ki67_percent: float | None = None
    nsr: float | None = None
    fnclcc_grade: int | None = None
    source: str = ""
    seq: int = 0
    time_utc: str = ""
    corrects_seq: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JournalEvent:
    seq: int
    kind: str
    event: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class JournalState:
    """Current state replayed from the journal."""

    specimens: dict = field(default_factory=dict)      # pot_id -> SpecimenRecord
    pathology: dict = field(default_factory=dict)      # pot_id -> PathologyResult (latest)
    pathology_history: dict = field(default_factory=dict)  # pot_id -> [PathologyResult, ...]
    procedure: dict | None = None                      # latest procedure-log dict
    last_seq: int = 0
    last_sha256: str = ""
    torn_tail: bool = False
    record_dicts: dict = field(default_factory=dict, repr=False)  # pot_id -> stored dict (records never change)

    def to_dict(self) -> dict:
        return {
            "format": JOURNAL_FORMAT,
            "last_seq": self.last_seq,
            "last_sha256": self.last_sha256,
            "specimens": {k: self.record_dicts.get(k) or v.to_dict() for k, v in self.specimens.items()},
            "pathology": {k: v.to_dict() for k, v in self.pathology.items()},
            "pathology_history": {k: [p.to_dict() for p in v] for k, v in self.pathology_history.items()},
            "procedure": self.procedure,
        }


@dataclass
class ImportReport:
    """Outcome of a pathology import: pots newly reported, corrected, unchanged, and the journal event."""

    source: str
    added: list = field(default_factory=list)
    corrected: list = field(default_factory=list)
    unchanged: list = field(default_factory=list)
    seq: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- reading

def read_events(path, warn: bool = True) -> tuple[list[JournalEvent], bool, int]:
    """Parse a journal file. Returns (events, torn_tail, byte offset where valid data ends).

    A torn last line is reported (warning) and excluded; any other damage raises JournalCorruptError.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return [], False, 0
    except OSError as exc:
        raise InputDataError(f"cannot read the specimen journal {p} ({exc.strerror}); check the path and permissions.") from None
    events: list[JournalEvent] = []
    pos = 0
    valid_end = 0
    torn = False
    lineno = 0
    n = len(data)
    while pos < n:
        nl = data.find(b"\n", pos)
        end = n if nl < 0 else nl
        raw = data[pos:end]
        lineno += 1
        is_last = nl < 0 or nl + 1 >= n
        ok, ev, why = _parse_line(raw, expected_seq=len(events) + 1)
        if ok and nl < 0:
            why = "no line end"
        if ok and nl >= 0:
            events.append(ev)
            pos = nl + 1
            valid_end = pos
            continue
        if is_last and not why.startswith("sequence"):
            torn = True
            if warn:
                logger.warning(
                    "specimen journal %s: last line %d is incomplete (%s), ignored; it was never acknowledged",
                    p, lineno, why,
                )
            break
        raise JournalCorruptError(
            f"the specimen journal {p} is damaged at line {lineno} ({why}); keep the file and restore it from backup, do not edit it."
        )
    return events, torn, valid_end


def _parse_line(raw: bytes, expected_seq: int):
    if not raw.strip():
        return False, None, "empty line"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False, None, "not valid JSON"
    if not isinstance(obj, dict) or "sha256" not in obj:
        return False, None, "no checksum"
    sha = obj.pop("sha256")
    try:
        if _checksum(obj) != sha:
            return False, None, "checksum mismatch"
    except ValueError:
        return False, None, "unstorable values"
    seq = obj.get("seq")
    if seq != expected_seq:
        return False, None, f"sequence number {seq} where {expected_seq} was expected"
    if not isinstance(obj.get("kind"), str) or not isinstance(obj.get("event"), dict):
        return False, None, "malformed event"
    return True, JournalEvent(seq=seq, kind=obj["kind"], event=obj["event"]), ""


def _apply(st: "JournalState", ev: JournalEvent) -> None:
    """Apply one event to the state in place."""
    if ev.kind == "specimen":
        rec = SpecimenRecord.from_dict(ev.event["record"])
        st.specimens[rec.pot_id] = rec
        st.record_dicts[rec.pot_id] = ev.event["record"]
    elif ev.kind == "pathology":
        for row in ev.event["results"]:
            pr = PathologyResult(**row)
            pr.seq = ev.seq
            prev = st.pathology.get(pr.pot_id)
            pr.corrects_seq = prev.seq if prev else None
            st.pathology[pr.pot_id] = pr
            st.pathology_history.setdefault(pr.pot_id, []).append(pr)
    elif ev.kind == "procedure":
        st.procedure = ev.event["log"]
    else:
        logger.warning("specimen journal: event %d of unknown kind %r skipped", ev.seq, ev.kind)
    st.last_seq = ev.seq


def replay(events: Iterable[JournalEvent]) -> JournalState:
    """Build the current state from events (specimen, pathology, procedure)."""
    st = JournalState()
    for ev in events:
        _apply(st, ev)
    return st


def load_snapshot(path) -> dict:
    """Read a snapshot file (derived view; the journal stays the source of truth)."""
    p = Path(path)
    try:
        with open(p, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InputDataError(f"snapshot {p} does not exist; open the journal to rebuild it.") from None
    except ValueError:
        raise InputDataError(f"snapshot {p} is not valid JSON; delete it, the journal rebuilds it on the next open.") from None


# ----------------------------------------------------------------------------------------------- journal

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class SpecimenJournal:
    """Append-only specimen journal at ``path`` (``.jsonl``), snapshot beside it.

    Opening replays the journal. Appends validate first (nothing is written on error), then write one
    fsync-ed line, then update the in-memory state and the snapshot. Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, path, create: bool = True, snapshot: bool = True):
        self.path = Path(path)
        self.snapshot_path = self.path.with_name(self.path.stem + ".snapshot.json")
        self.torn_path = self.path.with_name(self.path.name + ".torn")
        self._write_snapshots = snapshot
        if self.path.is_dir():
            raise InputDataError(f"{self.path} is a folder; give the journal file name, e.g. {self.path / 'specimens.jsonl'}.")
        if not self.path.exists():
            if not create:
                raise InputDataError(f"specimen journal {self.path} does not exist; check the path or record a specimen first.")
            if not self.path.parent.is_dir():
                raise InputDataError(f"folder {self.path.parent} does not exist; create it or choose another journal location.")
        self._fd: int | None = None
        events, torn, self._valid_end = read_events(self.path)
        self.state = replay(events)
        self.state.torn_tail = torn
        if events:
            self.state.last_sha256 = self._line_sha(events[-1])

    # -- context management
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _line_sha(ev: JournalEvent) -> str:
        return _checksum({"event": ev.event, "kind": ev.kind, "seq": ev.seq})

    # -- queries
    @property
    def specimens(self) -> dict:
        return dict(self.state.specimens)

    @property
    def pathology(self) -> dict:
        return dict(self.state.pathology)

    def events(self) -> list[JournalEvent]:
        return read_events(self.path, warn=False)[0]

    # -- low-level append
    def _open_for_append(self) -> int:
        if self._fd is not None:
            return self._fd
        created = not self.path.exists()
        try:
            fd = os.open(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SmartBiopsyError(f"cannot open the specimen journal {self.path} for writing ({exc.strerror}); check the folder permissions.") from None
        if created:
            os.fsync(fd)
            _fsync_dir(self.path.parent)
        self._fd = fd
        return fd

    def _lock(self, fd: int) -> None:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_EX)

    def _unlock(self, fd: int) -> None:
        if _fcntl is not None:
            _fcntl.flock(fd, _fcntl.LOCK_UN)

    def _sync_with_disk(self) -> None:
        """Under the lock: pick up events appended by another writer and cut off a torn tail."""
        if os.fstat(self._fd).st_size == self._valid_end and not self.state.torn_tail:
            return  # nothing changed since our last read or write
        events, torn, valid_end = read_events(self.path, warn=False)
        if len(events) != self.state.last_seq:
            self.state = replay(events)
            if events:
                self.state.last_sha256 = self._line_sha(events[-1])
        size = self.path.stat().st_size
        if torn or size > valid_end:
            with open(self.path, "rb") as fh:
                fh.seek(valid_end)
                fragment = fh.read()
            with open(self.torn_path, "ab") as fh:
                fh.write(b"# torn tail after seq %d, cut %s\n" % (self.state.last_seq, utc_now_iso().encode()))
                fh.write(fragment + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.truncate(self.path, valid_end)
            os.fsync(self._fd)
            size = valid_end
            logger.warning("specimen journal %s: removed an unacknowledged torn last line (%d bytes, kept in %s)",
                           self.path, len(fragment), self.torn_path.name)
        self.state.torn_tail = False
        self._valid_end = valid_end

    def _append(self, kind: str, build) -> int:
        """Under the lock: ``event = build(state)`` (validates, may raise), write one line, fsync, update state.

        Returns the event's sequence number."""
        fd = self._open_for_append()
        self._lock(fd)
        try:
            self._sync_with_disk()
            event = build(self.state)
            seq = self.state.last_seq + 1
            body = {"event": event, "kind": kind, "seq": seq}
            try:
                sha = _checksum(body)
            except ValueError:
                raise InputDataError("the record contains values that cannot be stored (NaN or infinity); re-measure.") from None
            body["sha256"] = sha
            line = (_canonical(body) + "\n").encode("utf-8")
            written = os.write(fd, line)
            if written != len(line):  # disk full: a partial line is a torn tail, cut on the next append
                raise SmartBiopsyError(f"the specimen journal {self.path} could not be written completely; free disk space and record again.")
            os.fsync(fd)  # from here on the event is acknowledged
            self._valid_end += len(line)
            _apply(self.state, JournalEvent(seq=seq, kind=kind, event=json.loads(_canonical(event))))
            self.state.last_sha256 = sha
            if self._write_snapshots:  # under the lock, so snapshots of concurrent writers cannot go backwards
                try:
                    self.write_snapshot()
                except OSError as exc:  # the journal line is durable; the snapshot is only a mirror
                    logger.warning("specimen journal: snapshot not updated (%s); the journal is intact", exc)
        finally:
            self._unlock(fd)
        return seq

    # -- public appends
    def append_specimen(self, record: SpecimenRecord | Mapping) -> SpecimenRecord:
        """Validate and durably append one specimen record; returns the normalised record once it is on disk.

        Raises InputDataError for a duplicate pot ID, unknown region or malformed values; nothing is written then.
        """
        rec = record.validated() if isinstance(record, SpecimenRecord) else SpecimenRecord.from_dict(record)

        def build(state: JournalState) -> dict:
            if rec.pot_id in state.specimens:
                prev = state.specimens[rec.pot_id]
                raise InputDataError(
                    f"pot {rec.pot_id} is already recorded (region {prev.region}, {prev.time_utc}); label the new core with a new pot ID."
                )
            return {"record": rec.to_dict()}

        self._append("specimen", build)
        logger.info("specimen %s (region %s, target %s) recorded", rec.pot_id, rec.region, rec.target_name)
        return rec

    def append_procedure(self, log) -> int:
        """Durably append the procedure log (object with ``to_dict()`` or a dict); the latest one is current.

        Returns the event's sequence number."""
        d = log.to_dict() if hasattr(log, "to_dict") else log
        if not isinstance(d, Mapping):
            raise InputDataError("the procedure log must be a ProcedureLog or a mapping.")
        try:
            d = json.loads(_canonical(dict(d)))
        except (TypeError, ValueError):
            raise InputDataError("the procedure log contains values that cannot be stored; check times and numbers.") from None
        return self._append("procedure", lambda state: {"log": d})

    def import_pathology_rows(self, rows: list[Mapping], source: str = "") -> ImportReport:
        """Validate pathology rows (dicts with pot_id and any of ki67_percent, nsr, fnclcc_grade) and append them
        as ONE journal event. All-or-nothing: any problem raises InputDataError listing the bad rows and
        nothing is written. Rows identical to the current values are skipped; changed ones are appended as
        corrections (the earlier event stays in the journal and in ``pathology_history``)."""
        parsed = _validate_pathology_rows(rows)
        source = _text(source, "source", required=False, max_len=300)
        report = ImportReport(source=source)
        stamp = utc_now_iso()

        def build(state: JournalState) -> dict:
            unknown = [(line, p.pot_id) for line, p in parsed if p.pot_id not in state.specimens]
            if unknown:
                listed = "; ".join(f"row {line}: pot {pot}" for line, pot in unknown[:10])
                raise InputDataError(
                    f"{len(unknown)} pathology row(s) name pots that were never recorded ({listed}); check the pot IDs, nothing was imported."
                )
            results = []
            for _, p in parsed:
                prev = state.pathology.get(p.pot_id)
                if prev is not None and all(getattr(prev, k) == getattr(p, k) for k in PATHOLOGY_FIELDS):
                    report.unchanged.append(p.pot_id)
                    continue
                (report.corrected if prev else report.added).append(p.pot_id)
                results.append({"pot_id": p.pot_id, "ki67_percent": p.ki67_percent, "nsr": p.nsr,
                                 "fnclcc_grade": p.fnclcc_grade, "source": source, "time_utc": stamp})
            if not results:
                raise _NothingToDo()
            return {"results": results, "source": source}

        try:
            report.seq = self._append("pathology", build)
        except _NothingToDo:
            logger.info("pathology import %s: every row already recorded, nothing appended", source)
            return report
        logger.info("pathology import %s: %d added, %d corrected, %d unchanged", source,
                    len(report.added), len(report.corrected), len(report.unchanged))
        return report

    def import_pathology_csv(self, csv_path, accession_map: Mapping | None = None) -> ImportReport:
        """Import pathology results from a CSV file with header ``pot_id`` (or ``accession_number`` together with
        ``accession_map`` {accession number: pot ID}, as written by the export) and any of ``ki67_percent``,
        ``nsr``, ``fnclcc_grade`` (blank cell = not reported). See :meth:`import_pathology_rows`."""
        p = Path(csv_path)
        rows = resolve_accessions(read_pathology_csv(p), accession_map)
        return self.import_pathology_rows(rows, source=p.name)

    # -- outputs
    def write_snapshot(self) -> Path:
        """Atomically replace the snapshot with the current state (temp file, fsync, os.replace, dir fsync)."""
        tmp = self.snapshot_path.with_name(f".{self.snapshot_path.name}.{os.getpid()}.tmp")
        for stale in self.snapshot_path.parent.glob(f".{self.snapshot_path.name}.*.tmp"):
            if stale != tmp:  # left by a writer killed mid-snapshot (callers hold the journal lock)
                try:
                    stale.unlink()
                except OSError:
                    pass
        data = (json.dumps(self.state.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.snapshot_path)
        _fsync_dir(self.snapshot_path.parent)
        return self.snapshot_path

    def export_csv(self, csv_path, maps: list[str] | None = None) -> Path:
        """Write one row per pot for pathology: identity, region, target, time, needle pose, notch ROI (JSON),
        per-map values (``<map>_<stat>``) and the current pathology values. Written atomically."""
        return export_pathology_csv(self.state, csv_path, maps)


class _NothingToDo(Exception):
    pass


# ----------------------------------------------------------------------------------------------- pathology CSV

def _validate_pathology_rows(rows) -> list[tuple[int, PathologyResult]]:
    if not isinstance(rows, (list, tuple)):
        raise InputDataError("pathology rows must be a list of records.")
    if not rows:
        raise InputDataError("the pathology file has no result rows; check that the right file was chosen.")
    problems: list[str] = []
    seen: dict[str, int] = {}
    out = []
    for i, row in enumerate(rows):
        line = row.get("_line", i + 2) if isinstance(row, Mapping) else i + 2
        if not isinstance(row, Mapping):
            problems.append(f"row {line}: not a record")
            continue
        pot_raw = row.get("pot_id")
        try:
            pot = validate_pot_id(pot_raw if isinstance(pot_raw, str) else "")
        except InputDataError:
            problems.append(f"row {line}: pot ID {pot_raw!r} is not valid")
            continue
        if pot in seen:
            problems.append(f"row {line}: pot {pot} already given in row {seen[pot]}")
            continue
        seen[pot] = line
        vals = {}
        for key, (lo, hi) in PATHOLOGY_FIELDS.items():
            v = row.get(key)
            if v is None or (isinstance(v, str) and not v.strip()):
                vals[key] = None
                continue
            try:
                f = float(v.strip().rstrip("%").strip()) if isinstance(v, str) else float(v)
                if isinstance(v, bool):
                    raise ValueError
            except (TypeError, ValueError):
                problems.append(f"row {line}: {key} {v!r} is not a number")
                continue
            if not math.isfinite(f):
                problems.append(f"row {line}: {key} {v!r} is not a finite number")
                continue
            if key == "fnclcc_grade":
                if f != int(f) or not lo <= f <= hi:
                    problems.append(f"row {line}: FNCLCC grade {v!r} must be 1, 2 or 3")
                    continue
                vals[key] = int(f)
            else:
                if not lo <= f <= hi:
                    unit = " percent" if key == "ki67_percent" else ""
                    problems.append(f"row {line}: {key} {v!r} is outside {lo:g}-{hi:g}{unit}")
                    continue
                vals[key] = f
        if len(vals) == len(PATHOLOGY_FIELDS) and all(v is None for v in vals.values()):
            problems.append(f"row {line}: pot {pot} has no pathology value")
            continue
        if len(vals) == len(PATHOLOGY_FIELDS):
            out.append((line, PathologyResult(pot_id=pot, **vals)))
    if problems:
        shown = "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else "")
        raise InputDataError(
            f"the pathology file has {len(problems)} problem(s), nothing was imported: {shown}; correct the file and import again."
        )
    return out


def resolve_accessions(rows: list, accession_map: Mapping | None) -> list:
    """Rows keyed by accession number get their pot ID from ``accession_map`` {accession: pot ID}. A row with both
    must agree; an accession number the map does not know is refused (nothing is imported)."""
    if not any(isinstance(r, Mapping) and str(r.get("accession") or "").strip() for r in rows):
        return rows
    amap = {str(k).strip(): str(v).strip() for k, v in (accession_map or {}).items()}
    out, problems = [], []
    for i, row in enumerate(rows):
        acc = str(row.get("accession") or "").strip() if isinstance(row, Mapping) else ""
        if not acc:
            out.append(row)
            continue
        line = row.get("_line", i + 2)
        pot = amap.get(acc)
        if pot is None:
            problems.append(f"row {line}: accession number {acc} is not one of this procedure's specimens")
            continue
        given = str(row.get("pot_id") or "").strip()
        if given and given != pot:
            problems.append(f"row {line}: accession number {acc} belongs to pot {pot}, not {given}")
            continue
        out.append({k: v for k, v in row.items() if k != "accession"} | {"pot_id": pot})
    if problems:
        raise InputDataError(f"the pathology file has {len(problems)} problem(s), nothing was imported: "
                             + "; ".join(problems[:10]) + "; check the accession numbers against the exported "
                             "accessions.csv.")
    return out


#: Accepted header spellings (lower-cased, spaces/dashes to underscores) -> field.
_HEADER_ALIASES = {
    "accession": "accession", "accession_number": "accession", "accession_no": "accession",
    "accession_id": "accession", "accessionnumber": "accession",
    "pot_id": "pot_id", "pot": "pot_id", "specimen_pot": "pot_id", "pot_label": "pot_id",
    "ki67_percent": "ki67_percent", "ki67": "ki67_percent", "ki_67": "ki67_percent", "ki67_%": "ki67_percent",
    "ki_67_%": "ki67_percent", "ki67_pct": "ki67_percent",
    "nsr": "nsr",
    "fnclcc_grade": "fnclcc_grade", "grade": "fnclcc_grade", "fnclcc": "fnclcc_grade",
}


def read_pathology_csv(path) -> list[dict]:
    """Read a pathology CSV into row dicts (``_line`` = file line number). Header names are matched
    case-insensitively with common spellings (Ki-67, Ki67 %, grade, FNCLCC)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputDataError(f"pathology file {p} does not exist; check the path.") from None
    except IsADirectoryError:
        raise InputDataError(f"{p} is a folder; give the pathology CSV file.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputDataError(f"pathology file {p} is not UTF-8 text; export it from the spreadsheet as CSV UTF-8.") from None
    if not text.strip():
        raise InputDataError(f"pathology file {p} is empty; export the results again.")
    try:
        dialect = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        raise InputDataError(f"pathology file {p} has no header row; the first row must name the columns.") from None
    fields = []
    for h in header:
        key = re.sub(r"[\s\-]+", "_", h.strip().lower())
        fields.append(_HEADER_ALIASES.get(key))
    if "pot_id" not in fields and "accession" not in fields:
        raise InputDataError(f"pathology file {p} has no pot ID column and no accession number column (header "
                             f"{header}); name it 'pot_id' or 'accession_number'.")
    if not any(f in PATHOLOGY_FIELDS for f in fields):
        raise InputDataError(
            f"pathology file {p} has no result column (header {header}); use ki67_percent, nsr and/or fnclcc_grade."
        )
    dup = sorted({f for f in fields if f and fields.count(f) > 1})
    if dup:
        raise InputDataError(f"pathology file {p} names the column(s) {', '.join(dup)} twice; keep one of each.")
    rows = []
    try:
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if len(cells) > len(fields):
                raise InputDataError(
                    f"pathology file {p} line {line} has {len(cells)} cells for {len(fields)} columns; check for stray separators."
                )
            row = {f: (cells[i] if i < len(cells) else "") for i, f in enumerate(fields) if f}
            row["_line"] = line
            rows.append(row)
    except csv.Error as exc:
        raise InputDataError(f"pathology file {p} is not a valid CSV ({exc}); export it again.") from None
    return rows


def _csv_text(value) -> str:
    """Neutralise spreadsheet formulas in free text."""
    s = "" if value is None else str(value)
    return "'" + s if s[:1] in ("=", "+", "@", "-") else s


def export_pathology_csv(state: JournalState, csv_path, maps: list[str] | None = None) -> Path:
    """See :meth:`SpecimenJournal.export_csv`."""
    p = Path(csv_path)
    if not state.specimens:
        raise InputDataError("the specimen journal has no specimens yet; nothing to export.")
    all_maps = sorted({m for r in state.specimens.values() for m in r.values})
    if maps:
        unknown = [m for m in maps if m not in all_maps]
        if unknown:
            raise InputDataError(f"map(s) {', '.join(unknown)} were never measured; available: {', '.join(all_maps)}.")
        all_maps = list(maps)
    header = ["pot_id", "participant_id", "region", "target_name", "time_utc", "operator",
              "tip_r_mm", "tip_a_mm", "tip_s_mm", "dir_r", "dir_a", "dir_s", "notch_roi"]
    for m in all_maps:
        header += [f"{m}_{k}" for k in MAP_VALUE_KEYS]
    header += list(PATHOLOGY_FIELDS) + ["notes"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for pot in sorted(state.specimens, key=lambda k: state.specimens[k].time_utc + k):
        r = state.specimens[pot]
        row = [r.pot_id, _csv_text(r.participant_id), r.region, _csv_text(r.target_name), r.time_utc,
               _csv_text(r.operator), *[f"{c:.3f}" for c in r.needle_tip_ras],
               *[f"{c:.6f}" for c in r.needle_direction_ras], _canonical(r.notch_roi)]
        for m in all_maps:
            mv = r.values.get(m)
            row += ["" if mv is None else repr(getattr(mv, k)) for k in MAP_VALUE_KEYS]
        path_res = state.pathology.get(pot)
        row += ["" if path_res is None or getattr(path_res, k) is None else getattr(path_res, k) for k in PATHOLOGY_FIELDS]
        row.append(_csv_text(r.notes))
        w.writerow(row)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(buf.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except OSError as exc:
        raise SmartBiopsyError(f"cannot write {p} ({exc.strerror}); choose a folder you can write to.") from None
    return p
