"""Hospital export, FHIR part: one R5 Specimen per core (pot ID, accession, parent, container, collection, note)
validated by fhir.resources; pathology keyed by accession number lands on the right cores."""
from __future__ import annotations

import json

import pytest

from export_fixture import build_and_export
from SmartBiopsyCoreLib.errors import InputDataError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return build_and_export(tmp_path_factory.mktemp("fhir"), accession="ACC-2024-0042")


def _specimens(out):
    bundle = json.loads((out / "fhir" / "specimens-bundle.json").read_text())
    return [e["resource"] for e in bundle["entry"]]


def test_one_valid_r5_specimen_per_core_with_its_parent_container_and_collection(exported):
    from fhir.resources.specimen import Specimen
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

    case, out, _res, _facts, _l = exported
    res = _specimens(out)
    parent, cores = res[0], res[1:]
    journal = SpecimenJournal(case / "specimens" / "journal.jsonl", create=False)
    recs = journal.specimens
    journal.close()
    assert sorted(c["identifier"][0]["value"] for c in cores) == sorted(recs)
    for c in cores:
        Specimen.model_validate(c)  # the model library accepts it as R5
        rec = recs[c["identifier"][0]["value"]]
        assert c["parent"] == [{"reference": f"Specimen/{parent['id']}"}]
        assert c["container"][0]["device"]["identifier"]["value"] == rec.pot_id
        col = c["collection"]
        assert col["collectedDateTime"] == rec.time_utc and col["collector"]["display"] == rec.operator
        assert f"habitat {rec.region}" in col["bodySite"]["concept"]["text"]
        tip = next(e["valueString"] for e in col["extension"] if e["url"].endswith("needle-tip-planning-ct-ras-mm"))
        assert f"R {round(rec.needle_tip_ras[0], 2)}" in tip
        note = c["note"][0]["text"]
        assert f"region {rec.region}" in note and "SHA-256" in note and rec.operator in note
        # part number = recording order of the pot in the journal
        assert c["accessionIdentifier"]["value"] == f"ACC-2024-0042-{list(recs).index(rec.pot_id) + 1}"
    assert parent["accessionIdentifier"]["value"] == "ACC-2024-0042"
    for p in (out / "fhir").glob("Specimen-*.json"):
        from SmartBiopsyLib.export.fhir import validate_specimen_json

        validate_specimen_json(p)


def test_an_invalid_specimen_is_refused_by_the_model_library(tmp_path):
    from SmartBiopsyLib.export.fhir import validate_specimen_json

    pytest.importorskip("fhir.resources")
    p = tmp_path / "bad.json"
    for bad in ({"collection": {"collectedDateTime": "yesterday"}}, {"parent": {"reference": "Specimen/x"}},
                {"container": [{"device": {"display": "pot"}, "colour": "red"}]}):
        p.write_text(json.dumps({"resourceType": "Specimen"} | bad))
        with pytest.raises(InputDataError, match="not a valid FHIR R5 Specimen"):
            validate_specimen_json(p)


def test_pathology_keyed_by_accession_number_lands_on_the_right_cores(exported, tmp_path):
    import shutil

    from SmartBiopsyLib.export.fhir import read_accession_map
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

    case, out, _res, _facts, _l = exported
    amap = read_accession_map(out / "fhir")
    assert len(amap) == len(_specimens(out)) - 1
    jdir = tmp_path / "j"
    shutil.copytree(case / "specimens", jdir)
    for extra in jdir.glob("journal.snapshot*"):
        extra.unlink()
    # the lab's file lists accession numbers only, in another order, with distinct Ki-67 per core
    items = sorted(amap.items(), reverse=True)
    want = {pot: 11.0 + 7.0 * n for n, (acc, pot) in enumerate(items)}
    csv_path = tmp_path / "lab.csv"
    csv_path.write_text("Accession Number,Ki-67,grade\n" + "".join(f"{acc},{want[pot]},2\n" for acc, pot in items))
    with SpecimenJournal(jdir / "journal.jsonl") as j:
        rep = j.import_pathology_csv(csv_path, accession_map=amap)
        got = {k: v.ki67_percent for k, v in j.pathology.items()}
    assert sorted(rep.added) == sorted(want)
    assert got == want


def test_pathology_with_an_unknown_accession_number_imports_nothing(exported, tmp_path):
    import shutil

    from SmartBiopsyLib.export.fhir import read_accession_map
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

    case, out, _res, _facts, _l = exported
    amap = read_accession_map(out / "fhir")
    jdir = tmp_path / "j"
    shutil.copytree(case / "specimens", jdir)
    acc = next(iter(amap))
    csv_path = tmp_path / "lab.csv"
    csv_path.write_text(f"accession_number,ki67_percent\n{acc},20\nACC-OTHER-9,30\n")
    with SpecimenJournal(jdir / "journal.jsonl") as j:
        before = dict(j.pathology)
        with pytest.raises(InputDataError, match="accession number ACC-OTHER-9 is not one of this procedure"):
            j.import_pathology_csv(csv_path, accession_map=amap)
        assert dict(j.pathology) == before
