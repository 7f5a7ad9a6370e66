"""``smartbiopsy load PATH [PATH ...] [--mrb OUT.mrb] [--json]``: load images into a headless Slicer scene.

Each PATH is a DICOM folder (every series, multi-b DWI split per b-value; symbolic links followed) or a
NRRD/NIfTI/MetaImage file. Prints one line per volume node (name, size, spacing, modality, b-value), one per
time series (a DCE or variable-flip-angle set stored as separate series becomes ONE Sequence node), and every
series that was skipped with its reason (localizers, screenshots, unreadable series); ``--mrb`` saves the
scene bundle.
"""
from __future__ import annotations

import sys
from SmartBiopsyCoreLib.dataio import jsonio


def register(subparsers) -> None:
    p = subparsers.add_parser("load", help="load DICOM folders / image files into a headless MRML scene",
                              description=__doc__.splitlines()[0].split(": ", 1)[-1])
    p.add_argument("paths", nargs="+", help="DICOM folder(s) or image file(s)")
    p.add_argument("--mrb", help="save the scene as a Slicer scene bundle (.mrb)")
    p.add_argument("--json", action="store_true", help="print the node summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from SmartBiopsyLib.cli.main import ProgressBar
    from SmartBiopsyCoreLib.dataio.imageio import load_study_intake
    from SmartBiopsyCoreLib.runtime import new_runtime
    from SmartBiopsyCoreLib.dataio.scene_io import save_scene_bundle
    from SmartBiopsyCoreLib.dataio.volumes_mrml import add_time_series_node, add_volume_node

    rt = new_runtime()
    rows, series_rows, skipped = [], [], []
    for path in args.paths:
        bar = ProgressBar("load")
        intake = load_study_intake(path, progress=bar)
        volumes = intake.volumes
        skipped.extend(s.to_dict() for s in intake.skipped)
        for name, ts in intake.time_series.items():
            index = ts.flip_angles if ts.kind == "VFA" else ts.times_s
            seq, _browser, _proxy = add_time_series_node(rt.scene, ts.frames, index, name, ts.kind,
                                                         rt.logics.get("sequences"))
            series_rows.append(ts.to_dict() | {"sequence_node": seq.GetName(), "id": seq.GetID()})
        for name, vol in volumes.items():
            node = add_volume_node(rt.scene, vol, name)
            m = vol.meta
            rows.append({
                "node": node.GetName(), "id": node.GetID(), "class": node.GetClassName(),
                "size_ijk": list(vol.array.shape[::-1]), "spacing_mm": [round(float(s), 4) for s in vol.spacing],
                "modality": m.get("modality", ""), "b_value": m.get("b_value"),
                "series": m.get("series_description", ""), "range": [float(np.nanmin(vol.array)), float(np.nanmax(vol.array))],
            })
    if args.mrb:
        save_scene_bundle(rt.scene, args.mrb, rt.app_logic)
    if args.json:
        print(jsonio.dumps({"volumes": rows, "time_series": series_rows, "skipped": skipped, "mrb": args.mrb},
                         indent=1))
    else:
        for r in rows:
            b = f" b={r['b_value']:g}" if r["b_value"] is not None else ""
            sp = "x".join(f"{s:g}" for s in r["spacing_mm"])
            sz = "x".join(str(s) for s in r["size_ijk"])
            print(f"{r['node']:<40} {r['modality']:<3} {sz:<14} {sp:<14} mm{b}", file=sys.stdout)
        for t in series_rows:
            print(f"{t['sequence_node']:<40} time series: {t['label']}")
        for s in skipped:
            print(f"skipped {s['series']}: {s['reason']}")
        if args.mrb:
            print(f"scene bundle: {args.mrb}")
    return 0
