"""DICOM load time of a phantom-sized CT: our loader vs SimpleITK's ImageSeriesReader, side by side.

Writes a 384 x 288 x 110 int16 CT (oblique-free, 1 x 1 x 2 mm) with our writer into a temporary folder,
then times (best of N) the folder scan, our full load, and SimpleITK/GDCM (file listing + read), and
checks that both give the same voxels and geometry. Prints a table.

    .venv/bin/python Testing/benchmarks/bench_dicom.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
for _m in ("SmartBiopsyCore", "SmartBiopsy", "RegistrationFusion"):
    sys.path.insert(0, str(ROOT / _m))

import SimpleITK as sitk  # noqa: E402
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid  # noqa: E402
from SmartBiopsyCoreLib.dataio import dicomio  # noqa: E402
def _ct(shape=(110, 288, 384), seed=0) -> RasVolume:
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((i - shape[2] / 2) / 170.0) ** 2 + ((j - shape[1] / 2) / 120.0) ** 2 < 1.0
    arr = np.where(body, 40, -1000) + rng.normal(0, 15, shape)
    arr = np.broadcast_to(arr, shape).astype(np.int16)
    return RasVolume(arr, make_grid([-191.5, -143.5, -110.0], [1.0, 1.0, 2.0], shape), "ct", {"units": "HU"})


def _best(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def _sitk_load(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return RasVolume.from_sitk(reader.Execute())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    vol = _ct()
    tmp = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    try:
        t_write, files = _best(lambda: dicomio.write_dicom_series(vol, tmp, modality="CT", series_description="CT",
                                                                  series_number=1), 1)
        size_mb = sum(Path(f).stat().st_size for f in files) / 1e6
        t_scan, _ = _best(lambda: dicomio.scan_dicom_folder(tmp), args.repeats)
        t_ours, ours = _best(lambda: dicomio.load_dicom_series(tmp), args.repeats)
        t_sitk, ref = _best(lambda: _sitk_load(tmp), args.repeats)
        geom_err = float(np.abs(ours.ijk_to_ras - ref.ijk_to_ras).max())
        val_err = float(np.abs(ours.array.astype(np.int32) - ref.array.astype(np.int32)).max())
        truth_err = float(np.abs(ours.array.astype(np.int32) - vol.array.astype(np.int32)).max())
        shape = "x".join(map(str, vol.array.shape[::-1]))
        print(f"DICOM CT {shape} int16, {len(files)} files, {size_mb:.1f} MB (best of {args.repeats})")
        print(f"{'step':34s} {'time s':>8s} {'vs SimpleITK':>13s} {'max |diff|':>14s}")
        print(f"{'write (our writer, once)':34s} {t_write:8.2f} {'':>13s} {'':>14s}")
        print(f"{'scan headers (scan_dicom_folder)':34s} {t_scan:8.2f} {t_scan / t_sitk:12.2f}x {'':>14s}")
        print(f"{'load (load_dicom_series)':34s} {t_ours:8.2f} {t_ours / t_sitk:12.2f}x "
              f"{truth_err:10.0f} HU")
        print(f"{'load (SimpleITK ImageSeriesReader)':34s} {t_sitk:8.2f} {1.0:12.2f}x {'baseline':>14s}")
        print(f"ours vs SimpleITK: IJK->RAS max diff {geom_err:.2e} mm, voxel max diff {val_err:.0f} HU")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
