"""Export a whole case folder (as the workflow writes it, see SmartBiopsyLib.report.case) for the hospital:

``<out>/dicom/``  seg_tumour_habitats.dcm (MRI grid), seg_risk.dcm (CT grid, when risk label maps are given),
                  pm_adc.dcm / pm_ff.dcm / pm_ef.dcm, sr_measurements.dcm (TID 1500), and ``source/`` when a
                  derived source series had to be written;
``<out>/fhir/``   one Specimen JSON per core and the tumour, specimens-bundle.json, accessions.csv;
``<out>/manifest.json`` what was written, what each object references, what could not be referenced and the
                  dciodvfy result of every DICOM object (when the tool is installed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import json
import logging

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class ExportResult:
    out_dir: str
    objects: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": "smartbiopsy.export/1", "out_dir": self.out_dir,
                "objects": [o.to_dict() for o in self.objects], "notes": self.notes, "skipped": self.skipped}

    def sentence(self) -> str:
        kinds = {}
        for o in self.objects:
            kinds[o.kind] = kinds.get(o.kind, 0) + 1
        names = {"seg": "segmentation", "pm": "parametric map", "sr": "measurement report", "fhir": "FHIR Specimen"}
        parts = [f"{n} {names.get(k, k)}{'s' if n > 1 else ''}" for k, n in kinds.items()]
        return ", ".join(parts) or "nothing"


def default_source_folders(case_dir: Path) -> list[Path]:
    """Where original DICOM of a case is looked for: ``<case>/phantom/dicom`` (demo with --dicom), ``<case>/dicom``
    and the DICOM folders named in ``inputs/series_used.json``."""
    case_dir = Path(case_dir)
    out = [case_dir / "phantom" / "dicom", case_dir / "dicom"]
    used = case_dir / "inputs" / "series_used.json"
    if used.is_file():
        try:
            data = json.loads(used.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
        def walk(x):
            if isinstance(x, dict):
                for v in x.values():
                    yield from walk(v)
            elif isinstance(x, list):
                for v in x:
                    yield from walk(v)
            elif isinstance(x, str) and len(x) < 4096:
                p = Path(x)
                if p.is_absolute() and p.exists():
                    yield p if p.is_dir() else p.parent
        out += list(dict.fromkeys(walk(data)))
    return [p for p in out if p.is_dir()]


def export_case(case_dir, out_dir, *, source_folders=None, risk_labelmaps=None, accession: str = "",
                validate: bool = True, progress=None, before_records=None) -> ExportResult:
    """Export ``case_dir`` into ``out_dir`` (see module doc). ``source_folders``: DICOM folders with the original
    series (default :func:`default_source_folders`); ``risk_labelmaps``: [(label RasVolume on the CT grid,
    {value: name})]; ``accession``: the procedure's accession number (cores become ``<accession>-<n>``).
    ``before_records``: called after the segmentations and parametric maps, before the targets, trajectories and
    specimen records are read (the workflow's background export waits there until the procedure wrote them).

    Raises InputDataError when the case has nothing to export; ExportUnavailable when highdicom or fhir.resources is
    missing (nothing is written then)."""
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyLib.export.common import need_fhir, need_highdicom
    from SmartBiopsyLib.export import fhir, parametric, seg, sources, sr

    progress = progress or (lambda f, m: None)
    need_highdicom()
    need_fhir()
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    if not case_dir.is_dir():
        raise InputDataError(f"case folder {case_dir} does not exist; give the output folder of a run or the demo")
    cdir = case_dir / "characterisation"
    if not (cdir / "habitats.nrrd").is_file() and not (case_dir / "specimens" / "journal.jsonl").is_file():
        raise InputDataError(f"{case_dir} has no habitat map and no specimen journal; run the procedure first")
    dd = out_dir / "dicom"
    dd.mkdir(parents=True, exist_ok=True)
    res = ExportResult(str(out_dir))
    folders = list(source_folders) if source_folders else default_source_folders(case_dir)
    summary = _json(case_dir / "summary.json") or {}
    patient = str((summary.get("case") or {}).get("name") or case_dir.name)
    if (summary.get("case") or {}).get("synthetic"):
        res.notes.append("simulated case (digital phantom): every exported value is simulated")
    from pydicom.uid import generate_uid

    derived_study = generate_uid()
    derived_dir = dd / "source"

    def source(vol, kind, modality):
        s = sources.source_for(vol, folders, kind, modality, derived_dir, patient, study_uid=derived_study)
        if s.origin == "derived":
            res.notes.append(f"{kind} grid: {s.note}")
        return s

    # MRI grid: tumour + habitats, parametric maps
    progress(0.05, "segmentation")
    number = 800
    if (cdir / "habitats.nrrd").is_file() and (cdir / "tumour.nrrd").is_file():
        hab = load_image(cdir / "habitats.nrrd")
        tum = load_image(cdir / "tumour.nrrd")
        pix = load_image(cdir / "adc.nrrd") if (cdir / "adc.nrrd").is_file() else None
        # a derived MRI source carries the ADC values (an image) rather than the label map, when on the same grid
        mri_src = source(hab if pix is None or not pix.same_grid(hab) else pix, "mri", "MR")
        from SmartBiopsyLib.characterise.habitats import REGION_CODES

        present = {r: v for r, v in REGION_CODES.items() if (hab.array == v).any()}
        for r in sorted(set(REGION_CODES) - set(present)):
            res.skipped.append(f"habitat {r}: absent from the habitat map, no segment written")
        segs = [(seg.tumour_segment(), tum)] + [(s, hab) for s in seg.habitat_segments(present)]
        number += 1
        res.objects.append(seg.write_segmentation(segs, mri_src, dd / "seg_tumour_habitats.dcm", series_number=number,
                                                  series_description="SmartBiopsy tumour and habitats A/B/C"))
        progress(0.3, "parametric maps")
        for k in ("adc", "ff", "ef"):
            if (cdir / f"{k}.nrrd").is_file():
                vol = load_image(cdir / f"{k}.nrrd")
                if not vol.same_grid(hab):
                    res.skipped.append(f"{k} map: not on the habitat grid, not exported")
                    continue
                number += 1
                res.objects.append(parametric.write_parametric_map(vol, k, mri_src, dd / f"pm_{k}.dcm",
                                                                   series_number=number))
            else:
                res.skipped.append(f"{k} map: characterisation/{k}.nrrd is absent")
    else:
        res.skipped.append("tumour/habitat segmentation and maps: the characterisation step produced no habitat map")
    # CT grid: risk structures, and the CT frame of reference for the SR
    progress(0.55, "CT")
    ct_src = None
    ct_path = case_dir / "inputs" / "ct.nrrd"
    if ct_path.is_file():
        ct = load_image(ct_path)
        ct_src = source(ct, "ct", "CT")
        for n, (vol, names) in enumerate(risk_labelmaps or []):
            if not vol.same_grid(ct):
                res.skipped.append(f"risk label map {n + 1}: not on the planning CT grid, not exported")
                continue
            present = {v: nm for v, nm in names.items() if (vol.array == v).any()}
            if not present:
                res.skipped.append(f"risk label map {n + 1}: no labelled voxel")
                continue
            number += 1
            res.objects.append(seg.write_segmentation([(s, vol) for s in seg.risk_segments(present)], ct_src,
                                                      dd / f"seg_risk{'' if n == 0 else n + 1}.dcm",
                                                      series_number=number,
                                                      series_description="SmartBiopsy risk structures on the planning CT"))
        if not risk_labelmaps:
            res.skipped.append("risk structures: no risk label map was given with the case")
    else:
        res.skipped.append("planning CT: inputs/ct.nrrd is absent; no CT-frame objects (risk SEG, measurement report)")
    # SR
    if before_records is not None:
        before_records()
    progress(0.7, "measurement report")
    records, sigs = _journal(case_dir)
    if ct_src is not None:
        targets = _targets(case_dir)
        cores = _cores(case_dir, records)
        trajs, needle = _trajectories(case_dir)
        if targets or cores or trajs:
            number += 1
            import pydicom

            evidence = [ct_src.first] + [pydicom.dcmread(str(dd / o.path), stop_before_pixels=True)
                                         for o in res.objects if o.kind in ("seg",)]
            evidence = [e for e in evidence if str(e.StudyInstanceUID) == str(ct_src.first.StudyInstanceUID)] or [ct_src.first]
            observer = (records[0].operator if records else "") or "Unknown"
            res.objects.append(sr.build_report(targets, cores, trajs, ct_src, evidence, dd / "sr_measurements.dcm",
                                               series_number=number, needle=needle, observer=observer))
        else:
            res.skipped.append("measurement report: no targets, cores or trajectories in the case")
    # FHIR
    progress(0.85, "FHIR specimens")
    if records:
        proc = _json(case_dir / "specimens" / "procedure.json") or {}
        resources = fhir.specimen_resources(records, participant=patient, accession=accession, signatures=sigs,
                                            procedure_time=str(proc.get("planning_topogram_utc") or ""))
        res.objects += fhir.write_specimens(resources, out_dir / "fhir")
        if not accession:
            res.notes.append("no accession number was given: the Specimens carry pot IDs only, and pathology "
                             "results can be matched by pot ID only")
    else:
        res.skipped.append("FHIR specimens: no specimen was recorded (specimens/journal.jsonl)")
    if validate:
        progress(0.92, "dciodvfy")
        from SmartBiopsyLib.export.validate import run_dciodvfy

        for o in res.objects:
            if o.kind in ("seg", "pm", "sr"):
                r = run_dciodvfy(dd / o.path)
                o.validation = r.to_dict() if r is not None else {"tool": "dciodvfy", "skipped": "dciodvfy not installed"}
    for o in res.objects:
        if o.kind in ("seg", "pm", "sr"):
            o.path = f"dicom/{o.path}"
    (out_dir / MANIFEST).write_text(jsonio.dumps(res.to_dict(), with_reasons=True, indent=1, default=str), encoding="utf-8")
    progress(1.0, res.sentence())
    return res


def export_case_line(case_dir, risk_labelmaps=None, accession: str = "", wait_for_go=None) -> tuple[str, str | None]:
    """The workflow's export: ``case_dir`` into ``<case_dir>/export``; returns (summary line, warning text or None).
    Never raises for a problem of the export (a missing library or bad data becomes the line "hospital export not
    written: ..."). ``wait_for_go``: :func:`export_case`'s ``before_records``."""
    from SmartBiopsyCoreLib.errors import SmartBiopsyError

    case_dir = Path(case_dir)
    try:
        res = export_case(case_dir, case_dir / "export", risk_labelmaps=risk_labelmaps or None, accession=accession,
                          before_records=wait_for_go)
        bad = sum(1 for o in res.objects if o.validation.get("errors"))
        return (f"hospital export: {res.sentence()} in export/" + (f"; {bad} object(s) FAIL dciodvfy" if bad else ""),
                None)
    except Exception as exc:  # noqa: BLE001 - the export is an extra; the report says why it is missing
        text = str(exc).strip() or type(exc).__name__
        sentence = (text.splitlines()[0] if isinstance(exc, SmartBiopsyError)
                    else f"unexpected {type(exc).__name__}: {text.splitlines()[0]}")
        return f"hospital export not written: {sentence}", str(exc)


def read_manifest(out_dir) -> dict | None:
    return _json(Path(out_dir) / MANIFEST)


def _json(p: Path):
    try:
        return json.loads(Path(p).read_text(encoding="utf-8")) if Path(p).is_file() else None
    except (OSError, ValueError):
        return None


def _journal(case_dir: Path):
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal, SpecimenRecord, read_events

    p = case_dir / "specimens" / "journal.jsonl"
    if not p.is_file():
        return [], {}
    events = read_events(p, warn=False)[0]
    recs, sigs = [], {}
    for ev in events:
        if ev.kind == "specimen":
            rec = SpecimenRecord.from_dict(ev.event["record"])
            recs.append(rec)
            sigs[rec.pot_id] = (f"recorded by {rec.operator} at {rec.time_utc}; specimen journal event {ev.seq}, "
                                f"SHA-256 {SpecimenJournal._line_sha(ev)}")
    return recs, sigs


def _targets(case_dir: Path) -> list:
    t = _json(case_dir / "characterisation" / "targets.json")
    return [x for x in (t or {}).get("targets", []) if isinstance(x, dict)] if isinstance(t, dict) else []


def _cores(case_dir: Path, records) -> list:
    out = []
    for rec in records:
        det = (_json(case_dir / "sampling" / rec.target_name.replace(" ", "_") / "needle.json") or {}).get("detection") or {}
        if not det:
            det = (_json(case_dir / "sampling" / rec.region / "needle.json") or {}).get("detection") or {}
        out.append({"pot_id": rec.pot_id, "region": rec.region, "tip_ras": rec.needle_tip_ras,
                    "tip_error_mm": det.get("tip_error_mm"), "lateral_error_mm": det.get("lateral_error_mm"),
                    "depth_error_mm": det.get("depth_error_mm"),
                    "values": {k: v.to_dict() if hasattr(v, "to_dict") else dict(v) for k, v in rec.values.items()}})
    return out


def _trajectories(case_dir: Path):
    p = _json(case_dir / "plan" / "plan.json")
    if not isinstance(p, dict):
        return [], ""
    best = {}
    for t in p.get("trajectories") or []:
        if isinstance(t, dict) and t.get("rank") == 1:
            best[t.get("target")] = t
    needle = str((p.get("needle") or {}).get("name", "")) if isinstance(p.get("needle"), dict) else str(p.get("needle") or "")
    return [dict(best[k], region=best[k].get("region") or k) for k in sorted(best)], needle
