"""Image geometry in Slicer's world frame (RAS, millimetres): the one place where LPS <-> RAS happens.

DICOM, ITK and SimpleITK describe physical space in LPS; Slicer's MRML and every function of this
project use RAS. ``RasVolume`` is the project's plain in-memory volume: a numpy array in MRML's
(k, j, i) order (slice, row, column, exactly as ``slicer.util.arrayFromVolume`` returns it) plus the
4x4 IJK->RAS matrix of ``vtkMRMLVolumeNode``. Conversions to and from SimpleITK live here and nowhere
else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: diag(-1, -1, 1): flips x and y; its own inverse (LPS -> RAS and RAS -> LPS).
LPS_TO_RAS_3 = np.diag([-1.0, -1.0, 1.0])
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras_points(points_lps: np.ndarray) -> np.ndarray:
    """Convert points (N, 3) or (3,) from LPS to RAS (mm)."""
    p = np.asarray(points_lps, dtype=float)
    return p * np.array([-1.0, -1.0, 1.0])


def ras_to_lps_points(points_ras: np.ndarray) -> np.ndarray:
    """Convert points (N, 3) or (3,) from RAS to LPS (mm)."""
    return lps_to_ras_points(points_ras)


def lps_to_ras_matrix(matrix_lps: np.ndarray) -> np.ndarray:
    """Express a 4x4 homogeneous transform acting in LPS as the same transform acting in RAS."""
    m = np.asarray(matrix_lps, dtype=float)
    return LPS_TO_RAS @ m @ LPS_TO_RAS


def ras_to_lps_matrix(matrix_ras: np.ndarray) -> np.ndarray:
    """Express a 4x4 homogeneous transform acting in RAS as the same transform acting in LPS."""
    return lps_to_ras_matrix(matrix_ras)


def ijk_to_ras_from_lps_geometry(origin_lps, spacing, direction_lps) -> np.ndarray:
    """IJK->RAS 4x4 from ITK/DICOM geometry (origin and 3x3 direction cosines in LPS, spacing in mm)."""
    d = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS_3 @ d @ np.diag(np.asarray(spacing, dtype=float))
    m[:3, 3] = LPS_TO_RAS_3 @ np.asarray(origin_lps, dtype=float)
    return m


def lps_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray):
    """Inverse of :func:`ijk_to_ras_from_lps_geometry`: (origin_lps, spacing, direction_lps 3x3)."""
    m = np.asarray(ijk_to_ras, dtype=float)
    a = LPS_TO_RAS_3 @ m[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("IJK->RAS matrix has a zero-length axis; the volume geometry is invalid")
    direction = a / spacing
    origin = LPS_TO_RAS_3 @ m[:3, 3]
    return origin, spacing, direction


@dataclass
class RasVolume:
    """A scalar volume: ``array[k, j, i]`` and its IJK->RAS matrix (mm).

    ``meta`` carries free-form facts (series description, acquisition time, b-value, units).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = "volume"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.array = np.asarray(self.array)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=float)
        if self.array.ndim != 3:
            raise ValueError(f"volume '{self.name}' must be 3-D, got shape {self.array.shape}")
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"volume '{self.name}' IJK->RAS must be 4x4")

    # geometry -----------------------------------------------------------------------------------
    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size (i, j, k) in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def origin_ras(self) -> np.ndarray:
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def direction_ras(self) -> np.ndarray:
        """3x3 direction cosines (columns are the i, j, k axes) in RAS."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.ijk_to_ras[:3, :3])))

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) indices (N, 3) -> RAS (N, 3) mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=float))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """RAS (N, 3) mm -> continuous (i, j, k) indices (N, 3)."""
        ras = np.atleast_2d(np.asarray(ras, dtype=float))
        inv = self.ras_to_ijk
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def kji_to_ras_points(self, kji: np.ndarray) -> np.ndarray:
        """Array indices (k, j, i) (N, 3) -> RAS (N, 3) mm."""
        kji = np.atleast_2d(np.asarray(kji, dtype=float))
        return self.ijk_to_ras_points(kji[:, ::-1])

    def voxel_centres_ras(self, mask: np.ndarray) -> np.ndarray:
        """RAS coordinates (N, 3) of the voxels where ``mask`` is true."""
        return self.kji_to_ras_points(np.argwhere(mask))

    def bounds_ras(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned (min, max) RAS corners of the voxel-centre grid."""
        k, j, i = self.array.shape
        corners = np.array([[a, b, c] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)], float)
        ras = self.ijk_to_ras_points(corners)
        return ras.min(axis=0), ras.max(axis=0)

    def same_grid(self, other: "RasVolume", tol: float = 1e-4) -> bool:
        return self.array.shape == other.array.shape and np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=tol)

    def with_array(self, array: np.ndarray, name: str | None = None, **meta) -> "RasVolume":
        """A volume on the same grid with new voxel values."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape}")
        m = dict(self.meta)
        m.update(meta)
        return RasVolume(array, self.ijk_to_ras.copy(), name or self.name, m)

    # SimpleITK ----------------------------------------------------------------------------------
    def to_sitk(self):
        """SimpleITK image (LPS physical space) of the same voxels and geometry."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        origin, spacing, direction = lps_geometry_from_ijk_to_ras(self.ijk_to_ras)
        img.SetOrigin(tuple(float(v) for v in origin))
        img.SetSpacing(tuple(float(v) for v in spacing))
        img.SetDirection(tuple(float(v) for v in direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, image, name: str = "volume", meta: dict | None = None) -> "RasVolume":
        """From a 3-D SimpleITK image (LPS) to RAS; 2-D images become one-slice volumes."""
        import SimpleITK as sitk

        if image.GetDimension() == 2:
            image = sitk.JoinSeries(image)
        if image.GetDimension() != 3:
            raise ValueError(f"'{name}': only 3-D scalar images are supported (got {image.GetDimension()}-D)")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"'{name}': multi-component images are not supported here")
        arr = sitk.GetArrayFromImage(image)
        m = ijk_to_ras_from_lps_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        return cls(arr, m, name, dict(meta or {}))


