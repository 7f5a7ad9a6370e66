"""Digital phantom: a retroperitoneal sarcoma case with planning CT, multiparametric MRI and ground truth.

Everything is defined analytically in the CT world (Slicer RAS, mm; patient supine on the table):
body outline, subcutaneous fat, abdominal wall muscle, psoas, spine, pelvis and lower ribs, aorta and IVC,
kidneys, bowel loops with gas, a 1-2 L tumour with five compartments, 6-8 vitamin-oil skin capsules on
two craniocaudal lines over the tumour, a table, a fat-like tube, a skin fold and the umbilicus.

Tumour compartments and their signatures (habitat codes of the truth label maps):

===================  =====  ======  =====  ====  ==============================================
compartment          code   ADC     EF %   FF %  meaning
===================  =====  ======  =====  ====  ==============================================
cellular, enhancing  1 (A)  850     140    2     low ADC, high enhancement
fibrous              2 (B)  1000    35     3     discordant: low ADC, low enhancement
myxoid, enhancing    2 (B)  1700    110    3     discordant: high ADC, high enhancement
myxoid/hypocellular  3 (C)  1950    25     2     high ADC, low enhancement
necrosis             4      2900    2      0     non-solid (excluded from habitats)
well-diff. fat       5      300     10     80    fatty (excluded from habitats)
===================  =====  ======  =====  ====  ==============================================

A and C hold equal volumes, and so do the two discordant parts, so that the whole-tumour medians of ADC
and EF fall between the compartments, as the published median rule needs.

The MRI is acquired in another pose (known rigid transform, optionally a small smooth deformation around
the tumour), on an anisotropic grid (1.5 x 1.5 mm, 5 mm slices with a 1 mm gap: slice thickness is
simulated by averaging across the slab), with a smooth coil bias field (identical for all series, so
ratios such as ADC, FF and EF are unaffected) and Rician noise. Series: T2, DWI b = 0/50/400/800
(mono-exponential in the ADC truth), Dixon water/fat (consistent with the FF truth), T1 pre/post contrast
(consistent with the EF truth).

Deterministic per seed; anatomy, pose and capsule layout vary with the seed.

``ct_pose="FFS"`` writes the CT as scanned feet-first (patient turned 180 degrees about the
anterior axis in the CT world, DICOM Patient Position FFS) against the head-first MRI (HFS); the
default ``"HFS"`` is the case above, unchanged.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyCoreLib.dataio import jsonio

logger = logging.getLogger(__name__)

PHANTOM_VERSION = 1

#: CT/MRI label map codes (truth).
LABELS = {"air": 0, "fat": 1, "muscle": 2, "bone": 3, "aorta": 4, "ivc": 5, "kidney": 6, "bowel": 7,
          "bowel_gas": 8, "tumour": 9, "capsule": 10, "table": 11, "tube": 12}
#: habitat codes of the truth habitat maps.
HABITATS = {"none": 0, "A": 1, "B": 2, "C": 3, "necrosis": 4, "fat": 5}

B_VALUES = (0.0, 50.0, 400.0, 800.0)
MRI_SERIES = ("t2", "dwi_b0", "dwi_b50", "dwi_b400", "dwi_b800", "dixon_water", "dixon_fat", "t1_pre", "t1_post")

# Internal tissue classes: (name, label, habitat, HU, T2, ADC, FF, T1pre, EF, PD)
_TISSUES = [
    ("air", 0, 0, -1000, 0, 0, 0, 0, 0, 0),
    ("fat", 1, 0, -100, 320, 150, 92, 400, 5, 900),
    ("muscle", 2, 0, 50, 60, 1450, 4, 220, 40, 700),
    ("bone", 3, 0, 700, 40, 400, 50, 300, 20, 400),
    ("aorta", 4, 0, 140, 30, 2500, 0, 150, 250, 800),
    ("ivc", 5, 0, 130, 40, 2500, 0, 150, 200, 800),
    ("kidney", 6, 0, 150, 180, 2000, 2, 250, 200, 850),
    ("bowel", 7, 0, 40, 120, 1600, 3, 200, 100, 750),
    ("bowel_gas", 8, 0, -950, 0, 0, 0, 0, 0, 0),
    ("tumour_cellular", 9, 1, 45, 150, 850, 2, 200, 140, 800),
    ("tumour_fibrous", 9, 2, 40, 110, 1000, 3, 210, 35, 780),
    ("tumour_myxoid_enh", 9, 2, 30, 260, 1700, 3, 180, 110, 850),
    ("tumour_myxoid", 9, 3, 25, 300, 1950, 2, 170, 25, 870),
    ("tumour_necrosis", 9, 4, 15, 600, 2900, 0, 150, 2, 900),
    ("tumour_fat", 9, 5, -80, 300, 300, 80, 380, 10, 900),
    ("capsule", 10, 0, -110, 450, 100, 95, 600, 0, 1000),
    ("table", 11, 0, 250, 0, 0, 0, 0, 0, 0),
    ("tube", 12, 0, -90, 0, 0, 0, 0, 0, 0),
    ("csf", 2, 0, 10, 900, 3000, 0, 100, 0, 1000),
]
T = {t[0]: i for i, t in enumerate(_TISSUES)}
_PROPS = np.array([t[3:] for t in _TISSUES], dtype=np.float64)  # HU, T2, ADC, FF, T1pre, EF, PD
_LABEL_OF = np.array([t[1] for t in _TISSUES], dtype=np.uint8)
_HABITAT_OF = np.array([t[2] for t in _TISSUES], dtype=np.uint8)
P_HU, P_T2, P_ADC, P_FF, P_T1, P_EF, P_PD = range(7)

CAPSULE_HALF_LENGTH_MM = 5.0
CAPSULE_RADIUS_MM = 2.5


def _rotation(axis, angle_rad) -> np.ndarray:
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    C = 1 - c
    return np.array([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                     [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                     [z * x * C - y * s, z * y * C + x * s, c + z * z * C]])


@dataclass
class Anatomy:
    """Seeded analytic anatomy in CT world (RAS mm). ``classify(points)`` gives tissue classes."""

    seed: int
    rng: np.random.Generator = field(repr=False, default=None)

    def __post_init__(self):
        r = self.rng = np.random.default_rng(self.seed)
        u = lambda lo, hi: float(r.uniform(lo, hi))  # noqa: E731
        self.side = -1.0 if r.random() < 0.5 else 1.0   # -1: tumour in the patient's left (RAS -x)
        self.body_a = u(170, 188)            # lateral half-width
        self.body_b = u(118, 130)            # AP half-depth
        self.body_wobble = u(0.02, 0.05)
        self.fat_mm = u(14, 24)
        self.wall_mm = u(9, 12)
        self.z_extent = 120.0                # body spans z in [-120, 120] in the CT
        ysp = -self.body_b + 45.0
        self.spine = np.array([0.0, ysp])
        self.aorta = np.array([-14.0 + u(-3, 3), ysp + 31.0])
        self.ivc = np.array([21.0 + u(-3, 3), ysp + 28.0])
        # tumour
        self.tumour_centre = np.array([self.side * u(70, 80), ysp + u(78, 86), u(-10, 10)])
        semi = np.array([u(50, 58), u(44, 52), u(68, 86)])
        self.tumour_semi = semi
        tilt_axis = np.array([r.normal(), r.normal(), 0.0])
        self.tumour_rot = _rotation(tilt_axis, math.radians(u(0, 10)))
        self.sector_phase = u(0, 2 * math.pi)
        self.sector_wave = (u(0.10, 0.22), u(2.0, 3.5), u(0, 2 * math.pi))
        self.fat_pole = 1.0 if r.random() < 0.5 else -1.0
        self._fit_tumour_inside_body()
        # kidneys: the tumour-side one displaced caudally and posteriorly
        kz = u(-10, 20)
        self.kidneys = [
            (np.array([self.side * 74.0, ysp + 2.0, self.tumour_centre[2] - 45.0]), np.array([24.0, 17.0, 44.0])),
            (np.array([-self.side * 70.0, ysp + 10.0, kz]), np.array([26.0, 19.0, 48.0])),
        ]
        self.pelvis_z = -self.z_extent + u(25, 40)
        self.rib_z = [self.z_extent - u(8, 14), self.z_extent - u(34, 40)]
        self._place_bowel()
        self._place_capsules()
        self.fold_angle = math.atan2(-0.4, self.side * 1.0)  # posterolateral, tumour side
        self.fold_z = float(self.tumour_centre[2] + u(-60, -40))
        self.umbilicus_z = float(u(-20, 0))
        self.tube_z = float(self.tumour_centre[2] + u(70, 85))
        # smooth textures (multiplicative, about +-4 %) for ADC, EF, FF inside tissue
        self.texture = [(r.normal(size=(4, 3)) * 0.05, r.uniform(0, 2 * math.pi, 4)) for _ in range(3)]

    # ------------------------------------------------------------------ layout helpers
    def body_semi(self, z: np.ndarray):
        f = 1.0 + self.body_wobble * np.sin(np.asarray(z) / 70.0 + 0.5)
        return self.body_a * f, self.body_b * (0.98 + 0.02 * np.cos(np.asarray(z) / 50.0))

    def tumour_volume_ml(self) -> float:
        return 4.0 / 3.0 * math.pi * float(np.prod(self.tumour_semi)) / 1000.0

    def _fit_tumour_inside_body(self):
        """Scale the tumour to a seeded volume of 1.0-1.9 L, then keep it inside the abdominal wall with a
        6 mm gap by moving it medially and, only if that is not enough, shrinking it (never below 1.0 L)."""
        target_ml = float(self.rng.uniform(1000.0, 1750.0))
        self.tumour_semi = self.tumour_semi * (target_ml / self.tumour_volume_ml()) ** (1 / 3)
        if self.tumour_semi[2] > 95.0:  # stay inside the MRI slab: widen instead of lengthening
            f = self.tumour_semi[2] / 95.0
            self.tumour_semi[2] = 95.0
            self.tumour_semi[:2] *= math.sqrt(f)
        a, b = self.body_semi(self.tumour_centre[2])
        inner_a = a - self.fat_mm - self.wall_mm - 6.0
        inner_b = b - self.fat_mm - self.wall_mm - 6.0
        for _ in range(120):
            pts = self._tumour_surface_samples()
            q = (pts[:, 0] / inner_a) ** 2 + (pts[:, 1] / inner_b) ** 2
            if q.max() <= 1.0:
                break
            if abs(self.tumour_centre[0]) > 45.0:
                self.tumour_centre[0] -= self.side * 2.0
            elif self.tumour_volume_ml() > 1000.0 * 1.03:
                self.tumour_semi *= 0.99
            else:
                self.tumour_centre[1] -= 1.0

    def _tumour_surface_samples(self, n=400):
        g = np.random.default_rng(0).normal(size=(n, 3))
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        return (g * self.tumour_semi) @ self.tumour_rot.T + self.tumour_centre

    def _tumour_local(self, p):
        return ((p - self.tumour_centre) @ self.tumour_rot) / self.tumour_semi

    def _place_bowel(self):
        r = self.rng
        b0 = self.body_b
        self.bowel = []
        tries = 0
        while len(self.bowel) < 8 and tries < 400:
            tries += 1
            if len(self.bowel) == 0 and tries <= 80:
                # first try to put one loop anteromedial to the tumour
                c = np.array([self.tumour_centre[0] * r.uniform(0.0, 0.4),
                              self.tumour_centre[1] + self.tumour_semi[1] * r.uniform(0.5, 0.9) + 16,
                              self.tumour_centre[2] + r.uniform(-40, 40)])
            else:
                c = np.array([-self.side * r.uniform(5, 110), r.uniform(-35, b0 - 50), r.uniform(-90, 90)])
            d = r.normal(size=3)
            d[2] *= 0.6
            d /= np.linalg.norm(d)
            half = r.uniform(15, 30)
            rad = r.uniform(10, 14)
            ends = np.array([c - d * half, c + d * half])
            samples = np.linspace(ends[0], ends[1], 9)
            # outside the tumour (ellipsoidal distance > 1 + margin), inside the wall, clear of vessels and spine
            loc = self._tumour_local(samples)
            if np.min(np.linalg.norm(loc, axis=1)) < 1.0 + (rad + 8) / self.tumour_semi.min():
                continue
            a, b = self.body_semi(samples[:, 2])
            inner = (samples[:, 0] / (a - self.fat_mm - self.wall_mm - rad - 3)) ** 2 + \
                    (samples[:, 1] / (b - self.fat_mm - self.wall_mm - rad - 3)) ** 2
            if inner.max() > 1.0:
                continue
            if np.min(np.linalg.norm(samples[:, :2] - self.aorta, axis=1)) < rad + 18:
                continue
            if np.min(np.linalg.norm(samples[:, :2] - self.ivc, axis=1)) < rad + 16:
                continue
            if np.min(np.linalg.norm(samples[:, :2] - self.spine, axis=1)) < rad + 30:
                continue
            if any(_segment_distance(samples, e2[0], e2[1]).min() < rad + r2 + 4 for e2, r2 in self.bowel):
                continue
            self.bowel.append((ends, rad))

    def skin_point(self, angle: float, z: float, offset_mm: float = 0.0):
        """Point on the skin at polar angle ``angle`` (0 = patient right, pi/2 = anterior) and height z,
        moved ``offset_mm`` along the outward normal; returns (point, unit normal)."""
        a, b = self.body_semi(z)
        a, b = float(a), float(b)
        c, s = math.cos(angle), math.sin(angle)
        rr = 1.0 / math.sqrt((c / a) ** 2 + (s / b) ** 2)
        p = np.array([rr * c, rr * s, z])
        n = np.array([p[0] / a ** 2, p[1] / b ** 2, 0.0])
        n /= np.linalg.norm(n)
        return p + n * offset_mm, n

    def _place_capsules(self):
        r = self.rng
        base = 0.0 if self.side > 0 else math.pi          # lateral direction of the tumour side
        toward_anterior = 1.0 if self.side > 0 else -1.0  # angle increment that moves anteriorly
        a1 = base + toward_anterior * math.radians(r.uniform(18, 30))
        a2 = base + toward_anterior * math.radians(r.uniform(52, 66))
        zc = float(self.tumour_centre[2])
        n1 = int(r.integers(3, 5))
        n2 = int(r.integers(3, 5))
        z1 = zc + (np.arange(n1) - (n1 - 1) / 2) * r.uniform(26, 32) + r.uniform(-4, 4, n1)
        z2 = zc + (np.arange(n2) - (n2 - 1) / 2) * r.uniform(26, 32) + 12 + r.uniform(-4, 4, n2)
        caps = []
        for ang, zs in ((a1, z1), (a2, z2)):
            for z in zs:
                p, n = self.skin_point(ang + r.uniform(-0.02, 0.02), float(z), CAPSULE_RADIUS_MM + 0.2)
                axis = np.array([0.0, 0.0, 1.0]) - n * n[2]
                axis /= np.linalg.norm(axis)
                caps.append((p, axis))
        self.capsules = caps
        self.capsule_lines = [n1, n2]

    # ------------------------------------------------------------------ classification
    def texture_factor(self, which: int, p: np.ndarray) -> np.ndarray:
        k, ph = self.texture[which]
        return 1.0 + 0.04 * np.mean(np.sin(p @ k.T + ph), axis=1) * 2.0

    def classify(self, p: np.ndarray) -> np.ndarray:
        """Tissue class index (into the internal tissue table) for RAS points (N, 3) in CT world.

        Structures are painted in order of priority; local structures are evaluated only on the points
        inside their bounding box.
        """
        n = p.shape[0]
        out = np.full(n, T["air"], dtype=np.int16)
        if n == 0:
            return out
        blo, bhi = p.min(axis=0), p.max(axis=0)

        def box(lo, hi):
            lo, hi = np.asarray(lo, float), np.asarray(hi, float)
            if np.any(hi < blo) or np.any(lo > bhi):
                return None
            m = np.ones(n, bool)
            for ax in range(3):
                if lo[ax] > blo[ax]:
                    m &= p[:, ax] >= lo[ax]
                if hi[ax] < bhi[ax]:
                    m &= p[:, ax] <= hi[ax]
            idx = np.nonzero(m)[0]
            return idx if idx.size else None

        zr = self.z_extent
        bi = box((-self.body_a * 1.1, -self.body_b * 1.1, -zr), (self.body_a * 1.1, self.body_b * 1.1, zr))
        if bi is not None:
            q = p[bi]
            x, y, z = q[:, 0], q[:, 1], q[:, 2]
            a, b = self.body_semi(z)
            sub = np.full(bi.size, T["air"], dtype=np.int16)
            body = (x / a) ** 2 + (y / b) ** 2 <= 1.0
            sub[body] = T["fat"]
            am, bm = a - self.fat_mm, b - self.fat_mm
            sub[body & ((x / am) ** 2 + (y / bm) ** 2 <= 1.0)] = T["muscle"]
            ai, bi_ = am - self.wall_mm, bm - self.wall_mm
            inner = body & ((x / ai) ** 2 + (y / bi_) ** 2 <= 1.0)
            sub[inner] = T["fat"]  # visceral/retroperitoneal fat
            sx, sy = self.spine
            for sgn in (-1, 1):  # psoas
                sub[inner & (((x - sgn * 38) / 16) ** 2 + ((y - sy - 2) / 20) ** 2 <= 1.0)] = T["muscle"]
            sub[body & ((np.abs(x) / 45) ** 2 + ((y - (sy - 38)) / 22) ** 2 <= 1.0)] = T["muscle"]  # paraspinal
            vb = ((x - sx) / 20) ** 2 + ((y - sy) / 16) ** 2 <= 1.0
            arch = (x - sx) ** 2 + (y - sy + 26) ** 2 <= 13 ** 2
            spinous = (np.abs(x - sx) <= 4) & (y <= sy - 26) & (y >= sy - 52)
            sub[body & (vb | arch | spinous)] = T["bone"]
            sub[body & ((x - sx) ** 2 + (y - sy + 26) ** 2 <= 7 ** 2)] = T["csf"]
            low = body & (z < self.pelvis_z)
            if low.any():
                for sgn in (-1, 1):  # iliac wings: tilted plates
                    cx, cy = sgn * (self.body_a - self.fat_mm - self.wall_mm - 25), sy + 20
                    nx, ny = math.cos(math.radians(60)) * sgn, -math.sin(math.radians(60))
                    d_plane = (x - cx) * nx + (y - cy) * ny
                    along = -(x - cx) * ny + (y - cy) * nx
                    sub[low & (np.abs(d_plane) <= 5.0) & (np.abs(along) <= 40.0)] = T["bone"]
            for rz in self.rib_z:  # lower ribs: posterolateral arcs inside the wall
                ring = body & (np.abs(z - rz) <= 5.0)
                if ring.any():
                    ring &= ((x / (am - 3)) ** 2 + (y / (bm - 3)) ** 2 <= 1.0) & \
                        ((x / (am - 11)) ** 2 + (y / (bm - 11)) ** 2 > 1.0) & (y < 0.2 * bm)
                    sub[ring] = T["bone"]
            sub[inner & (np.hypot(x - self.aorta[0], y - self.aorta[1]) <= 11.0)] = T["aorta"]
            sub[inner & (((x - self.ivc[0]) / 12.0) ** 2 + ((y - self.ivc[1]) / 9.0) ** 2 <= 1.0)] = T["ivc"]
            out[bi] = sub
            inner_full = np.zeros(n, bool)
            inner_full[bi] = inner
        else:
            inner_full = np.zeros(n, bool)
        # kidneys
        for c, sz in self.kidneys:
            idx = box(c - sz, c + sz)
            if idx is not None:
                m = inner_full[idx] & ((((p[idx] - c) / sz) ** 2).sum(axis=1) <= 1.0)
                out[idx[m]] = T["kidney"]
        # bowel: tube segments, 3 mm wall, gas in the anterior part of the lumen
        for ends, rad in self.bowel:
            idx = box(ends.min(axis=0) - rad, ends.max(axis=0) + rad)
            if idx is None:
                continue
            d = _segment_distance(p[idx], ends[0], ends[1])
            loop = inner_full[idx] & (d <= rad)
            out[idx[loop]] = T["bowel"]
            ctr = 0.5 * (ends[0][1] + ends[1][1])
            gas = loop & (d <= rad - 3.0) & (p[idx, 1] > ctr + 0.2 * rad)
            out[idx[gas]] = T["bowel_gas"]
        # tumour
        r = float(self.tumour_semi.max())
        idx = box(self.tumour_centre - r, self.tumour_centre + r)
        if idx is not None:
            loc = self._tumour_local(p[idx])
            rho2 = (loc ** 2).sum(axis=1)
            tum = (rho2 <= 1.0) & (np.abs(p[idx, 2]) <= zr)
            out[idx[tum]] = self._tumour_compartment(loc[tum], np.sqrt(rho2[tum]))
        body_full = np.zeros(n, bool)
        body_full[out != T["air"]] = True
        # skin fold: fat bulge on the posterolateral flank, continuous with the body
        fp, _ = self.skin_point(self.fold_angle, self.fold_z, 0.0)
        fs = np.array([14.0, 14.0, 26.0])
        idx = box(fp - fs, fp + fs)
        if idx is not None:
            m = ((((p[idx] - fp) / fs) ** 2).sum(axis=1) <= 1.0) & ~body_full[idx]
            out[idx[m]] = T["fat"]
        # umbilicus: a small air-filled dimple on the anterior midline
        up, _ = self.skin_point(math.pi / 2, self.umbilicus_z, 0.0)
        idx = box(up - 6, up + 6)
        if idx is not None:
            m = (np.linalg.norm(p[idx] - up, axis=1) <= 6.0) & (out[idx] == T["fat"])
            out[idx[m]] = T["air"]
        # capsules
        for c, ax in self.capsules:
            idx = box(c - CAPSULE_HALF_LENGTH_MM, c + CAPSULE_HALF_LENGTH_MM)
            if idx is None:
                continue
            d = p[idx] - c
            along = d @ ax
            perp2 = (d ** 2).sum(axis=1) - along ** 2
            cap = (along / CAPSULE_HALF_LENGTH_MM) ** 2 + perp2 / CAPSULE_RADIUS_MM ** 2 <= 1.0
            out[idx[cap]] = T["capsule"]
        # a fat-like tube lying across the anterior skin (e.g. an oxygen line); not a marker
        tp, _ = self.skin_point(math.pi / 2, self.tube_z, 2.4)
        idx = box(tp - np.array([60.0, 40.0, 3.0]), tp + np.array([60.0, 3.0, 3.0]))
        if idx is not None:
            # the tube follows the skin curve: distance to the skin-offset curve approximated per x
            a_t, b_t = self.body_semi(np.array([self.tube_z]))
            xs = p[idx, 0]
            y_skin = float(b_t[0]) * np.sqrt(np.clip(1 - (xs / float(a_t[0])) ** 2, 0, None)) + 2.4
            perp = np.hypot(p[idx, 1] - y_skin, p[idx, 2] - self.tube_z)
            m = (np.abs(xs - tp[0]) <= 60.0) & (perp <= 2.2) & (out[idx] == T["air"])
            out[idx[m]] = T["tube"]
        return out

    def _tumour_compartment(self, loc: np.ndarray, rho: np.ndarray) -> np.ndarray:
        amp, freq, ph = self.sector_wave
        theta = np.arctan2(loc[:, 1], loc[:, 0]) + self.sector_phase + amp * np.sin(freq * loc[:, 2] * math.pi + ph)
        frac = np.mod(theta, 2 * math.pi) / (2 * math.pi)
        out = np.full(loc.shape[0], T["tumour_cellular"], dtype=np.int16)
        out[(frac >= 0.30) & (frac < 0.50)] = T["tumour_fibrous"]
        out[(frac >= 0.50) & (frac < 0.80)] = T["tumour_myxoid"]
        out[frac >= 0.80] = T["tumour_myxoid_enh"]
        out[self.fat_pole * loc[:, 2] > 0.72] = T["tumour_fat"]
        out[rho <= 0.33] = T["tumour_necrosis"]
        return out

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "tumour_side": "left" if self.side < 0 else "right",
            "tumour_centre_ras": self.tumour_centre.tolist(),
            "tumour_semi_axes_mm": self.tumour_semi.tolist(),
            "tumour_ellipsoid_volume_ml": self.tumour_volume_ml(),
            "capsules_per_line": self.capsule_lines,
        }


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


# ====================================================================== truth and case
@dataclass
class PhantomTruth:
    """Ground truth of a phantom case (all RAS mm)."""

    mri_to_ct: np.ndarray
    capsules_ct: np.ndarray
    capsules_mri: np.ndarray
    capsule_axes_ct: np.ndarray
    adc: RasVolume
    ff: RasVolume
    ef: RasVolume
    mri_labels: RasVolume
    mri_habitats: RasVolume
    tumour_mask_mri: RasVolume
    b_values: tuple = B_VALUES
    tumour_volume_ml: float = 0.0
    deformation: bool = False
    anatomy: dict = field(default_factory=dict)
    habitat_values: dict = field(default_factory=dict)
    robot_to_ct: np.ndarray | None = None        # the robot's fiducial frame pose (robot frame -> CT RAS)
    robot_frame_model: str | None = None
    ct_pose: str = "HFS"
    #: the deformation: CT-RAS displacement d(p) (mm) added after the rigid pose, or None (rigid case)
    displacement: object = field(default=None, repr=False)

    def map_mri_to_ct(self, points_mri) -> np.ndarray:
        """True CT-RAS position (mm) of MRI-world points (N, 3): p = mri_to_ct * x, then p + d(p)."""
        x = np.asarray(points_mri, float).reshape(-1, 3)
        p = x @ self.mri_to_ct[:3, :3].T + self.mri_to_ct[:3, 3]
        return p + self.displacement(p) if self.displacement is not None else p

    def displacement_field(self, grid: RasVolume) -> np.ndarray:
        """The deformation at the voxel centres of ``grid`` (CT RAS): array (k, j, i, 3) of d(p) in mm along
        R, A, S, where p is the rigidly mapped MRI point (zeros for a rigid case)."""
        k, j, i = grid.shape_kji
        kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
        p = grid.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1).astype(float))
        d = self.displacement(p) if self.displacement is not None else np.zeros_like(p)
        return d.reshape(k, j, i, 3).astype(np.float32)

    def to_dict(self) -> dict:
        robot = {} if self.robot_to_ct is None else {
            "robot_to_ct_ras": np.asarray(self.robot_to_ct).tolist(), "robot_frame_model": self.robot_frame_model}
        return {**robot,
            "ct_pose": self.ct_pose,
            "deformation_field": None if self.displacement is None else dict(
                getattr(self.displacement, "params", {}),
                file="displacement_ct.nrrd", meaning="MRI point x lies at CT point p + d(p), p = mri_to_ct_ras x"),
            "mri_to_ct_ras": self.mri_to_ct.tolist(),
            "capsules_ct_ras": self.capsules_ct.tolist(),
            "capsules_mri_ras": self.capsules_mri.tolist(),
            "capsule_axes_ct": self.capsule_axes_ct.tolist(),
            "b_values": list(self.b_values),
            "tumour_volume_ml": self.tumour_volume_ml,
            "deformation": self.deformation,
            "anatomy": self.anatomy,
            "habitat_values": self.habitat_values,
            "labels": LABELS,
            "habitats": HABITATS,
            "units": {"adc": "1e-6 mm^2/s", "ff": "%", "ef": "%", "ct": "HU", "coordinates": "RAS mm"},
        }


@dataclass
class PhantomCase:
    seed: int
    ct: RasVolume
    ct_labels: RasVolume
    ct_habitats: RasVolume
    mri: dict
    truth: PhantomTruth
    anatomy: Anatomy = field(repr=False, default=None)
    timings: dict = field(default_factory=dict)

    def write(self, out_dir, dicom: bool = True, progress=None) -> dict:
        """Write NRRD volumes, truth label maps, truth.json and (optionally) DICOM series.

        Layout: ``ct.nrrd``, ``mri_<series>.nrrd``, ``truth/{ct_labels,ct_habitats,adc,ff,ef,mri_labels,
        mri_habitats,tumour_mask_mri}.nrrd``, ``truth/truth.json``, ``dicom/{ct,t2,dwi,dixon_water,dixon_fat,
        t1_pre,t1_post}/``. Returns a dict of written paths.
        """
        from SmartBiopsyCoreLib.dataio.imageio import save_image

        out = Path(out_dir)
        (out / "truth").mkdir(parents=True, exist_ok=True)
        paths = {}
        save_image(self.ct, out / "ct.nrrd"); paths["ct"] = str(out / "ct.nrrd")
        for k, v in self.mri.items():
            # noisy float MRI: zlib saves ~12 % of the file for most of the write time, so it is stored raw
            save_image(v, out / f"mri_{k}.nrrd", compress=False); paths[f"mri_{k}"] = str(out / f"mri_{k}.nrrd")
        for name, vol in (("ct_labels", self.ct_labels), ("ct_habitats", self.ct_habitats),
                          ("adc", self.truth.adc), ("ff", self.truth.ff), ("ef", self.truth.ef),
                          ("mri_labels", self.truth.mri_labels), ("mri_habitats", self.truth.mri_habitats),
                          ("tumour_mask_mri", self.truth.tumour_mask_mri)):
            save_image(vol, out / "truth" / f"{name}.nrrd"); paths[f"truth_{name}"] = str(out / "truth" / f"{name}.nrrd")
        if self.truth.displacement is not None:
            # the true displacement on a 4 mm grid over the CT field of view (vector NRRD, mm along R, A, S)
            import SimpleITK as sitk
            from SmartBiopsyCoreLib.geometry import lps_geometry_from_ijk_to_ras

            grid = _coarse_grid(self.ct, 4.0)
            img = sitk.GetImageFromArray(self.truth.displacement_field(grid), isVector=True)
            o, sp, dr = lps_geometry_from_ijk_to_ras(grid.ijk_to_ras)
            img.SetOrigin(tuple(map(float, o))); img.SetSpacing(tuple(map(float, sp)))
            img.SetDirection(tuple(map(float, dr.ravel())))
            img.SetMetaData("smartbiopsy_displacement", "components are R, A, S in mm (CT RAS), at the rigidly mapped point")
            sitk.WriteImage(img, str(out / "truth" / "displacement_ct.nrrd"), True)
            paths["truth_displacement"] = str(out / "truth" / "displacement_ct.nrrd")
        truth = self.truth.to_dict()
        truth.update({"seed": self.seed, "phantom_version": PHANTOM_VERSION})
        (out / "truth" / "truth.json").write_text(jsonio.dumps(truth, with_reasons=True, indent=1))
        paths["truth_json"] = str(out / "truth" / "truth.json")
        if progress:
            progress(0.5, "writing DICOM series")
        if dicom:
            from SmartBiopsyCoreLib.dataio.dicomio import write_dicom_series, write_dwi_series

            # CT and MRI come from different scanners and days: separate studies and frames of reference
            ct_study, mr_study = _uid(self.seed, 1), _uid(self.seed, 2)
            ct_for, mr_for = _uid(self.seed, 3), _uid(self.seed, 4)
            d = out / "dicom"
            write_dicom_series(self.ct, d / "ct", modality="CT", series_description="Planning CT with skin capsules",
                               series_number=2, study_uid=ct_study, frame_of_reference_uid=ct_for,
                               patient_id=f"PHANTOM{self.seed:04d}", uid_seed=f"phantom-{self.seed}-ct")
            series = [("t2", "T2 TSE axial", 3), ("dixon_water", "Dixon water", 6), ("dixon_fat", "Dixon fat", 7),
                      ("t1_pre", "T1 VIBE pre-contrast", 8), ("t1_post", "T1 VIBE post-contrast", 9)]
            for key, desc, num in series:
                write_dicom_series(self.mri[key], d / key, modality="MR", series_description=desc,
                                   series_number=num, study_uid=mr_study, frame_of_reference_uid=mr_for,
                                   patient_id=f"PHANTOM{self.seed:04d}", uid_seed=f"phantom-{self.seed}-{key}")
            write_dwi_series({b: self.mri[f"dwi_b{int(b)}"] for b in B_VALUES}, d / "dwi",
                             series_description="ep2d_diff b0-50-400-800", series_number=5, study_uid=mr_study,
                             frame_of_reference_uid=mr_for, patient_id=f"PHANTOM{self.seed:04d}",
                             uid_seed=f"phantom-{self.seed}-dwi")
            paths["dicom"] = str(d)
        return paths


def _coarse_grid(vol: RasVolume, spacing_mm: float) -> RasVolume:
    """An empty grid covering ``vol``'s field of view with isotropic ``spacing_mm`` voxels (same axes)."""

    lo, hi = vol.bounds_ras()
    shape_kji = tuple(int(np.ceil((h - l) / spacing_mm)) + 1 for l, h in zip(lo[::-1], hi[::-1]))
    return RasVolume(np.zeros(shape_kji, np.uint8), make_grid(tuple(lo), (spacing_mm,) * 3, shape_kji), "grid")


