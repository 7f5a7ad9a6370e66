"""TID 1500 Measurement Report (Comprehensive 3D SR, highdicom): one TID 1411 group per target, per core and per
planned trajectory, each with its point(s) in the planning CT's frame of reference (LPS mm), its coded region,
its measurements with UCUM units and, for cores, the pot ID as tracking identifier.

Content per group (tracking identifier text):
- ``Target A``: point = target; region; predicted registration error (mm); depth (mm); map signature mean/SD.
- ``<pot ID>`` (core): point = needle tip; region; tip error, lateral error, depth error (mm); notch mean/SD of
  every map; a TEXT item 'Specimen identifier' = pot ID.
- ``Trajectory A``: point = target; length (mm), angle to axial (deg); SCOORD3D 'entry' and 'target' items and
  a TEXT item 'needle model'."""

from __future__ import annotations

from pathlib import Path
import logging
import math

import numpy as np

from SmartBiopsyCoreLib.dataio.dicomio import person_name
from SmartBiopsyCoreLib.geometry import ras_to_lps_points
from SmartBiopsyLib.export.common import (MANUFACTURER, SCHEME, ExportedObject, code, need_highdicom, unit)
from SmartBiopsyLib.export.sources import SourceSeries

logger = logging.getLogger(__name__)

C_REGION = ("REGION", SCHEME, "Biopsy habitat region")
C_HABITAT = {r: (f"HAB{r}", SCHEME, f"Habitat {r}") for r in "ABC"}
C_TARGET = ("TARGET", SCHEME, "Biopsy target")
C_CORE = ("CORE", SCHEME, "Biopsy core")
C_TRAJ = ("TRAJ", SCHEME, "Planned needle trajectory")
C_PRED_ERR = ("PREDERR", SCHEME, "Predicted registration error")
C_DEPTH = ("DEPTH", SCHEME, "Depth inside habitat")
C_TIP_ERR = ("TIPERR", SCHEME, "Needle tip error")
C_LAT_ERR = ("LATERR", SCHEME, "Needle lateral error")
C_DEPTH_ERR = ("DEPTHERR", SCHEME, "Needle depth error")
C_LENGTH = ("TRAJLEN", SCHEME, "Trajectory length")
C_ANGLE = ("TRAJANG", SCHEME, "Trajectory angle to axial plane")
C_ENTRY = ("ENTRY", SCHEME, "Entry point")
C_TARGET_PT = ("TARGETPT", SCHEME, "Target point")
C_NEEDLE = ("NEEDLE", SCHEME, "Needle model")
C_SPECIMEN_ID = ("121041", "DCM", "Specimen Identifier")
MAP_MEAN = {k: (f"{k.upper()}MEAN", SCHEME, f"{k.upper()} notch mean") for k in ("adc", "ff", "ef")}
MAP_SD = {k: (f"{k.upper()}SD", SCHEME, f"{k.upper()} notch standard deviation") for k in ("adc", "ff", "ef")}
SIG_MEAN = {k: (f"{k.upper()}TMEAN", SCHEME, f"{k.upper()} target signature mean") for k in ("adc", "ff", "ef")}
SIG_SD = {k: (f"{k.upper()}TSD", SCHEME, f"{k.upper()} target signature standard deviation") for k in ("adc", "ff", "ef")}


