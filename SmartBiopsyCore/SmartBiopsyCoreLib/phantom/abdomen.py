"""A small analytic abdomen (CT in HU + label map) for planner tests and benchmarks.

Supine patient, RAS mm, origin at the body centre; axial slices; a table below the back. Labels follow the
project phantom: bone 3, aorta 4, ivc 5, kidney 6, bowel 7, bowel_gas 8, tumour 9, table 11.
The tumour sits in the left anterior-lateral abdomen so that lateral and anterior paths exist.
"""
from __future__ import annotations

import numpy as np

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid

LABELS = {"air": 0, "fat": 1, "bone": 3, "aorta": 4, "ivc": 5, "kidney": 6, "bowel": 7, "bowel_gas": 8,
          "tumour": 9, "table": 11}
RISK_LABELS = {3: "bone", 4: "aorta", 5: "ivc", 6: "kidney", 7: "bowel", 8: "bowel_gas"}
TUMOUR_CENTRE_RAS = (-70.0, 20.0, 0.0)
TUMOUR_RADIUS_MM = 22.0


def make_abdomen(spacing=(1.5, 1.5, 2.0), fov_mm=(360.0, 300.0, 160.0), dtype=np.int16):
    """Return (ct RasVolume HU, labels RasVolume uint8, targets list of dicts) on an axial grid.

    ``spacing`` and ``fov_mm`` are (x, y, z) = (i, j, k) in mm. The grid's i axis points to patient left
    and j to posterior (Slicer's usual CT orientation), so LPS/RAS handling is exercised.
    """
    sx, sy, sz = (float(v) for v in spacing)
    ni, nj, nk = (int(round(f / s)) for f, s in zip(fov_mm, spacing))
    direction = np.diag([-1.0, -1.0, 1.0])
    origin = np.array([(ni - 1) * sx / 2.0, (nj - 1) * sy / 2.0, -(nk - 1) * sz / 2.0])
    m = make_grid(origin, (sx, sy, sz), (nk, nj, ni), direction)
    x = (origin[0] - np.arange(ni) * sx).astype(np.float32)[None, None, :]
    y = (origin[1] - np.arange(nj) * sy).astype(np.float32)[None, :, None]
    z = (origin[2] + np.arange(nk) * sz).astype(np.float32)[:, None, None]
    lab = np.zeros((nk, nj, ni), np.uint8)
    body = (x / 150.0) ** 2 + (y / 110.0) ** 2 <= 1.0
    lab[np.broadcast_to(body, lab.shape)] = 1
    table = (y < -118.0) & (y > -130.0) & (np.abs(x) < 170.0)
    lab[np.broadcast_to(table, lab.shape)] = 11

    def put(mask, value):
        lab[np.broadcast_to(mask, lab.shape)] = value

    put((x ** 2 + (y + 75.0) ** 2) <= 20.0 ** 2, 3)  # vertebral column
    put(((x / 140.0) ** 2 + (y / 100.0) ** 2 <= 1.0) & ((x / 132.0) ** 2 + (y / 92.0) ** 2 > 1.0)
        & (y > -20.0) & ((z % 40.0) < 10.0), 3)  # ribs: anterior-lateral arcs every 40 mm
    put(((x + 22.0) ** 2 + (y + 40.0) ** 2) <= 12.0 ** 2, 4)  # aorta (patient left of the spine)
    put(((x - 25.0) ** 2 + (y + 42.0) ** 2) <= 10.0 ** 2, 5)  # IVC
    for cx in (-80.0, 80.0):
        put(((x - cx) / 28.0) ** 2 + ((y + 55.0) / 22.0) ** 2 + (z / 50.0) ** 2 <= 1.0, 6)  # kidneys
    put(((x - 30.0) ** 2 + (y - 40.0) ** 2) <= 22.0 ** 2, 7)  # bowel loop (wall + content)
    put(((x - 30.0) ** 2 + (y - 40.0) ** 2) <= 12.0 ** 2, 8)  # its gas
    cx, cy, cz = TUMOUR_CENTRE_RAS
    put((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= TUMOUR_RADIUS_MM ** 2, 9)
    hu = np.full(lab.shape, -1000, np.int16)
    for value, h in ((1, -100), (3, 700), (4, 40), (5, 35), (6, 30), (7, 30), (8, -1000), (9, 45), (11, 150)):
        hu[lab == value] = h
    ct = RasVolume(hu.astype(dtype), m, "synthetic_ct", {"units": "HU"})
    labels = RasVolume(lab, m.copy(), "synthetic_labels")
    targets = [
        {"name": "A", "region": "A", "point_ras": [cx - 8.0, cy + 6.0, cz + 6.0]},
        {"name": "B", "region": "B", "point_ras": [cx + 6.0, cy - 4.0, cz - 6.0]},
        {"name": "C", "region": "C", "point_ras": [cx - 2.0, cy + 8.0, cz - 10.0]},
    ]
    return ct, labels, targets
