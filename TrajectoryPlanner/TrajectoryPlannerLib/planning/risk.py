"""Risk structures for needle planning: body, skin, bone and gas from CT, user label maps, safety margins.

All masks are boolean arrays in (k, j, i) order on one planning grid (a :class:`RasVolume`, usually the
CT cropped to the region the needle can reach). Margins are in mm. World frame: RAS, mm.

Automatic structures from CT (HU):
* body: largest connected component above ``body_hu`` (default ``SmartBiopsyCoreLib.body.BODY_HU_THRESHOLD``) with internal holes (lungs,
  bowel gas) filled slice-independently of the crop (the crop's top and bottom faces are treated as
  body so that a lung cut by the crop still counts as a hole); the table is a separate component and
  drops out (``table_opening_mm`` > 0 additionally breaks thin body-table contacts);
* skin: body voxels with a 6-neighbour outside the body (crop faces do not count as outside);
* bone: above ``bone_hu`` (default 200 HU) inside the body, components below ``min_bone_mm3`` removed;
* gas: below ``gas_hu`` (default -400 HU) inside the body (bowel gas and lung), opened with the
  6-neighbour cross (removes one-voxel noise) and components below ``min_gas_mm3`` removed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from SmartBiopsyCoreLib.body import BODY_HU_THRESHOLD, bbox_slices, body_mask_array, label_components
from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import RasVolume, resample

from TrajectoryPlannerLib.errors import TrajectoryPlannerError

logger = logging.getLogger(__name__)

#: Default safety margins (mm) by structure name (lower case); anything else gets GENERIC_MARGIN_MM.
DEFAULT_MARGINS_MM: dict[str, float] = {
    "aorta": 10.0, "ivc": 10.0, "vena_cava": 10.0, "bowel": 5.0, "bowel_gas": 5.0, "gas": 5.0,
    "bone": 3.0, "kidney": 5.0,
}
GENERIC_MARGIN_MM = 5.0


def default_margin(name: str) -> float:
    """Default safety margin (mm) for a structure name."""
    return DEFAULT_MARGINS_MM.get(name.strip().lower().replace(" ", "_"), GENERIC_MARGIN_MM)


@dataclass
class RiskStructure:
    """One structure the needle must keep ``margin_mm`` away from; ``mask`` on the planning grid."""

    name: str
    mask: np.ndarray
    margin_mm: float
    source: str = "user"  # "ct" (automatic) or "user"

    def to_dict(self) -> dict:
        return {"name": self.name, "margin_mm": float(self.margin_mm), "source": self.source,
                "voxels": int(np.count_nonzero(self.mask))}


@dataclass
class EntryExclusion:
    """Skin entries the patient's position makes impossible (e.g. the table side of a supine patient).

    ``kind="cone"``: excluded when the entry direction (unit vector target -> entry, RAS) lies within
    ``half_angle_deg`` of ``direction_ras`` (90 deg = a half-space).
    ``kind="azimuth"``: excluded when the entry direction's azimuth in the axial plane lies in
    ``azimuth_range_deg`` (start, end), measured from anterior (0) towards patient right (90),
    posterior (180), left (270); the range may wrap through 0.
    """

    kind: str = "cone"
    direction_ras: tuple = (0.0, -1.0, 0.0)
    half_angle_deg: float = 60.0
    azimuth_range_deg: tuple = (120.0, 240.0)
    label: str = "table side (posterior, supine patient)"

    @classmethod
    def for_patient_position(cls, position: str) -> "EntryExclusion | None":
        """Default exclusion for 'supine' (posterior), 'prone' (anterior), or None for 'none'."""
        p = (position or "none").lower()
        if p == "supine":
            return cls()
        if p == "prone":
            return cls(direction_ras=(0.0, 1.0, 0.0), label="table side (anterior, prone patient)")
        if p in ("none", "off"):
            return None
        raise TrajectoryPlannerError(f"patient position '{position}' is unknown; use supine, prone or none")

    def excluded(self, target_ras, entries_ras) -> np.ndarray:
        """Boolean (N,) for entries (N, 3) RAS relative to one target (3,) RAS."""
        u = np.asarray(entries_ras, float) - np.asarray(target_ras, float)
        u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-9)
        if self.kind == "cone":
            d = np.asarray(self.direction_ras, float)
            d = d / np.linalg.norm(d)
            return u @ d > math.cos(math.radians(self.half_angle_deg))
        if self.kind == "azimuth":
            az = np.degrees(np.arctan2(u[:, 0], u[:, 1])) % 360.0
            a0, a1 = (float(v) % 360.0 for v in self.azimuth_range_deg)
            return (az >= a0) & (az <= a1) if a0 <= a1 else (az >= a0) | (az <= a1)
        raise TrajectoryPlannerError(f"entry exclusion kind '{self.kind}' is unknown; use 'cone' or 'azimuth'")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "direction_ras": list(map(float, self.direction_ras)),
                "half_angle_deg": float(self.half_angle_deg),
                "azimuth_range_deg": list(map(float, self.azimuth_range_deg)), "label": self.label}


@dataclass
class RiskModel:
    """Everything the engine needs about the patient, on one grid (``grid``: CT HU, RAS geometry)."""

    grid: RasVolume
    body: np.ndarray
    skin: np.ndarray
    structures: list[RiskStructure] = field(default_factory=list)
    exclusion: EntryExclusion | None = None

    def structure(self, name: str) -> RiskStructure:
        for s in self.structures:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"structures": [s.to_dict() for s in self.structures],
                "body_voxels": int(np.count_nonzero(self.body)), "skin_voxels": int(np.count_nonzero(self.skin)),
                "entry_exclusion": None if self.exclusion is None else self.exclusion.to_dict()}


# ------------------------------------------------------------------------------------------------
def _sitk_mask(mask: np.ndarray, spacing):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8, copy=False))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def _keep_components(mask: np.ndarray, spacing, min_mm3: float = 0.0, largest_only: bool = False,
                     threads: int | None = None, keep_touching: tuple | None = None) -> np.ndarray:
    """Connected components (SimpleITK's face connectivity) of at least ``min_mm3`` (mm³) kept, as a mask.

    ``keep_touching``: (lo, hi) flags per (k, j, i) axis; components touching a flagged face of the array are
    kept whatever their size (the array is a window of a larger volume: the component may continue outside).
    """
    if not mask.any():
        return mask.copy()
    # components never leave the mask's bounding box: label there; a box face touches an array face only
    # where they coincide
    box = bbox_slices(mask)
    if any(b.stop - b.start < n for b, n in zip(box, mask.shape)):
        if keep_touching is not None:
            keep_touching = tuple((lo and b.start == 0, hi and b.stop == n)
                                  for (lo, hi), b, n in zip(keep_touching, box, mask.shape))
        out = np.zeros(mask.shape, bool)
        out[box] = _keep_components(mask[box], spacing, min_mm3, largest_only, threads, keep_touching)
        return out
    mask = np.ascontiguousarray(mask, bool)
    img, lab, n = label_components(mask, threads)
    # sizes from the structure voxels only (structures are sparse): no pass over a whole label array
    idx = np.flatnonzero(mask)
    lv = lab.ravel()[idx]
    counts = np.bincount(lv, minlength=n + 1)
    counts[0] = 0
    if largest_only:
        keep = np.zeros(len(counts), bool)
        keep[int(np.argmax(counts))] = True
    else:
        keep = counts >= (int(math.ceil(min_mm3 / float(np.prod(spacing)))) if min_mm3 > 0 else 1)
        keep[0] = False
    if keep_touching is not None:
        for ax, (lo_face, hi_face) in enumerate(keep_touching):
            for flag, i in ((lo_face, 0), (hi_face, -1)):
                if flag:
                    keep[np.unique(np.take(lab, i, axis=ax))] = True
        keep[0] = False
    out = np.zeros(mask.shape, bool)
    out.ravel()[idx[keep[lv]]] = True
    del lab, img
    return out


def body_mask(ct: RasVolume, body_hu: float = BODY_HU_THRESHOLD, table_opening_mm: float = 0.0,
              threads: int | None = None) -> np.ndarray:
    """Patient body (bool, k, j, i): the core's :func:`SmartBiopsyCoreLib.body.body_mask_array`."""
    try:
        return body_mask_array(ct, body_hu, table_opening_mm, threads)
    except InputDataError as exc:
        raise TrajectoryPlannerError(str(exc)) from None


def _shifted(ax: int, n: int, sh: int) -> tuple:
    """(destination, source) index tuples pairing each voxel with its neighbour ``sh`` (+-1) along ``ax``."""
    dst = [slice(None)] * 3
    src = [slice(None)] * 3
    dst[ax] = slice(0, n - 1) if sh > 0 else slice(1, n)
    src[ax] = slice(1, n) if sh > 0 else slice(0, n - 1)
    return tuple(dst), tuple(src)


def _erode6(mask: np.ndarray, edge: bool = True) -> np.ndarray:
    """Erosion by the 6-neighbour cross; ``edge``: voxels beyond the array take the edge value (else False)."""
    out = np.array(mask, bool, copy=True)
    for ax in range(3):
        n = mask.shape[ax]
        for sh in (-1, 1):
            dst, src = _shifted(ax, n, sh)
            out[dst] &= mask[src]
        if not edge:  # the neighbour beyond each face is outside
            face = [slice(None)] * 3
            for i in (0, n - 1):
                face[ax] = i
                out[tuple(face)] = False
    return out


def _dilate6(mask: np.ndarray) -> np.ndarray:
    """Dilation by the 6-neighbour cross (nothing beyond the array)."""
    out = np.array(mask, bool, copy=True)
    for ax in range(3):
        for sh in (-1, 1):
            dst, src = _shifted(ax, mask.shape[ax], sh)
            out[dst] |= mask[src]
    return out


def skin_mask(body: np.ndarray) -> np.ndarray:
    """Body voxels with at least one 6-neighbour outside the body; crop faces do not count as outside."""
    return body & ~_erode6(body, edge=True)


def auto_structures(ct: RasVolume, body: np.ndarray, bone_hu: float = 200.0, gas_hu: float = -400.0,
                    min_bone_mm3: float = 50.0, min_gas_mm3: float = 50.0, margins: dict | None = None,
                    threads: int | None = None, region: tuple | None = None,
                    names: tuple = ("bone", "gas")) -> list[RiskStructure]:
    """Bone and internal gas from CT HU, cleaned; margins from ``margins`` or the defaults.

    ``names``: which of the two to build (a user label map replacing one makes it unnecessary).

    ``region``: (lo, hi) k, j, i box; the structures are then built only there (zero elsewhere). They equal
    the whole-grid ones inside the box, except that components cut by the box face are kept whatever their
    size (conservative: the part outside may make them large enough).
    """
    margins = {k.lower(): float(v) for k, v in (margins or {}).items()}
    spacing = ct.spacing
    a = np.asarray(ct.array)
    shape = a.shape
    box, inner, touching = _work_box(shape, region)
    a, body_b = a[box], body[box]
    bone = gas = None
    if "bone" in names:
        bone = (a > bone_hu) & body_b
        bone = _keep_components(bone, spacing, min_bone_mm3, threads=threads, keep_touching=touching)
    if "gas" in names:
        gas = (a < gas_hu) & body_b
    if gas is not None and gas.any():
        # opening with the 6-neighbour cross, on the gas's box grown by one voxel (the erosion sees the same
        # neighbours there, the array's edge value at its faces; the dilation cannot leave that box)
        gb = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(bbox_slices(gas), gas.shape))
        g = gas[gb]
        gas[gb] = _dilate6(_erode6(g, edge=True)) & g
        gas = _keep_components(gas, spacing, min_gas_mm3, threads=threads, keep_touching=touching)
    out = []
    for name, mask in (("bone", bone), ("gas", gas)):
        if mask is None:
            continue
        if region is not None:
            mask = _embed(mask, shape, box, inner)
        if mask.any():
            out.append(RiskStructure(name, mask, margins.get(name, default_margin(name)), "ct"))
    if logger.isEnabledFor(logging.INFO):
        logger.info("automatic risk structures: %s",
                    ", ".join(f"{s.name} {np.count_nonzero(s.mask)} vox" for s in out) or "none")
    return out