def make_grid(origin_ras, spacing, shape_kji, direction_ras=None) -> np.ndarray:
    """IJK->RAS 4x4 for an (optionally oriented) grid; ``spacing`` is (i, j, k) mm."""
    d = np.eye(3) if direction_ras is None else np.asarray(direction_ras, float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(np.asarray(spacing, float))
    m[:3, 3] = np.asarray(origin_ras, float)
    return m


def resample(moving: RasVolume, reference: RasVolume, moving_to_reference: np.ndarray | None = None,
             order: int = 1, fill: float = 0.0) -> RasVolume:
    """Resample ``moving`` onto ``reference``'s grid.

    ``moving_to_reference`` is the 4x4 RAS transform that maps points of the moving image's world
    into the reference's world (the MRML "transform to parent" of the moving node). ``order``: 0 nearest
    neighbour, 1 linear, 3 B-spline. Returns a volume on the reference grid (moving dtype for order 0,
    float32 otherwise).
    """
    import SimpleITK as sitk

    mov = moving.to_sitk()
    ref = sitk.Image([int(s) for s in reference.array.shape[::-1]], sitk.sitkUInt8)
    o, s, d = lps_geometry_from_ijk_to_ras(reference.ijk_to_ras)
    ref.SetOrigin(tuple(o)); ref.SetSpacing(tuple(s)); ref.SetDirection(tuple(d.ravel()))
    tx = sitk.AffineTransform(3)
    if moving_to_reference is not None:
        # ITK resampling needs the transform from output (reference) points to input (moving) points.
        inv_lps = ras_to_lps_matrix(np.linalg.inv(np.asarray(moving_to_reference, float)))
        tx.SetMatrix(tuple(inv_lps[:3, :3].ravel()))
        tx.SetTranslation(tuple(inv_lps[:3, 3]))
    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    out_type = mov.GetPixelID() if order == 0 else sitk.sitkFloat32
    res = sitk.Resample(mov, ref, tx, interp, float(fill), out_type)
    return RasVolume(sitk.GetArrayFromImage(res), reference.ijk_to_ras.copy(), moving.name, dict(moving.meta))


def vtk_matrix(matrix: np.ndarray):
    """A ``vtkMatrix4x4`` holding the 4x4 ``matrix`` (for MRML IJK->RAS and transform-to-parent setters)."""
    import vtk

    m = np.asarray(matrix, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, float(m[r, c]))
    return vm


def array_from_vtk_matrix(vm) -> np.ndarray:
    """The 4x4 numpy array of a ``vtkMatrix4x4``."""
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def perpendicular(axis) -> np.ndarray:
    """A unit vector perpendicular to ``axis`` (deterministic: built from the world axis least aligned with it).
    Raises InputDataError for a zero-length or non-finite axis."""
    from SmartBiopsyCoreLib.errors import InputDataError

    a = np.asarray(axis, float)
    n = float(np.linalg.norm(a))
    if not np.isfinite(n) or n == 0:
        raise InputDataError("a direction of zero length was given; entry and target must be different points")
    a = a / n
    u = np.cross(a, np.eye(3)[int(np.argmin(np.abs(a)))])
    return u / np.linalg.norm(u)
