"""A robot's fiducial frame in a simulated CT (tests, benchmarks, the demo). Everything here is simulated.

- :func:`render_frame` draws a frame model (tubes or spheres, robot frame mm) into a CT array at a known
  robot->CT pose, with supersampled partial volume over each voxel and its slice thickness.
- :func:`seeded_frame_pose` gives the pose of the frame near the patient for a seed (anterior to the
  abdomen, tilted and turned a little, as a frame mounted on a robot arm over the patient).
- :func:`calibration_ct` builds a light CT (abdomen cross-section, ribs, table, the frame, optional metal
  streaks, noise, a field of view that can cut the frame) for calibration tests and benchmarks, on any pixel
  size and slice thickness.
All coordinates RAS mm; ``robot_to_ct`` maps robot-frame points to CT RAS points.
"""
from __future__ import annotations

import math

import numpy as np

from SmartBiopsyCoreLib.fiducial_frames.model import FrameModel
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid


def _rotation(axis, angle_rad) -> np.ndarray:
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1 - math.cos(angle_rad)) * (k @ k)


def seeded_frame_pose(seed: int, model: FrameModel, anchor_ras, max_tilt_deg: float = 15.0) -> np.ndarray:
    """4x4 robot->CT RAS pose: the frame centre at ``anchor_ras`` + a seeded offset of up to 10 mm, its Z axis
    near the patient's S axis (tilted up to ``max_tilt_deg``), turned by a seeded angle about it."""
    rng = np.random.default_rng(10_000 + int(seed))
    yaw = _rotation((0, 0, 1), math.radians(rng.uniform(-180.0, 180.0)))
    tilt_axis = np.array([rng.normal(), rng.normal(), 0.0])
    tilt = _rotation(tilt_axis, math.radians(rng.uniform(3.0, max_tilt_deg)))
    r = tilt @ yaw
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = np.asarray(anchor_ras, float) + rng.uniform(-10.0, 10.0, 3) - r @ model.centre
    return m


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, clamp: bool = True) -> np.ndarray:
    ab = b - a
    t = ((p - a) @ ab) / float(ab @ ab)
    if clamp:
        t = np.clip(t, 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def render_frame(hu: np.ndarray, grid: RasVolume, model: FrameModel, robot_to_ct: np.ndarray,
                 slice_profile_mm: float | None = None, samples: int = 3) -> np.ndarray:
    """Draw the frame into ``hu`` (float array on ``grid``, modified in place and returned).

    Each voxel near a fiducial gets the occupancy-weighted mix of its value and the model's nominal HU; the
    occupancy is sampled on ``samples``^3 points over the voxel, along k over ``slice_profile_mm`` (default:
    the slice spacing), so thick slices get their partial volume.
    """
    m = np.asarray(robot_to_ct, float)
    sp = grid.spacing
    prof = float(slice_profile_mm or sp[2])
    if model.tubes:
        shapes = [("tube", m[:3, :3] @ t.start + m[:3, 3], m[:3, :3] @ t.end + m[:3, 3], t.radius_mm) for t in model.tubes]
    else:
        shapes = [("sphere", m[:3, :3] @ s.centre + m[:3, 3], None, s.radius_mm) for s in model.spheres]
    off = (np.arange(samples) + 0.5) / samples - 0.5
    sub = np.stack(np.meshgrid(off * prof / sp[2], off, off, indexing="ij"), -1).reshape(-1, 3)  # k, j, i fractions
    half_diag = 0.5 * float(np.linalg.norm([sp[0], sp[1], max(sp[2], prof)]))
    for kind, a, b, r in shapes:
        lo = np.minimum(a, a if b is None else b) - r - 2 * half_diag
        hi = np.maximum(a, a if b is None else b) + r + 2 * half_diag
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = grid.ras_to_ijk_points(corners)
        i0, j0, k0 = np.maximum(np.floor(ijk.min(0)).astype(int), 0)
        i1, j1, k1 = np.minimum(np.ceil(ijk.max(0)).astype(int) + 1, np.array(grid.shape_kji)[::-1])
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            continue
        kk, jj, ii = np.mgrid[k0:k1, j0:j1, i0:i1]
        kji = np.stack([kk.ravel(), jj.ravel(), ii.ravel()], 1).astype(float)
        centres = grid.kji_to_ras_points(kji)
        d = np.linalg.norm(centres - a, axis=1) if b is None else _segment_distance(centres, a, b)
        near = d <= r + half_diag
        if not near.any():
            continue
        kji_n = kji[near]
        pts = grid.kji_to_ras_points((kji_n[:, None, :] + sub[None]).reshape(-1, 3)).reshape(len(kji_n), len(sub), 3)
        if b is None:
            ds = np.linalg.norm(pts - a, axis=-1)
        else:
            ab = b - a
            t = ((pts - a) @ ab) / float(ab @ ab)
            inside_len = (t >= 0.0) & (t <= 1.0)  # flat tube ends
            ds = np.where(inside_len, np.linalg.norm(pts - (a + t[..., None] * ab), axis=-1), np.inf)
        occ = (ds <= r).mean(1).astype(np.float32)
        idx = tuple(kji_n.astype(int).T)
        hu[idx] = hu[idx] * (1.0 - occ) + occ * model.hu_nominal
    return hu


def _metal_streaks(hu: np.ndarray, grid: RasVolume, centre_ras, rng, amplitude: float = 900.0,
                   n_rays: int = 14, slices: int = 4) -> None:
    """Streak artefacts of a small metal object at ``centre_ras``: alternating bright/dark rays in a few slices."""
    c = grid.ras_to_ijk_points(np.asarray(centre_ras, float)[None])[0]
    nk, nj, ni = hu.shape
    jj, ii = np.mgrid[0:nj, 0:ni]
    ang = np.arctan2((jj - c[1]) * grid.spacing[1], (ii - c[0]) * grid.spacing[0])
    rad = np.hypot((jj - c[1]) * grid.spacing[1], (ii - c[0]) * grid.spacing[0])
    pattern = np.zeros((nj, ni), np.float32)
    for q, th in enumerate(rng.uniform(-math.pi, math.pi, n_rays)):
        dth = np.angle(np.exp(1j * (ang - th)))
        width = 0.6 / np.maximum(rad, 1.0)
        pattern += (1 if q % 2 == 0 else -1) * amplitude * np.exp(-0.5 * (dth / width) ** 2) * np.exp(-rad / 120.0)
    pattern[rad < 2.5] = 3000.0  # the metal itself
    k0 = int(round(c[2]))
    for k in range(max(k0 - slices // 2, 0), min(k0 + slices - slices // 2, nk)):
        hu[k] += pattern


def calibration_ct(seed: int, model: FrameModel, *, pixel_mm: float = 0.8, slice_mm: float = 1.0,
                   noise_hu: float = 12.0, fov_cut_mm: float = 0.0, streaks: bool = False,
                   shape_ij: tuple[int, int] | None = None) -> tuple[RasVolume, np.ndarray]:
    """(simulated CT in HU, true robot->CT RAS pose) with the frame over a simulated abdomen.

    ``fov_cut_mm`` moves the superior edge of the scan this far into the frame (0: the frame is fully
    inside); ``streaks`` adds a metal clip with streak artefacts 15 mm from the frame; ``shape_ij`` sets the
    axial matrix (default: a 400 mm field of view).
    """
    rng = np.random.default_rng(20_000 + int(seed))
    body_a, body_b = rng.uniform(140, 165), rng.uniform(95, 110)
    anchor = np.array([rng.uniform(-40, 40), body_b + 65.0, rng.uniform(-15, 15)])
    pose = seeded_frame_pose(seed, model, anchor)
    corners = (pose[:3, :3] @ np.array([t.start for t in model.tubes] + [t.end for t in model.tubes]).T).T \
        if model.tubes else (pose[:3, :3] @ np.array([s.centre for s in model.spheres]).T).T
    corners = corners + pose[:3, 3]
    z_lo, z_hi = -60.0, corners[:, 2].max() + 25.0 - fov_cut_mm
    if fov_cut_mm > 0:
        z_hi = corners[:, 2].max() - fov_cut_mm
    nk = int(math.ceil((z_hi - z_lo) / slice_mm)) + 1
    ni, nj = shape_ij if shape_ij else (int(round(400.0 / pixel_mm)),) * 2
    spacing = (pixel_mm, pixel_mm, slice_mm)
    origin = (-(ni - 1) / 2 * pixel_mm, -(nj - 1) / 2 * pixel_mm + 50.0, z_lo)
    grid = RasVolume(np.zeros((nk, nj, ni), np.int16), make_grid(origin, spacing, (nk, nj, ni)), "CT")
    x = (origin[0] + np.arange(ni) * pixel_mm).astype(np.float32)[None, :]
    y = (origin[1] + np.arange(nj) * pixel_mm).astype(np.float32)[:, None]
    plane = np.full((nj, ni), -1000.0, np.float32)
    body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1.0
    plane[body] = -90.0
    plane[(x / (body_a - 15)) ** 2 + (y / (body_b - 15)) ** 2 <= 1.0] = 40.0
    plane[(x ** 2 + (y + body_b - 40) ** 2) <= 18.0 ** 2] = 700.0  # vertebra
    plane[(y < -body_b - 2) & (y > -body_b - 14) & (np.abs(x) < body_a)] = 150.0  # table
    hu = np.repeat(plane[None], nk, axis=0)
    z = origin[2] + np.arange(nk) * slice_mm
    ring = ((x / (body_a - 8)) ** 2 + (y / (body_b - 8)) ** 2 <= 1.0) & \
           ((x / (body_a - 14)) ** 2 + (y / (body_b - 14)) ** 2 > 1.0) & (y > -20)
    for k in np.nonzero((z % 38.0) < 9.0)[0]:
        hu[k][ring] = 650.0  # ribs
    render_frame(hu, grid, model, pose)
    if streaks:
        clip = corners.mean(0) + np.array([0.0, -(corners[:, 1].max() - corners[:, 1].min()) / 2 - 15.0, 0.0])
        _metal_streaks(hu, grid, clip, rng)
    hu += rng.normal(0.0, noise_hu, hu.shape).astype(np.float32)
    ct = grid.with_array(np.clip(np.round(hu), -1024, 3071).astype(np.int16), name="calibration CT (simulated)",
                         modality="CT", units="HU", simulated=True)
    return ct, pose
