"""``smartbiopsy export --case DIR --out DIR``: the case as DICOM (SEG, Parametric Maps, TID 1500 SR) and FHIR R5
Specimens for PACS and pathology; prints what was written and the dciodvfy result of each DICOM object.

Options: ``--source DIR`` (repeatable) DICOM folders holding the original series (default: the case's
phantom/dicom, dicom and the folders named in inputs/series_used.json); ``--risk PATH[:v=name,...]`` a risk label
map on the planning CT (repeatable); ``--accession NUMBER`` the procedure's accession number."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    from SmartBiopsyLib.cli.helptext import plain_help

    p = subparsers.add_parser("export", help="DICOM SEG / parametric maps / TID 1500 SR and FHIR Specimens of a case",
                              description=plain_help(__doc__.split("\n\n", 1)[0]))
    p.add_argument("--case", required=True, help="case folder (output of 'run' or 'demo')")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument("--source", action="append", default=[], help="DICOM folder with the original series (repeatable)")
    p.add_argument("--risk", action="append", default=[], metavar="PATH[:VALUE=NAME,...]",
                   help="risk label map on the planning CT grid, e.g. risk.nrrd:4=aorta,5=ivc (repeatable)")
    p.add_argument("--accession", default="", help="the procedure's accession number (cores become NUMBER-1, -2, ...)")
    p.add_argument("--no-validate", action="store_true", help="do not run dciodvfy on the written objects")
    p.set_defaults(func=run_export)


def _risk(spec: str):
    from SmartBiopsyCoreLib.dataio.imageio import load_image
    from SmartBiopsyCoreLib.errors import InputDataError

    path, _, names = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    vol = load_image(path)
    mapping = {}
    for item in filter(None, names.split(",")):
        v, _, n = item.partition("=")
        try:
            mapping[int(v)] = n.strip() or f"structure {v}"
        except ValueError:
            raise InputDataError(f"risk label '{item}' is not VALUE=NAME; write e.g. risk.nrrd:4=aorta") from None
    if not mapping:
        import numpy as np

        mapping = {int(v): f"structure {int(v)}" for v in np.unique(vol.array) if v != 0}
    return vol, mapping


def run_export(args) -> int:
    from SmartBiopsyLib.cli.main import ProgressBar
    from SmartBiopsyLib.export.case import export_case

    risks = [_risk(s) for s in args.risk]
    bar = ProgressBar("export")
    res = export_case(Path(args.case), Path(args.out), source_folders=args.source or None, risk_labelmaps=risks,
                      accession=args.accession, validate=not args.no_validate, progress=bar)
    print(f"exported {res.sentence()} to {args.out}")
    for o in res.objects:
        v = o.validation
        check = ("" if not v else f"  dciodvfy: {v['skipped']}" if "skipped" in v
                 else f"  dciodvfy: {v['errors']} errors, {v['warnings']} warnings")
        print(f"  {o.path}: {o.description}{check}")
    for n in res.notes:
        print(f"  note: {n}")
    for s in res.skipped:
        print(f"  not exported: {s}")
    bad = [o for o in res.objects if o.validation.get("errors")]
    if bad:
        print(f"error: {len(bad)} exported object(s) fail dciodvfy; see manifest.json")
        return 2
    return 0