def _uid(seed: int, k: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.7{seed:06d}{k:03d}"


def _progress(progress, f, msg):
    if progress:
        progress(f, msg)
    logger.debug("phantom %.0f%% %s", 100 * f, msg)


def _ct_grid() -> RasVolume:
    spacing = (1.0, 1.0, 2.0)
    shape_kji = (121, 288, 400)
    origin = (-(shape_kji[2] - 1) / 2 * spacing[0], -(shape_kji[1] - 1) / 2 * spacing[1] - 6.0,
              -(shape_kji[0] - 1) / 2 * spacing[2])
    return RasVolume(np.zeros(shape_kji, np.int16), make_grid(origin, spacing, shape_kji), "CT")


def _add_robot_frame(seed: int, anat: Anatomy, ct: RasVolume, cls: np.ndarray, hu: np.ndarray, model_name: str):
    """Extend the CT anteriorly (air) to hold the robot's fiducial frame and draw it at a seeded pose above the
    tumour side of the abdomen; returns (grid, classes, HU, robot->CT pose)."""
    from SmartBiopsyCoreLib.fiducial_frames.model import load_model
    from SmartBiopsyCoreLib.phantom.robot_frame import render_frame, seeded_frame_pose

    model = load_model(model_name)
    anchor = np.array([anat.side * 40.0, anat.body_b + 68.0, float(anat.tumour_centre[2])])
    pose = seeded_frame_pose(seed, model, anchor)
    top = anat.body_b + 68.0 + 75.0
    y_max = ct.ijk_to_ras_points(np.array([[0.0, ct.shape_kji[1] - 1, 0.0]]))[0, 1]
    extra = max(int(np.ceil((top - y_max) / ct.spacing[1])), 0)
    nk, nj, ni = ct.shape_kji
    grid = RasVolume(np.zeros((nk, nj + extra, ni), np.int16), ct.ijk_to_ras.copy(), "CT")
    cls = np.concatenate([cls, np.full((nk, extra, ni), T["air"], cls.dtype)], axis=1)
    hu = np.concatenate([hu, np.full((nk, extra, ni), _PROPS[T["air"], P_HU], np.float32)], axis=1)
    render_frame(hu, grid, model, pose)
    return grid, cls, hu, pose


def _mri_pose(rng: np.random.Generator) -> np.ndarray:
    """A random rigid MRI->CT pose: rotation up to ~6 degrees, translation up to ~20 mm."""
    axis = rng.normal(size=3)
    ang = math.radians(rng.uniform(2.0, 6.0))
    m = np.eye(4)
    m[:3, :3] = _rotation(axis, ang)
    m[:3, 3] = rng.uniform(-20, 20, 3) * np.array([1.0, 1.0, 0.6])
    return m


def _deformation(anat: Anatomy, rng: np.random.Generator):
    """A small smooth displacement (max ~3 mm) localised around the tumour; None when off."""
    amp = rng.uniform(2.0, 3.0)
    k = rng.normal(size=(3, 3)) / 40.0
    ph = rng.uniform(0, 2 * math.pi, 3)
    return displacement_from_params({"amplitude_mm": float(amp), "k_per_mm": k.tolist(), "phase_rad": ph.tolist(),
                                     "centre_ras": anat.tumour_centre.tolist(), "sigma_mm": 45.0})


class PhantomDisplacement:
    """The phantom deformation d(p) (CT RAS mm -> mm); callable on (N, 3) points, ``params`` keeps its truth.json
    parameters. A plain class (not a closure) so that a deformed case can be pickled into the disk cache."""

    FORM = "d(p) = amplitude * exp(-|p - centre|^2 / (2 sigma^2)) * sin(p @ k.T + phase)"

    def __init__(self, params: dict):
        self.amp, self.sigma = float(params["amplitude_mm"]), float(params["sigma_mm"])
        self.k, self.ph, self.c = (np.asarray(params[key], float) for key in ("k_per_mm", "phase_rad", "centre_ras"))
        self.params = {"form": self.FORM, **{key: params[key] for key in
                                             ("amplitude_mm", "k_per_mm", "phase_rad", "centre_ras", "sigma_mm")}}

    def __call__(self, p):
        p = np.asarray(p, float).reshape(-1, 3)
        w = np.exp(-((p - self.c) ** 2).sum(axis=1) / (2 * self.sigma ** 2))
        return self.amp * w[:, None] * np.sin(p @ self.k.T + self.ph)


def displacement_from_params(params: dict) -> PhantomDisplacement:
    """The phantom deformation d(p) (CT RAS mm -> mm) from its truth.json parameters; ``d.params`` keeps them."""
    return PhantomDisplacement(params)


_CACHE: dict = {}
_CACHE_MAX = 4


def generate_phantom(seed: int = 0, deformation: bool = False, progress=None, should_cancel=None,
                     ct_noise_hu: float = 10.0, mri_noise: float = 0.012, cache: bool = True,
                     robot_frame: str | None = None, ct_pose: str = "HFS", disk_cache: bool = False) -> PhantomCase:
    """Generate the phantom case for ``seed`` (deterministic). See the module docstring.

    ``ct_pose``: "HFS" (default, head first supine like the MRI) or "FFS" (the CT scanned feet first:
    see :func:`_feet_first_ct`).

    Noise levels: CT Gaussian ``ct_noise_hu``; MRI Rician with sigma = ``mri_noise`` x the 95th
    percentile of the body signal of each series. With ``cache`` (default) the last few cases are kept
    in memory and returned again for the same arguments; their arrays are read-only (copy before
    modifying). ``robot_frame``: a fiducial-frame model name (e.g. "zframe-7tube") to place the robot's
    frame at a seeded pose anterior to the abdomen; the CT's field of view then extends anteriorly to hold it
    and the truth records the pose (``robot_to_ct``). ``disk_cache``: also keep the case in the user's cache
    folder (:func:`phantom_disk_cache_dir`) keyed by every argument and the generator's version, so a later
    process gets it without generating (the demo only; off unless asked, and ``SMARTBIOPSY_PHANTOM_CACHE=0``
    turns it off).
    """
    pose = str(ct_pose).upper()
    if pose != "HFS":
        if pose != "FFS":
            raise ValueError(f"ct_pose must be 'HFS' or 'FFS', not {ct_pose!r}")
        if robot_frame:
            raise ValueError("the robot frame is placed for a head-first CT only")
        return _feet_first_ct(generate_phantom(seed, deformation, progress, should_cancel, ct_noise_hu,
                                               mri_noise, cache))
    key = (int(seed), bool(deformation), float(ct_noise_hu), float(mri_noise), robot_frame)
    if cache and key in _CACHE:
        if progress:
            progress(1.0, "phantom ready (cached)")
        return _CACHE[key]
    disk = _disk_cache_path(key) if disk_cache else None
    case = _disk_cache_read(disk) if disk is not None else None
    if case is not None:
        if progress:
            progress(1.0, "phantom ready (disk cache)")
    else:
        case = _generate(int(seed), deformation, progress, should_cancel, ct_noise_hu, mri_noise, robot_frame)
        if disk is not None:
            _disk_cache_write(disk, case)
    if cache:
        _freeze(case)
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = case
    return case


#: 180 degrees about the anterior axis (R -> L, S -> I): a feet-first supine patient seen from the table
FEET_FIRST_RAS = np.diag([-1.0, 1.0, -1.0, 1.0])


def _feet_first_ct(case: PhantomCase) -> PhantomCase:
    """The same case with the CT scanned feet first (Patient Position FFS) and the MRI head first (HFS).

    The CT world is the table's frame, so the patient appears turned by :data:`FEET_FIRST_RAS`; every
    CT-side truth (CT volumes, CT capsules and axes, MRI->CT transform) is turned with it, the MRI and
    ``case.anatomy`` (head-first CT world) are shared with the head-first case. Arrays are not copied.
    """
    from dataclasses import replace

    f = FEET_FIRST_RAS

    def turn(vol: RasVolume, position=None) -> RasVolume:
        meta = dict(vol.meta)
        if position:
            meta["patient_position"] = position
        return RasVolume(vol.array, f @ vol.ijk_to_ras, vol.name, meta)

    mri = {k: RasVolume(v.array, v.ijk_to_ras.copy(), v.name, {**v.meta, "patient_position": "HFS"})
           for k, v in case.mri.items()}
    tr = case.truth
    truth = replace(tr, mri_to_ct=f @ tr.mri_to_ct, capsules_ct=tr.capsules_ct @ f[:3, :3].T,
                    capsule_axes_ct=tr.capsule_axes_ct @ f[:3, :3].T, ct_pose="FFS")
    return PhantomCase(case.seed, turn(case.ct, "FFS"), turn(case.ct_labels), turn(case.ct_habitats), mri, truth,
                       case.anatomy, dict(case.timings))


# ---------------------------------------------------------------------- on-disk phantom cache (demo only)
#: Bump when the generated case changes for reasons the source hash cannot see (e.g. a data file).
PHANTOM_GENERATOR_VERSION = 1
_DISK_CACHE_FORMAT = "smartbiopsy.phantom-cache/1"


def phantom_disk_cache_dir() -> Path | None:
    """Folder of the on-disk phantom cache, or None when ``SMARTBIOPSY_PHANTOM_CACHE`` is 0/off/no.

    ``$SMARTBIOPSY_PHANTOM_CACHE_DIR``, else ``$XDG_CACHE_HOME/smartbiopsy/phantom``, else
    ``~/.cache/smartbiopsy/phantom``.
    """
    import os

    if os.environ.get("SMARTBIOPSY_PHANTOM_CACHE", "1").strip().lower() in ("0", "off", "no", "false"):
        return None
    if os.environ.get("SMARTBIOPSY_PHANTOM_CACHE_DIR"):
        return Path(os.environ["SMARTBIOPSY_PHANTOM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smartbiopsy" / "phantom"


def phantom_generator_fingerprint() -> str:
    """Hash of the generator: its version constant, the source of this module and of the robot-frame
    renderer, and the numpy version (random streams); any change gives new cache keys."""
    import hashlib

    h = hashlib.sha256(f"{PHANTOM_GENERATOR_VERSION}|{np.__version__}".encode())
    here = Path(__file__).resolve().parent
    for name in ("sarcoma.py", "robot_frame.py"):
        f = here / name
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()


def _disk_cache_path(key) -> Path | None:
    import hashlib

    folder = phantom_disk_cache_dir()
    if folder is None:
        return None
    fp = phantom_generator_fingerprint()
    spec = jsonio.dumps({"format": _DISK_CACHE_FORMAT, "key": list(key), "generator": fp}, sort_keys=True)
    return folder / f"phantom-{fp[:12]}-seed{int(key[0])}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.pickle"


def _disk_cache_read(path: Path):
    """The cached case, or None (absent, unreadable or from another format: the caller regenerates)."""
    import pickle

    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            fmt, case = pickle.load(f)
        if fmt != _DISK_CACHE_FORMAT or not isinstance(case, PhantomCase):
            return None
    except Exception as exc:  # noqa: BLE001 - a broken cache file is regenerated, never fatal
        logger.info("phantom disk cache %s unreadable (%s); generating", path, exc)
        return None
    logger.info("phantom seed %d from the disk cache %s (simulated data)", case.seed, path)
    return case


def _disk_cache_write(path: Path, case: PhantomCase) -> None:
    import os
    import pickle

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump((_DISK_CACHE_FORMAT, case), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
        current = path.name.split("-")[1]
        for old in path.parent.glob("phantom-*.pickle"):  # cases of other generator versions are stale
            if old.name.split("-")[1] != current:
                old.unlink(missing_ok=True)
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: never fatal (disk full, unpicklable)
        logger.info("phantom disk cache not written (%s)", exc)


def _freeze(case: PhantomCase) -> None:
    vols = [case.ct, case.ct_labels, case.ct_habitats, *case.mri.values(), case.truth.adc, case.truth.ff,
            case.truth.ef, case.truth.mri_labels, case.truth.mri_habitats, case.truth.tumour_mask_mri]
    for v in vols:
        v.array.setflags(write=False)
    for a in (case.truth.mri_to_ct, case.truth.capsules_ct, case.truth.capsules_mri, case.truth.capsule_axes_ct):
        a.setflags(write=False)


def _generate(seed, deformation, progress, should_cancel, ct_noise_hu, mri_noise, robot_frame=None) -> PhantomCase:
    t0 = time.perf_counter()
    anat = Anatomy(seed)
    rng = np.random.default_rng(seed + 1000)
    timings = {}

    def check_cancel():
        if should_cancel and should_cancel():
            from SmartBiopsyCoreLib.errors import SmartBiopsyError
            raise SmartBiopsyError("phantom generation cancelled")

    # ---------------------------------------------------------------- CT
    _progress(progress, 0.02, "CT anatomy")
    ct = _ct_grid()
    nk, nj, ni = ct.shape_kji
    cls = np.empty(ct.shape_kji, np.int16)
    jj, ii = np.mgrid[0:nj, 0:ni]
    plane_ijk = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size)], axis=1).astype(float)
    plane0 = ct.ijk_to_ras_points(plane_ijk)
    dk = ct.ijk_to_ras[:3, 2]
    for k in range(nk):
        cls[k] = anat.classify(plane0 + k * dk).reshape(nj, ni)
    check_cancel()
    # table under the patient (CT only): carbon shell with foam core
    table_top = -anat.body_b - 1.0
    ys = ct.ijk_to_ras_points(np.stack([np.zeros(nj), np.arange(nj), np.zeros(nj)], 1))[:, 1]
    shell = ((ys <= table_top) & (ys > table_top - 3)) | ((ys <= table_top - 22) & (ys > table_top - 25))
    core = (ys <= table_top - 3) & (ys > table_top - 22)
    cls[:, shell, :] = np.where(cls[:, shell, :] == T["air"], T["table"], cls[:, shell, :])
    hu = _PROPS[cls, P_HU].astype(np.float32)
    hu[:, core, :] = np.where(cls[:, core, :] == T["air"], -850.0, hu[:, core, :])
    robot_to_ct = None
    nj0 = cls.shape[1]
    if robot_frame:
        ct, cls, hu, robot_to_ct = _add_robot_frame(seed, anat, ct, cls, hu, robot_frame)
    # capsules: supersampled occupancy for sub-voxel accuracy
    _supersample_capsules(anat, ct, np.array([c for c, _ in anat.capsules]), [hu], [lambda c: _PROPS[c, P_HU]],
                          factor=(3, 3, 5))
    hu = ndimage.gaussian_filter(hu, sigma=(0.35, 0.6, 0.6))
    noise = rng.normal(0, ct_noise_hu, (hu.shape[0], nj0, hu.shape[2])).astype(np.float32)
    if hu.shape[1] > nj0:
        # the robot frame's extra rows draw from their own stream: the rest of the case (MRI pose included)
        # stays exactly what it is without the frame
        extra = np.random.default_rng(seed + 7000).normal(0, ct_noise_hu, (hu.shape[0], hu.shape[1] - nj0, hu.shape[2]))
        noise = np.concatenate([noise, extra.astype(np.float32)], axis=1)
    hu += noise
    ct = ct.with_array(np.clip(np.round(hu), -1024, 3071).astype(np.int16), name="CT", modality="CT", units="HU")
    ct_labels = ct.with_array(_LABEL_OF[cls], name="CT labels")
    ct_hab = ct.with_array(_HABITAT_OF[cls], name="CT habitats")
    timings["ct_s"] = time.perf_counter() - t0
    check_cancel()

    # ---------------------------------------------------------------- MRI
    _progress(progress, 0.40, "MRI in another pose")
    t1 = time.perf_counter()
    mri_to_ct = _mri_pose(rng)
    disp = _deformation(anat, rng) if deformation else None

    def mri_world_to_ct(w):
        p = w @ mri_to_ct[:3, :3].T + mri_to_ct[:3, 3]
        return p + disp(p) if disp is not None else p

    caps_ct = np.array([c for c, _ in anat.capsules])
    axes_ct = np.array([a for _, a in anat.capsules])
    ct_to_mri = np.linalg.inv(mri_to_ct)
    caps_mri = caps_ct @ ct_to_mri[:3, :3].T + ct_to_mri[:3, 3]
    if disp is not None:
        # the MRI point x satisfies T(x) + d(T(x)) = c: fixed-point iteration
        x = caps_mri.copy()
        for _ in range(30):
            y = x @ mri_to_ct[:3, :3].T + mri_to_ct[:3, 3]
            yc = caps_ct - disp(y)
            x = yc @ ct_to_mri[:3, :3].T + ct_to_mri[:3, 3]
        caps_mri = x
    mri_grid = _mri_grid(anat, mri_to_ct)
    props, centre_cls, centre_pts = _render_mri(anat, mri_grid, mri_world_to_ct)
    _supersample_capsules(anat, mri_grid, caps_mri, list(props),
                          [lambda c, q=q: _PROPS[c, q] for q in range(props.shape[0])],
                          factor=(3, 3, 1), world_fn=lambda w: _slab_points(w, mri_grid, mri_world_to_ct))
    check_cancel()
    _progress(progress, 0.75, "MRI series")
    mri, truth_maps = _synthesise_series(anat, mri_grid, props, centre_cls, centre_pts, rng, mri_noise)
    timings["mri_s"] = time.perf_counter() - t1

    mri_labels = mri_grid.with_array(_LABEL_OF[centre_cls], name="MRI labels")
    mri_hab = mri_grid.with_array(_HABITAT_OF[centre_cls], name="MRI habitats")
    truth = PhantomTruth(
        mri_to_ct=mri_to_ct, capsules_ct=caps_ct, capsules_mri=caps_mri, capsule_axes_ct=axes_ct,
        adc=truth_maps["adc"], ff=truth_maps["ff"], ef=truth_maps["ef"], mri_labels=mri_labels,
        mri_habitats=mri_hab, tumour_mask_mri=mri_grid.with_array((_LABEL_OF[centre_cls] == LABELS["tumour"]).astype(np.uint8), name="tumour"),
        tumour_volume_ml=float((ct_labels.array == LABELS["tumour"]).sum() * ct.voxel_volume_mm3 / 1000.0),
        deformation=deformation, anatomy=anat.to_dict(), robot_to_ct=robot_to_ct,
        robot_frame_model=robot_frame or None, displacement=disp,
        habitat_values={name: {"habitat": int(t[2]), "adc": t[5], "ff": t[6], "ef": t[8]}
                        for name, t in ((t[0], t) for t in _TISSUES) if t[0].startswith("tumour")},
    )
    timings["total_s"] = time.perf_counter() - t0
    _progress(progress, 1.0, "phantom ready")
    logger.info("phantom seed %d: tumour %.0f mL, %d capsules, %.1f s", seed, truth.tumour_volume_ml,
                len(caps_ct), timings["total_s"])
    return PhantomCase(seed, ct, ct_labels, ct_hab, mri, truth, anat, timings)


def _supersample_capsules(anat: Anatomy, grid: RasVolume, centres_grid: np.ndarray, outs: list, value_fns: list,
                          factor=(3, 3, 3), world_fn=None):
    """Replace voxels around each capsule by the mean over ``factor`` (i, j, k) sub-samples per voxel.

    ``centres_grid``: capsule centres in the grid's world; ``world_fn`` maps grid-world points to CT world
    (None for the CT itself); ``value_fns[n]`` maps tissue classes to the values written into ``outs[n]``.
    """
    inv = grid.ras_to_ijk
    sub = [(np.arange(f) + 0.5) / f - 0.5 for f in factor]
    offs = np.stack(np.meshgrid(*sub, indexing="ij"), -1).reshape(-1, 3)  # (i, j, k) offsets
    shape_ijk = np.array(outs[0].shape[::-1])
    for c in centres_grid:
        ijk = c @ inv[:3, :3].T + inv[:3, 3]
        half = np.ceil((CAPSULE_HALF_LENGTH_MM + 3.0) / grid.spacing).astype(int)
        lo = np.maximum(np.floor(ijk).astype(int) - half, 0)
        hi = np.minimum(np.floor(ijk).astype(int) + half + 1, shape_ijk)
        if np.any(hi <= lo):
            continue
        ii, jj, kk = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), np.arange(lo[2], hi[2]), indexing="ij")
        vox = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1).astype(float)
        pts = (vox[:, None, :] + offs[None, :, :]).reshape(-1, 3)
        w = grid.ijk_to_ras_points(pts)
        if world_fn is not None:
            w = world_fn(w)
        cls = anat.classify(w)
        for out, fn in zip(outs, value_fns):
            out[kk.ravel(), jj.ravel(), ii.ravel()] = fn(cls).reshape(len(vox), -1).mean(axis=1)


