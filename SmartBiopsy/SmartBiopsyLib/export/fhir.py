"""HL7 FHIR R5 ``Specimen`` resources, one per biopsy core, validated with the fhir.resources model library.

Each core: identifier = pot ID; accessionIdentifier = the procedure's accession number with the part number
(``<accession>-<n>``, n = recording order) when an accession number is given; parent = the procedure's tumour
specimen (one more Specimen resource, the whole-lesion specimen the cores come from); container = the pot;
collection = collector, time, method, body site (the habitat region) and the needle-tip coordinates (planning-CT
RAS mm, in an extension); note = region and the journal signature (operator, journal event and its SHA-256).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
import logging

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyLib.export.common import ExportedObject, need_fhir
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

EXT_TIP = "http://smartbiopsy.invalid/fhir/StructureDefinition/needle-tip-planning-ct-ras-mm"
EXT_REGION = "http://smartbiopsy.invalid/fhir/StructureDefinition/habitat-region"
POT_SYSTEM = "http://smartbiopsy.invalid/fhir/specimen-pot-id"
ACCESSION_SYSTEM = "http://smartbiopsy.invalid/fhir/accession-number"
ACCESSION_MAP = "accessions.csv"


def _id(text: str) -> str:
    """A FHIR resource id ([A-Za-z0-9-.]{1,64}) from a pot ID."""
    out = "".join(c if (c.isalnum() or c in "-.") else "-" for c in str(text))
    return out[:64] or "specimen"


def specimen_resources(records: list, *, participant: str, accession: str = "", signatures: dict | None = None,
                       procedure_time: str = "") -> list[dict]:
    """FHIR R5 Specimen dicts: the tumour (parent) first, then one per core. ``records``: SpecimenRecord list in
    recording order; ``signatures``: {pot_id: 'operator ... journal event n sha256 ...'}. Validated by
    fhir.resources (raises InputDataError with the first problem)."""
    Specimen = need_fhir()
    signatures = signatures or {}
    parent_id = _id(f"{participant}-tumour")
    parent = {"resourceType": "Specimen", "id": parent_id, "status": "unavailable",
              "identifier": [{"system": POT_SYSTEM, "value": f"{participant}-TUMOUR"}],
              "type": {"text": "Tumour (in situ lesion sampled by the core needle biopsy)"},
              "subject": {"display": participant},
              "note": [{"text": "the lesion the cores were taken from; not itself a container"}]}
    if accession:
        parent["accessionIdentifier"] = {"system": ACCESSION_SYSTEM, "value": accession}
    if procedure_time:
        parent["receivedTime"] = procedure_time
    out = [parent]
    for n, rec in enumerate(records, start=1):
        tip = [round(float(x), 2) for x in rec.needle_tip_ras]
        res = {
            "resourceType": "Specimen", "id": _id(rec.pot_id), "status": "available",
            "identifier": [{"system": POT_SYSTEM, "value": rec.pot_id}],
            "type": {"text": "Core needle biopsy specimen"},
            "subject": {"display": rec.participant_id or participant},
            "parent": [{"reference": f"Specimen/{parent_id}"}],
            "container": [{"device": {"display": f"specimen pot {rec.pot_id}",
                                      "identifier": {"system": POT_SYSTEM, "value": rec.pot_id}}}],
            "collection": {
                "collector": {"display": rec.operator},
                "collectedDateTime": rec.time_utc,
                "method": {"text": "CT-guided percutaneous core needle biopsy"},
                "bodySite": {"concept": {"text": f"tumour habitat {rec.region} ({rec.target_name})"}},
                "extension": [{"url": EXT_TIP, "valueString": f"R {tip[0]}, A {tip[1]}, S {tip[2]} mm (planning CT)"},
                              {"url": EXT_REGION, "valueCode": rec.region}],
            },
            "note": [{"text": f"region {rec.region}; target {rec.target_name}; "
                              f"signature: {signatures.get(rec.pot_id, 'recorded by ' + rec.operator)}"
                              + (f"; {rec.notes}" if rec.notes else "")}],
        }
        if accession:
            res["accessionIdentifier"] = {"system": ACCESSION_SYSTEM, "value": f"{accession}-{n}"}
        out.append(res)
    for res in out:
        try:
            Specimen.model_validate(res) if hasattr(Specimen, "model_validate") else Specimen.parse_obj(res)
        except Exception as exc:  # noqa: BLE001 - pydantic ValidationError
            first = str(exc).splitlines()[:3]
            raise InputDataError(f"specimen {res['id']} is not a valid FHIR R5 Specimen ({' '.join(first)})") from None
    return out


def validate_specimen_json(path) -> None:
    """Validate a written Specimen (or Bundle of Specimens) JSON file with fhir.resources; raise InputDataError."""
    Specimen = need_fhir()
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    items = [e["resource"] for e in data.get("entry", [])] if data.get("resourceType") == "Bundle" else [data]
    for res in items:
        try:
            Specimen.model_validate(res)
        except Exception as exc:  # noqa: BLE001
            raise InputDataError(f"{Path(path).name}: not a valid FHIR R5 Specimen ({str(exc).splitlines()[0]})") from None


def write_specimens(resources: list[dict], out_dir) -> list[ExportedObject]:
    """One JSON file per Specimen plus a collection Bundle, and the accession map (accession -> pot ID) used
    by the pathology import."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objs = []
    rows = []
    for res in resources:
        p = out_dir / f"Specimen-{res['id']}.json"
        p.write_text(jsonio.dumps(res, indent=1), encoding="utf-8")
        acc = (res.get("accessionIdentifier") or {}).get("value", "")
        pot = res["identifier"][0]["value"]
        objs.append(ExportedObject(kind="fhir", path=f"fhir/{p.name}", description=f"FHIR R5 Specimen {pot}",
                                   content={"id": res["id"], "pot_id": pot, "accession": acc}))
        if acc and res.get("parent"):
            rows.append((acc, pot))
    bundle = {"resourceType": "Bundle", "type": "collection",
              "entry": [{"fullUrl": f"urn:uuid:{_uuid(r['id'])}", "resource": r} for r in resources]}
    (out_dir / "specimens-bundle.json").write_text(jsonio.dumps(bundle, indent=1), encoding="utf-8")
    if rows:
        with (out_dir / ACCESSION_MAP).open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["accession_number", "pot_id"])
            w.writerows(rows)
    return objs


def _uuid(text: str) -> str:
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, "smartbiopsy:" + text))


def read_accession_map(path) -> dict:
    """{accession number: pot ID} from an ``accessions.csv`` written by :func:`write_specimens`."""
    p = Path(path)
    if p.is_dir():
        p = p / ACCESSION_MAP
    if not p.is_file():
        raise InputDataError(f"no accession map at {p}; export the case with an accession number first")
    with p.open(newline="", encoding="utf-8") as fh:
        return {r["accession_number"].strip(): r["pot_id"].strip() for r in csv.DictReader(fh)
                if r.get("accession_number") and r.get("pot_id")}
