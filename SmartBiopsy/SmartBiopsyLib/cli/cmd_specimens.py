"""``smartbiopsy specimens ...``: the specimen chain-of-custody journal from the command line.

Subcommands (all take ``--journal FILE.jsonl``; the snapshot ``FILE.snapshot.json`` sits beside it):

- ``specimens add --journal J --record REC.json``
  Append specimen record(s) from a JSON file holding one record object or a list of them (fields as
  :class:`SpecimenRecord`: pot_id, region A/B/C, target_name, needle_tip_ras [mm RAS],
  needle_direction_ras, notch_roi {...}, values {map: {mean, median, min, sd, n_voxels, volume_mm3}},
  operator, optional time_utc (ISO 8601 with zone; default now), participant_id, notes). Records are
  validated one by one and each is acknowledged (printed) only once it is on disk; the first invalid record
  stops the run and those before it stay recorded.
- ``specimens add --journal J --from-sampling DIR --pot-id ID --operator NAME [--region A] [--participant P]``
  The operator records one pot pre-filled from a measured sampling folder (``run``'s ``sampling/<target>/`` or
  ``sample``'s ``--out``: needle.json + notch.json / notch_values.json): needle tip and direction, notch ROI
  and map values come from the measurement. The demo's simulated needles are refused.
- ``specimens export --journal J --csv OUT.csv [--maps adc,ff,ef]``
  One row per pot for pathology: identity, region, target, time, needle pose, notch ROI, map values and the
  pathology results recorded so far.
- ``specimens import-pathology --journal J --csv RESULTS.csv``
  Pathology results by pot ID (columns pot_id and any of ki67_percent, nsr, fnclcc_grade; blank = not
  reported). All rows are validated first (unknown pot, duplicate row, out of range, non-numeric); any
  problem imports nothing. Changed values are appended as corrections; earlier lines are never rewritten.
- ``specimens show --journal J``
  Print the current state (specimens, pathology, procedure log) as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from SmartBiopsyCoreLib.dataio import jsonio


def register(subparsers) -> None:
    from SmartBiopsyLib.cli.helptext import plain_help

    p = subparsers.add_parser("specimens", help="specimen journal: add records, export for pathology, import results",
                              description=plain_help(__doc__.split("\n\n", 1)[1]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="specimens_action", metavar="ACTION")
    sub.required = True
    a = sub.add_parser("add", help="append specimen record(s) from a JSON file")
    a.add_argument("--journal", required=True, help="journal file (.jsonl); created if absent")
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--record", help="JSON file: one record or a list of records")
    src.add_argument("--from-sampling", metavar="DIR",
                     help="sampling folder of one target (needle.json + notch.json): pre-fills the record")
    a.add_argument("--pot-id", help="pot label (with --from-sampling)")
    a.add_argument("--operator", help="who took and labelled the core (with --from-sampling)")
    a.add_argument("--region", help="habitat region A/B/C (default: the sampled target's name)")
    a.add_argument("--participant", default="", help="participant ID (with --from-sampling)")
    a.add_argument("--notes", default="", help="free text (with --from-sampling)")
    e = sub.add_parser("export", help="write the CSV for pathology")
    e.add_argument("--journal", required=True, help="existing journal file (.jsonl)")
    e.add_argument("--csv", required=True, help="output CSV")
    e.add_argument("--maps", default="", help="comma-separated maps to include (default all)")
    i = sub.add_parser("import-pathology", help="import Ki-67 / NSR / FNCLCC grade by pot ID")
    i.add_argument("--journal", required=True, help="existing journal file (.jsonl)")
    i.add_argument("--csv", required=True, help="pathology results CSV")
    i.add_argument("--accessions", help="accessions.csv written by 'smartbiopsy export' (rows keyed by accession number)")
    s = sub.add_parser("show", help="print the journal's current state as JSON")
    s.add_argument("--journal", required=True, help="existing journal file (.jsonl)")
    for q in (a, e, i, s):
        q.set_defaults(func=run)


def _load_records(path: Path) -> list:
    from SmartBiopsyCoreLib.errors import InputDataError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputDataError(f"record file {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise InputDataError(f"{path} is a folder; give the record JSON file.") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InputDataError(f"record file {path} is not valid JSON ({exc}); fix or regenerate it.") from None
    records = data if isinstance(data, list) else [data]
    if not records:
        raise InputDataError(f"record file {path} holds an empty list; nothing to add.")
    return records


def record_from_sampling(folder: Path, pot_id, operator, region=None, participant="", notes="") -> dict:
    """A specimen record (dict) pre-filled from a measured sampling folder; the operator supplies pot and name."""
    from SmartBiopsyCoreLib.errors import InputDataError

    def read(name):
        p = folder / name
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputDataError(f"{p} is not valid JSON ({exc}); measure the needle again.") from None

    if not folder.is_dir():
        raise InputDataError(f"--from-sampling {folder} is not a folder; give run's sampling/<target> or sample's --out.")
    if not pot_id or not operator:
        raise InputDataError("--from-sampling needs --pot-id and --operator: the operator names the pot they filled.")
    needle, notch = read("needle.json"), read("notch.json") or read("notch_values.json")
    if not isinstance(needle, dict) or not isinstance(notch, dict):
        raise InputDataError(f"{folder} holds no needle.json and notch values; run the sampling step first.")
    if needle.get("simulated") or notch.get("simulated") or "simulated_truth" in needle:
        raise InputDataError(f"{folder} holds the demo's simulated needle; pots are recorded only from measured "
                             "confirmation CTs.")
    det = needle.get("detection") if isinstance(needle.get("detection"), dict) else needle
    values = notch.get("values") if isinstance(notch.get("values"), dict) else notch
    roi = notch.get("roi") or values.get("roi")
    maps = values.get("maps") or {}
    if not maps:
        raise InputDataError(f"{folder} has no map values in the notch; sample the maps (--maps) first.")
    target = str(det.get("target_name") or values.get("target_name") or folder.name)
    return {"pot_id": pot_id, "region": region or target, "target_name": target,
            "needle_tip_ras": det.get("tip_ras"), "needle_direction_ras": det.get("axis"), "notch_roi": roi,
            "values": {k: {"mean": st.get("mean"), "median": st.get("median"), "min": st.get("min"),
                           "sd": st.get("sd"), "n_voxels": st.get("voxels_touched"), "volume_mm3": st.get("volume_mm3")}
                       for k, st in maps.items()},
            "operator": operator, "participant_id": participant,
            "notes": (notes + "; " if notes else "") + f"pre-filled from the measured sampling folder {folder}"}


def run(args) -> int:
    from SmartBiopsyLib.records.specimen_journal import SpecimenJournal

    action = args.specimens_action
    journal_path = Path(args.journal)
    if action == "add":
        if getattr(args, "from_sampling", None):
            records = [record_from_sampling(Path(args.from_sampling), args.pot_id, args.operator, args.region,
                                            args.participant, args.notes)]
        else:
            records = _load_records(Path(args.record))
        with SpecimenJournal(journal_path, create=True) as j:
            for rec in records:
                saved = j.append_specimen(rec)
                print(jsonio.dumps({"recorded": saved.pot_id, "region": saved.region, "time_utc": saved.time_utc}), flush=True)
        return 0
    with SpecimenJournal(journal_path, create=False) as j:
        if action == "export":
            maps = [m.strip() for m in args.maps.split(",") if m.strip()] or None
            out = j.export_csv(Path(args.csv), maps=maps)
            print(jsonio.dumps({"exported": len(j.specimens), "csv": str(out)}))
        elif action == "import-pathology":
            amap = None
            if getattr(args, "accessions", None):
                from SmartBiopsyLib.export.fhir import read_accession_map

                amap = read_accession_map(Path(args.accessions))
            rep = j.import_pathology_csv(Path(args.csv), accession_map=amap)
            print(jsonio.dumps(rep.to_dict()))
        elif action == "show":
            sys.stdout.write(jsonio.dumps(j.state.to_dict(), indent=1, sort_keys=True))
            sys.stdout.write("\n")
    return 0
