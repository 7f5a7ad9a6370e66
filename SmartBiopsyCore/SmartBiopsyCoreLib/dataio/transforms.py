"""The MRI->CT registration transform on disk: ONE JSON schema, plus ITK files as Slicer writes them.

JSON schema ``smartbiopsy.transform/1`` (every key required; unknown keys are refused)::

    {
      "schema": "smartbiopsy.transform/1",
      "from_frame": "MRI",            # the frame whose points the matrix maps ...
      "to_frame": "CT",               # ... into this frame
      "space": "RAS",                 # Slicer world coordinates (never LPS)
      "units": "mm",
      "matrix_mri_to_ct_ras": [[...4x4...]],   # p_ct = M @ p_mri (homogeneous), the MRML "transform to parent"
      "source": "capsule fusion"      # free text: who made it
    }

ITK transform files (``.tfm``/``.txt``/``.h5``) follow ITK's convention (LPS, fixed CT points -> moving MRI
points), as Slicer writes a linear transform node; :func:`read_itk_transform` turns them back into the
RAS MRI->CT matrix. Anything else (a bare matrix, other key names, another frame or direction) is refused
with a sentence: a matrix in the wrong frame or direction would move every target.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from SmartBiopsyCoreLib.errors import InputDataError
from SmartBiopsyCoreLib.geometry import lps_to_ras_matrix, ras_to_lps_matrix
from SmartBiopsyCoreLib.dataio import jsonio

SCHEMA = "smartbiopsy.transform/1"
MATRIX_KEY = "matrix_mri_to_ct_ras"
_KEYS = {"schema", "from_frame", "to_frame", "space", "units", MATRIX_KEY, "source"}
ITK_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".mat")


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def validate_transform(matrix, what: str = "MRI->CT transform") -> np.ndarray:
    """Check a 4x4 RAS transform is finite, affine, invertible, not mirroring and (nearly) rigid; return it."""
    try:
        m = np.asarray(matrix, dtype=float)
    except (TypeError, ValueError):
        raise InputDataError(f"the {what} is not a 4x4 matrix of numbers; check the transform file") from None
    if m.shape == (3, 4):
        m = np.vstack([m, [0, 0, 0, 1]])
    if m.shape != (4, 4):
        raise InputDataError(f"the {what} must be a 4x4 matrix (got shape {m.shape}); check the transform file")
    if not np.all(np.isfinite(m)):
        raise InputDataError(f"the {what} contains NaN or infinite values; redo the registration")
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        raise InputDataError(f"the {what} is not affine (last row must be 0 0 0 1); check the transform file")
    r = m[:3, :3]
    det = np.linalg.det(r)
    if abs(det) < 1e-9:
        raise InputDataError(f"the {what} is singular and cannot map points; redo the registration")
    if det < 0:
        raise InputDataError(f"the {what} mirrors space (negative determinant), typically an LPS/RAS mix-up; "
                             "export the registration as a RAS matrix")
    sv = np.linalg.svd(r, compute_uv=False)
    if sv.max() > 1.1 or sv.min() < 0.9:
        raise InputDataError(f"the {what} scales space by {sv.min():.2f}-{sv.max():.2f}; the MRI->CT registration "
                             "must be rigid - check that the matrix is in mm and RAS")
    return m


# ------------------------------------------------------------------------------------------------
# JSON
# ------------------------------------------------------------------------------------------------
def transform_document(matrix_mri_to_ct_ras, source: str) -> dict:
    """The schema's JSON document for a 4x4 RAS MRI->CT matrix (validated first)."""
    m = validate_transform(matrix_mri_to_ct_ras)
    return {"schema": SCHEMA, "from_frame": "MRI", "to_frame": "CT", "space": "RAS", "units": "mm",
            MATRIX_KEY: np.asarray(m, float).tolist(), "source": str(source)}


def write_transform_json(path, matrix_mri_to_ct_ras, source: str) -> Path:
    """Write ``path`` in the ``smartbiopsy.transform/1`` schema; returns the path."""
    path = Path(path)
    path.write_text(jsonio.dumps(transform_document(matrix_mri_to_ct_ras, source), indent=1), encoding="utf-8")
    return path