def _mri_grid(anat: Anatomy, mri_to_ct: np.ndarray) -> RasVolume:
    spacing = (1.5, 1.5, 6.0)  # 5 mm slices + 1 mm gap
    ni, nj = 264, 200
    nk = 38
    ct_to_mri = np.linalg.inv(mri_to_ct)
    zc = float(anat.tumour_centre[2])
    c_mri = np.array([0.0, -4.0, zc]) @ ct_to_mri[:3, :3].T + ct_to_mri[:3, 3]
    origin = c_mri - np.array([(ni - 1) / 2 * spacing[0], (nj - 1) / 2 * spacing[1], (nk - 1) / 2 * spacing[2]])
    origin = np.round(origin, 1)
    g = RasVolume(np.zeros((nk, nj, ni), np.float32), make_grid(origin, spacing, (nk, nj, ni)), "MRI")
    g.meta.update({"slice_thickness_mm": 5.0, "slice_gap_mm": 1.0})
    return g


_SLAB_OFFSETS = (-2.0, -1.0, 0.0, 1.0, 2.0)  # mm through the 5 mm slice


def _slab_points(w: np.ndarray, grid: RasVolume, world_fn) -> np.ndarray:
    """Not a point map: expands each in-plane sub-sample into the slab's through-plane samples.

    Used by capsule supersampling in the MRI (classes are averaged over all returned points in order).
    """
    normal = grid.direction_ras[:, 2]
    pts = w[:, None, :] + np.asarray(_SLAB_OFFSETS)[None, :, None] * normal[None, None, :]
    return world_fn(pts.reshape(-1, 3))