def _work_box(shape, region, grow: int = 2):
    """(slices of the region grown by ``grow`` voxels, slices of the region inside them, touching flags)."""
    if region is None:
        return (slice(None),) * 3, (slice(None),) * 3, None
    lo = np.clip(np.asarray(region[0], int), 0, shape)
    hi = np.clip(np.asarray(region[1], int), lo, shape)
    glo, ghi = np.maximum(lo - grow, 0), np.minimum(hi + grow, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(glo, ghi))
    inner = tuple(slice(int(a - g), int(b - g)) for a, b, g in zip(lo, hi, glo))
    touching = tuple((bool(g > 0), bool(h < n)) for g, h, n in zip(glo, ghi, shape))
    return box, inner, touching


def _embed(sub: np.ndarray, shape, box, inner) -> np.ndarray:
    """Full-grid mask holding ``sub`` (computed on ``box``) inside the region ``inner`` of it, False elsewhere."""
    full = np.zeros(shape, bool)
    part = sub[inner]
    if not part.any():
        return full
    bb = bbox_slices(part)  # written only on the structure's box (fewer fresh pages)
    full[tuple(slice(b.start + i.start + q.start, b.start + i.start + q.stop)
               for b, i, q in zip(box, inner, bb))] = part[bb]
    return full


def structures_from_labelmap(labels: RasVolume, grid: RasVolume, names: dict[int, str] | None = None,
                             margins: dict | None = None, region: tuple | None = None) -> list[RiskStructure]:
    """User structures from a label map (any grid; resampled nearest-neighbour onto ``grid``).

    ``names`` maps label value -> structure name; without it every non-zero value becomes 'label_<v>'.
    ``region``: (lo, hi) k, j, i box of ``grid``; the masks are then filled only there (False elsewhere).
    """
    margins = {k.lower(): float(v) for k, v in (margins or {}).items()}
    lab = labels if labels.same_grid(grid) else resample(labels, grid, None, order=0)
    arr = np.asarray(lab.array)
    box, inner, _ = _work_box(arr.shape, region, grow=0)
    sub = arr[box]
    values = sorted(names) if names else [int(v) for v in np.unique(sub) if v != 0]
    out = []
    eq = np.empty(sub.shape, bool)  # one comparison buffer; each mask is written only on its label's box
    for v in values:
        name = names[v] if names else f"label_{v}"
        np.equal(sub, v, out=eq)
        kk = np.flatnonzero(eq.any(axis=(1, 2)))
        if len(kk) == 0:
            logger.info("risk label %s (%d) not present in the planning region", name, v)
            continue
        plane = eq[kk[0]:kk[-1] + 1].any(axis=0)
        jj, ii = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        lb = (slice(int(kk[0]), int(kk[-1]) + 1), slice(int(jj[0]), int(jj[-1]) + 1), slice(int(ii[0]), int(ii[-1]) + 1))
        mask = np.zeros(arr.shape, bool)
        mask[tuple(slice((b.start or 0) + q.start, (b.start or 0) + q.stop) for b, q in zip(box, lb))] = eq[lb]
        out.append(RiskStructure(name, mask, margins.get(name.lower(), default_margin(name)), "user"))
    return out