def parse_transform_document(data, where: str = "the transform file") -> np.ndarray:
    """4x4 RAS MRI->CT matrix from a parsed ``smartbiopsy.transform/1`` document; anything else is refused."""
    hint = (f"write it with 'smartbiopsy register' or in the {SCHEMA} schema (from_frame MRI, to_frame CT, "
            f"space RAS, units mm, {MATRIX_KEY})")
    if not isinstance(data, dict):
        raise InputDataError(f"{where} is not a {SCHEMA} document (a bare matrix does not say its frames); {hint}")
    if data.get("schema") != SCHEMA:
        raise InputDataError(f"{where} has schema {data.get('schema')!r}, not {SCHEMA!r}; {hint}")
    jsonio.require_exact_keys(data, _KEYS, where, f"; {hint}", f"; {hint}")
    frames = (data["from_frame"], data["to_frame"], data["space"], data["units"])
    if frames != ("MRI", "CT", "RAS", "mm"):
        raise InputDataError(f"{where} maps {data['from_frame']} to {data['to_frame']} in {data['space']} "
                             f"{data['units']}; SmartBiopsy needs MRI to CT in RAS mm (invert or convert it first)")
    return validate_transform(data[MATRIX_KEY], f"MRI->CT transform in {where}")


# ------------------------------------------------------------------------------------------------
# ITK files (Slicer's linear transform files)
# ------------------------------------------------------------------------------------------------
def itk_from_ras(mri_to_ct_ras: np.ndarray):
    """SimpleITK AffineTransform (LPS, maps CT points to MRI points, as ITK resampling/registration use)."""
    import SimpleITK as sitk

    m = ras_to_lps_matrix(np.linalg.inv(np.asarray(mri_to_ct_ras, float)))
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(m[:3, :3].ravel()))
    tx.SetTranslation(tuple(m[:3, 3]))
    return tx


def itk_linear_to_matrix(tx) -> np.ndarray:
    """4x4 LPS matrix of a SimpleITK linear transform (any of Euler/Versor/Similarity/Affine, with centre)."""
    import SimpleITK as sitk

    if tx.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(tx)
        out = np.eye(4)
        for i in range(comp.GetNumberOfTransforms()):  # ITK applies the last-added transform first
            out = out @ itk_linear_to_matrix(comp.GetNthTransform(i))
        return out
    t = tx.Downcast() if hasattr(tx, "Downcast") else tx
    if not hasattr(t, "GetMatrix"):
        raise InputDataError(f"a {tx.GetName()} is not a linear transform; only linear transforms can be exchanged as 4x4")
    mat = np.array(t.GetMatrix(), float).reshape(3, 3)
    c = np.array(t.GetCenter(), float)
    trans = np.array(t.GetTranslation(), float)
    m = np.eye(4)
    m[:3, :3] = mat
    m[:3, 3] = trans + c - mat @ c
    return m


def ras_from_itk(tx) -> np.ndarray:
    """4x4 RAS MRI->CT matrix from a SimpleITK linear transform (LPS, CT points -> MRI points)."""
    return np.linalg.inv(lps_to_ras_matrix(itk_linear_to_matrix(tx)))


def write_itk_transform(mri_to_ct_ras: np.ndarray, path: str) -> None:
    """Write the transform as an ITK file (.tfm/.txt/.h5) in LPS with ITK's fixed(CT)->moving(MRI) convention.

    This is what Slicer writes for a linear transform node of the MRI under which it is placed
    (Slicer stores the "transform from parent" in ITK files); reading it back with :func:`read_itk_transform`
    gives the same RAS matrix.
    """
    import SimpleITK as sitk

    sitk.WriteTransform(itk_from_ras(mri_to_ct_ras), str(path))


def read_itk_transform(path: str) -> np.ndarray:
    """Inverse of :func:`write_itk_transform`: the 4x4 RAS MRI->CT matrix."""
    import SimpleITK as sitk

    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise InputDataError(f"the transform file {path} cannot be read ({first}); export the registration again") from None
    return ras_from_itk(tx)


# ------------------------------------------------------------------------------------------------
# the one loader
# ------------------------------------------------------------------------------------------------
def load_mri_to_ct(path) -> np.ndarray:
    """4x4 RAS MRI->CT matrix from a ``smartbiopsy.transform/1`` JSON file or an ITK transform file."""
    path = str(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise InputDataError(f"the transform file {path} does not exist; check the path")
    if path.lower().endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputDataError(f"the transform file {path} is not valid JSON ({exc.__class__.__name__}); "
                                 "export the registration again") from None
        return parse_transform_document(data, f"the transform file {name}")
    if not path.lower().endswith(ITK_SUFFIXES):
        raise InputDataError(f"the transform file {name} is neither {SCHEMA} JSON nor an ITK transform "
                             f"({', '.join(ITK_SUFFIXES)}); export the registration again")
    return validate_transform(read_itk_transform(path), f"MRI->CT transform in {name}")