def _ok(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def _lps(p_ras) -> np.ndarray:
    return ras_to_lps_points(np.asarray(p_ras, float)[None])[0]


def build_report(targets: list, cores: list, trajectories: list, ct_source: SourceSeries, evidence: list, path, *,
                 series_number: int, needle: str = "", observer: str = "") -> ExportedObject:
    """Write the SR. ``targets``: dicts with name, region, point_ct_ras, predicted_tre_mm, depth_mm, signature;
    ``cores``: dicts with pot_id, region, tip_ras, tip_error_mm, lateral_error_mm, depth_error_mm, values
    {map: {mean, sd}}; ``trajectories``: dicts with region, entry_ras, target_ras, length_mm, angle_to_axial_deg.
    All points CT world RAS mm (written as LPS in the CT frame of reference of ``ct_source``)."""
    hd = need_highdicom()
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    for_uid = str(ct_source.first.FrameOfReferenceUID)
    series = hd.sr.SourceSeriesForSegmentation(str(ct_source.first.SeriesInstanceUID))

    def point(p_ras):
        return hd.sr.VolumeSurface(graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=_lps(p_ras)[None],
                                   frame_of_reference_uid=for_uid, source_series=series)

    def meas(c, v, u):
        return hd.sr.Measurement(name=code(*c), value=float(v), unit=unit(u))

    def region_eval(r):
        r = str(r or "").upper()[:1]
        return [hd.sr.QualitativeEvaluation(code(*C_REGION), code(*C_HABITAT[r]))] if r in C_HABITAT else []

    groups, counts = [], {"targets": 0, "cores": 0, "trajectories": 0}
    for t in targets:
        if t.get("point_ct_ras") is None:
            continue
        ms = []
        if _ok(t.get("predicted_tre_mm")):
            ms.append(meas(C_PRED_ERR, t["predicted_tre_mm"], "mm"))
        if _ok(t.get("depth_mm")):
            ms.append(meas(C_DEPTH, t["depth_mm"], "mm"))
        for k, s in (t.get("signature") or {}).items():
            if k in SIG_MEAN and isinstance(s, dict):
                if _ok(s.get("mean")):
                    ms.append(meas(SIG_MEAN[k], s["mean"], k))
                if _ok(s.get("sd")):
                    ms.append(meas(SIG_SD[k], s["sd"], k))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=str(t.get("name"))),
            referenced_volume_surface=point(t["point_ct_ras"]), finding_type=code(*C_TARGET),
            measurements=ms or None, qualitative_evaluations=region_eval(t.get("region")) or None))
        counts["targets"] += 1
    for c in cores:
        ms = [meas(cc, c[k], "mm") for cc, k in ((C_TIP_ERR, "tip_error_mm"), (C_LAT_ERR, "lateral_error_mm"),
                                                 (C_DEPTH_ERR, "depth_error_mm")) if _ok(c.get(k))]
        for k, s in (c.get("values") or {}).items():
            if k in MAP_MEAN and isinstance(s, dict):
                if _ok(s.get("mean")):
                    ms.append(meas(MAP_MEAN[k], s["mean"], k))
                if _ok(s.get("sd")):
                    ms.append(meas(MAP_SD[k], s["sd"], k))
        g = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=str(c["pot_id"])),
            referenced_volume_surface=point(c["tip_ras"]), finding_type=code(*C_CORE),
            measurements=ms or None, qualitative_evaluations=region_eval(c.get("region")) or None)
        g[0].ContentSequence.append(hd.sr.TextContentItem(name=code(*C_SPECIMEN_ID), value=str(c["pot_id"]),
                                                          relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(g)
        counts["cores"] += 1
    for t in trajectories:
        ms = [meas(cc, t[k], u) for cc, k, u in ((C_LENGTH, "length_mm", "mm"), (C_ANGLE, "angle_to_axial_deg", "deg"))
              if _ok(t.get(k))]
        g = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"Trajectory {t['region']}"),
            referenced_volume_surface=point(t["target_ras"]), finding_type=code(*C_TRAJ),
            measurements=ms or None, qualitative_evaluations=region_eval(t.get("region")) or None)
        for c_pt, key in ((C_ENTRY, "entry_ras"), (C_TARGET_PT, "target_ras")):
            g[0].ContentSequence.append(hd.sr.Scoord3DContentItem(
                name=code(*c_pt), graphic_type=hd.sr.GraphicTypeValues3D.POINT, graphic_data=_lps(t[key])[None],
                frame_of_reference_uid=for_uid, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        if t.get("needle") or needle:
            g[0].ContentSequence.append(hd.sr.TextContentItem(
                name=code(*C_NEEDLE), value=str(t.get("needle") or needle),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        groups.append(g)
        counts["trajectories"] += 1
    context = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=person_name(observer or "Unknown"))),
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(), name=MANUFACTURER)))
    report = hd.sr.MeasurementReport(observation_context=context,
                                     procedure_reported=code("86273004", "SCT", "Biopsy"),
                                     imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=report[0], series_instance_uid=generate_uid(),
                                 series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
                                 manufacturer=MANUFACTURER, is_complete=True,
                                 series_description="SmartBiopsy targets, cores and trajectories (TID 1500)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(str(path))
    return ExportedObject(kind="sr", path=path.name, description="TID 1500 measurement report: targets, cores, trajectories",
                          sop_class_uid=str(sr.SOPClassUID), sop_instance_uid=str(sr.SOPInstanceUID),
                          series_instance_uid=str(sr.SeriesInstanceUID), study_instance_uid=str(sr.StudyInstanceUID),
                          references={"frame_of_reference_uid": for_uid, "source": ct_source.to_dict()},
                          content=counts)


def read_report(path) -> dict:
    """Read an SR written by :func:`build_report` back: {tracking identifier: {'finding', 'point_ras', 'region',
    'measurements' {meaning: (value, unit)}, 'texts' {meaning: text}, 'points' {meaning: RAS}}}."""
    import pydicom

    from SmartBiopsyCoreLib.geometry import lps_to_ras_points

    ds = pydicom.dcmread(str(path))
    out = {}

    def walk(items):
        for it in items:
            yield it
            if "ContentSequence" in it:
                yield from walk(it.ContentSequence)

    for it in walk(ds.ContentSequence):
        if it.ValueType != "CONTAINER" or it.ConceptNameCodeSequence[0].CodeValue != "125007":
            continue
        g = {"measurements": {}, "texts": {}, "points": {}, "region": "", "finding": "", "point_ras": None}
        ident = None
        for c in it.ContentSequence:
            name = c.ConceptNameCodeSequence[0].CodeMeaning
            if c.ValueType == "TEXT" and name == "Tracking Identifier":
                ident = str(c.TextValue)
            elif c.ValueType == "TEXT":
                g["texts"][name] = str(c.TextValue)
            elif c.ValueType == "CODE" and name == "Finding":
                g["finding"] = c.ConceptCodeSequence[0].CodeMeaning
            elif c.ValueType == "CODE" and name == C_REGION[2]:
                g["region"] = c.ConceptCodeSequence[0].CodeMeaning[-1]
            elif c.ValueType == "NUM":
                mv = c.MeasuredValueSequence[0]
                g["measurements"][name] = (float(mv.NumericValue), str(mv.MeasurementUnitsCodeSequence[0].CodeValue))
            elif c.ValueType == "SCOORD3D":
                p = lps_to_ras_points(np.asarray(c.GraphicData, float).reshape(-1, 3))[0]
                if name.lower() == "volume surface":
                    g["point_ras"] = p
                else:
                    g["points"][name] = p
        if ident is not None:
            out[ident] = g
    return out