def _render_mri(anat: Anatomy, grid: RasVolume, world_fn):
    """Tissue properties averaged over each 5 mm slab: returns props (K, nk, nj, ni), centre classes, centre points."""
    nk, nj, ni = grid.shape_kji
    jj, ii = np.mgrid[0:nj, 0:ni]
    plane = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size)], 1).astype(float)
    acc = np.zeros((7, nk, nj * ni), np.float32)
    centre_cls = np.empty((nk, nj * ni), np.int16)
    centre_pts = np.empty((nk, nj * ni, 3), np.float32)
    dz = grid.spacing[2]
    plane0 = grid.ijk_to_ras_points(plane)
    dkv = grid.ijk_to_ras[:3, 2]
    tumour_classes = np.array([t[0].startswith("tumour") for t in _TISSUES])
    for k in range(nk):
        for off in _SLAB_OFFSETS:
            p = world_fn(plane0 + (k + off / dz) * dkv)
            c = anat.classify(p)
            vals = _PROPS[c].T.copy()  # (7, N)
            tum = np.nonzero(tumour_classes[c])[0]
            if tum.size:  # smooth texture inside the tumour (the truth maps carry the same factor)
                for which, prop in ((0, P_ADC), (1, P_EF)):
                    vals[prop, tum] *= anat.texture_factor(which, p[tum])
            acc[:, k] += vals.astype(np.float32)
            if off == 0.0:
                centre_cls[k] = c
                centre_pts[k] = p
    acc /= len(_SLAB_OFFSETS)
    return acc.reshape(7, nk, nj, ni), centre_cls.reshape(nk, nj, ni), centre_pts.reshape(nk, nj, ni, 3)