def crop_volume(vol: RasVolume, lo_kji, hi_kji) -> RasVolume:
    """Sub-volume [lo, hi) in (k, j, i) indices with the matching IJK->RAS (a view of the array)."""
    lo = np.asarray(lo_kji, int)
    hi = np.asarray(hi_kji, int)
    arr = vol.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    m = vol.ijk_to_ras.copy()
    m[:3, 3] = vol.ijk_to_ras_points(lo[::-1].astype(float))[0]
    return RasVolume(arr, m, vol.name, dict(vol.meta))


def check_hounsfield(ct: RasVolume) -> None:
    """Refuse an empty CT or one whose values are not Hounsfield units."""
    a = np.asarray(ct.array)
    if a.size == 0:
        raise TrajectoryPlannerError("the CT is empty; load a planning CT with at least one slice")
    integer = np.issubdtype(a.dtype, np.integer)
    if float(a.min() if integer else np.nanmin(a)) >= 0 and float(a.max() if integer else np.nanmax(a)) < 100:
        raise TrajectoryPlannerError("the CT values do not look like Hounsfield units (no air below 0); load the CT in HU")


def build_risk_model(ct: RasVolume, labelmaps: list[tuple[RasVolume, dict | None]] | None = None,
                     margins: dict | None = None, exclusion: EntryExclusion | None = None,
                     auto: bool = True, body_hu: float = BODY_HU_THRESHOLD, bone_hu: float = 200.0, gas_hu: float = -400.0,
                     table_opening_mm: float = 0.0, threads: int | None = None, region: tuple | None = None,
                     body: np.ndarray | None = None, skin: np.ndarray | None = None) -> RiskModel:
    """Body, skin, automatic and user structures on ``ct``'s grid (pass a cropped CT to save time).

    A user structure whose name equals an automatic one ('bone', 'gas') replaces it. ``region``: (lo, hi)
    k, j, i box where structures are needed (the planner passes the box its paths can run in, grown by the
    distance cap); structures are built only there. ``body``, ``skin``: the body mask and its skin
    (:func:`skin_mask`) when already computed.
    """
    check_hounsfield(ct)
    if body is None:
        body = body_mask(ct, body_hu, table_opening_mm, threads)
    if skin is None:
        skin = skin_mask(body)
    user: list[RiskStructure] = []
    for lm, names in labelmaps or []:
        user += structures_from_labelmap(lm, ct, names, margins, region)
    user_names = {s.name for s in user}
    wanted = tuple(n for n in ("bone", "gas") if n not in user_names)  # a user structure replaces its namesake
    structures = auto_structures(ct, body, bone_hu, gas_hu, margins=margins, threads=threads,
                                 region=region, names=wanted) if auto and wanted else []
    structures = [s for s in structures if s.name not in user_names] + user
    return RiskModel(ct, body, skin, structures, exclusion)