def _synthesise_series(anat, grid, props, centre_cls, centre_pts, rng, noise):
    """MR series from slab-averaged tissue properties; truth maps at voxel centres."""
    nk, nj, ni = grid.shape_kji
    hu, t2, adc, ff, t1, ef, pd = props
    # compartment-pure signals averaged over the slab: recompute signal per sub-sample would be exact;
    # slab-averaged properties are used for smooth partial volume at boundaries (pure inside regions).
    fat_sat = 1.0 - 0.95 * ff / 100.0
    bias = _bias_field(grid, rng)
    series = {"t2": t2}
    for b in B_VALUES:
        series[f"dwi_b{int(b)}"] = t2 * fat_sat * np.exp(-b * adc * 1e-6)
    series["dixon_water"] = pd * (1.0 - ff / 100.0)
    series["dixon_fat"] = pd * ff / 100.0
    series["t1_pre"] = t1
    series["t1_post"] = t1 * (1.0 + ef / 100.0)
    out = {}
    body = centre_cls != T["air"]
    for name, s in series.items():
        s = s * bias
        ref = float(np.percentile(s[body], 95)) if body.any() else 1.0
        sigma = noise * ref
        n1 = rng.normal(0, sigma, s.shape)
        n2 = rng.normal(0, sigma, s.shape)
        v = np.sqrt((s + n1) ** 2 + n2 ** 2).astype(np.float32)
        vol = grid.with_array(v, name=name, modality="MR")
        if name.startswith("dwi_b"):
            vol.meta["b_value"] = float(name[5:])
        out[name] = vol
    # capsules are sharp: supersample their signal for the anatomical series (T2)
    # (slab averaging already gives partial volume through-plane; in-plane edges are refined here)
    # truth maps at voxel centres (texture included)
    c = centre_cls
    p = centre_pts.reshape(-1, 3).astype(float)
    tumour_classes = np.array([t[0].startswith("tumour") for t in _TISSUES])
    tum = tumour_classes[c.ravel()]
    adc_t = _PROPS[c, P_ADC].ravel().copy()
    ef_t = _PROPS[c, P_EF].ravel().copy()
    adc_t[tum] *= anat.texture_factor(0, p[tum])
    ef_t[tum] *= anat.texture_factor(1, p[tum])
    adc_t, ef_t = adc_t.reshape(c.shape), ef_t.reshape(c.shape)
    ff_t = _PROPS[c, P_FF]
    truth = {"adc": grid.with_array(adc_t.astype(np.float32), name="ADC truth", units="1e-6 mm^2/s"),
             "ff": grid.with_array(ff_t.astype(np.float32), name="FF truth", units="%"),
             "ef": grid.with_array(ef_t.astype(np.float32), name="EF truth", units="%")}
    return out, truth


def _bias_field(grid: RasVolume, rng) -> np.ndarray:
    nk, nj, ni = grid.shape_kji
    k, j, i = np.meshgrid(np.linspace(-1, 1, nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij")
    c = rng.uniform(-0.08, 0.08, 6)
    f = 1.0 + c[0] * i + c[1] * j + c[2] * k * 0.5 + c[3] * i * j + c[4] * i ** 2 + c[5] * j ** 2
    return np.clip(f, 0.7, 1.3).astype(np.float32)
