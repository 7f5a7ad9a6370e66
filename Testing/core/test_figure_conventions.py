"""One image convention for every figure: radiological orientation (patient right on the image's left),
orientation letters and mm scale bars on image panels, one palette colour per habitat, planned notch tip and
target drawn apart (SmartBiopsyCoreLib.display, the report figures, the fusion QA and calibration pictures)."""
from __future__ import annotations

import numpy as np
import pytest

from SmartBiopsyCoreLib import palette
from SmartBiopsyCoreLib.display import (VIEW_FRAMES, direction_letters, display_axes, nice_length,
                                        orientation_letters, oriented_slice)
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid
from SmartBiopsyCoreLib.optional import available

needs_matplotlib = pytest.mark.skipif(not available("matplotlib"), reason="matplotlib is not installed here")

#: ijk -> RAS directions of the two common grid storages: RAS-ordered and DICOM's LPS-ordered.
GRIDS = {"ras-ordered": np.eye(3), "lps-ordered": np.diag([-1.0, -1.0, 1.0])}


def _marked_volume(direction, marker_ras=(30.0, 0.0, 0.0), n=(60, 50, 20), spacing=(1.5, 2.0, 3.0)):
    """A volume around RAS 0 (value 0) with a bright 12 mm cube (value 1000) at ``marker_ras``."""
    spacing = np.asarray(spacing, float)
    extent = (np.asarray(n) - 1) * spacing
    origin = -np.asarray(direction) @ (extent / 2)
    vol = RasVolume(np.zeros(n[::-1], np.float32), make_grid(origin, spacing, n[::-1], direction))
    kk, jj, ii = np.indices(vol.array.shape)
    ras = vol.ijk_to_ras_points(np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1)).reshape(vol.array.shape + (3,))
    vol.array[np.all(np.abs(ras - np.asarray(marker_ras)) <= 6.0, axis=-1)] = 1000.0
    return vol


def _render(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float) / 255.0


def test_orientation_letters_of_the_standard_views_are_radiological():
    assert orientation_letters(*VIEW_FRAMES["axial"]) == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert orientation_letters(*VIEW_FRAMES["coronal"]) == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert orientation_letters(*VIEW_FRAMES["sagittal"]) == {"left": "A", "right": "P", "top": "S", "bottom": "I"}


def test_orientation_letters_of_an_oblique_plane_name_the_nearest_directions():
    # a needle going from the patient's right-anterior towards the left-posterior, 10 deg caudal
    d = np.array([-np.cos(np.radians(30)), -np.sin(np.radians(30)), -np.tan(np.radians(10))])
    across = np.cross(d, [0, 0, 1.0])
    letters = orientation_letters(d / np.linalg.norm(d), across / np.linalg.norm(across))
    assert letters["left"] == "RA" and letters["right"] == "LP"   # 30 deg off the R-L axis: two letters
    assert direction_letters([1, 0.1, 0]) == "R"                    # 6 deg off: one letter
    assert direction_letters([0, 0, -2.0]) == "I" and direction_letters([0, 0, 0]) == ""
    assert letters["top"] == "PR" and letters["bottom"] == "AL"     # across: screen-down is d x S


def test_scale_bar_lengths_are_round_numbers():
    assert [nice_length(x) for x in (0.5, 3, 17, 24.9, 49, 120)] == [1.0, 2.0, 10.0, 20.0, 20.0, 100.0]


@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_slices_put_patient_right_on_the_image_left_whatever_the_voxel_order(grid):
    vol = _marked_volume(GRIDS[grid])
    for view in ("axial", "coronal"):
        s = oriented_slice(vol, [0.0, 0.0, 0.0], view)
        cols = np.nonzero(s.image.max(axis=0) > 500)[0]
        assert cols.size and cols.max() < s.image.shape[1] / 2, (grid, view)   # marker at R +30 mm: left half
        assert np.allclose(s.u, [-1, 0, 0]) and s.extent[0] < 0 < s.extent[1]
        # the display coordinates of the marker's RAS position fall inside its drawn pixels
        x = s.to_display([30.0, 0.0, 0.0], [0.0, 0.0, 0.0])[0, 0]
        col = (x - s.extent[0]) / (s.extent[1] - s.extent[0]) * s.image.shape[1]
        assert cols.min() - 1 <= col <= cols.max() + 1
    # anterior at the top of the axial view, superior at the top of coronal and sagittal
    vol = _marked_volume(GRIDS[grid], marker_ras=(0.0, 25.0, 15.0))
    for view, point in (("axial", [0.0, 0.0, 15.0]), ("sagittal", [0.0, 0.0, 0.0]), ("coronal", [0.0, 25.0, 0.0])):
        s = oriented_slice(vol, point, view)
        rows = np.nonzero(s.image.max(axis=1) > 500)[0]
        assert rows.size and rows.max() < s.image.shape[0] / 2, (grid, view)


def test_display_axes_follow_an_oblique_grid_with_honest_directions():
    a = np.radians(25)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    rows, cols, depth = display_axes(make_grid([0, 0, 0], (1, 1, 1), (5, 5, 5), rot), "axial")
    assert (cols.voxel_axis, rows.voxel_axis, depth.voxel_axis) == (0, 1, 2) and cols.flip and rows.flip
    assert np.allclose(cols.direction_ras, -rot[:, 0]) and direction_letters(-cols.direction_ras) == "RA"


def _overlay_centroid_fraction(png, empty_png, panel: int, panels: int = 3) -> float:
    """x of the centroid of what the MRI overlay adds to panel ``panel`` (0..1 across the panel's picture):
    the difference between the overlay drawn with the MRI and drawn with an empty MRI."""
    from matplotlib import image as mpimg

    img, ref = (mpimg.imread(str(p))[..., :3] for p in (png, empty_png))
    w = img.shape[1] // panels
    sub, sub_ref = img[:, panel * w:(panel + 1) * w], ref[:, panel * w:(panel + 1) * w]
    picture = np.nonzero((sub_ref.max(axis=-1) < 0.5).any(axis=0))[0]   # columns of the (black) CT picture
    ys, xs = np.nonzero(np.abs(sub - sub_ref).sum(axis=-1) > 0.2)
    assert xs.size > 50, "no MRI overlay found in the panel"
    return float((xs.mean() - picture.min()) / (picture.max() - picture.min()))


@needs_matplotlib
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_fusion_qa_pictures_put_patient_right_on_the_image_left(grid, tmp_path):
    from RegistrationFusionLib.registration.qa import write_fusion_pictures

    ct = _marked_volume(GRIDS[grid])
    ct.array[:] = -1000.0
    mri = _marked_volume(GRIDS[grid])     # the MRI shows the marker at R +30 mm (patient right)
    mri.array *= np.linspace(0.6, 1.0, mri.array.shape[2])[None, None, :]   # not one flat value
    empty = _marked_volume(GRIDS[grid])
    empty.array[:] = 0.0
    paths = write_fusion_pictures(ct, mri, [0.0, 0.0, 0.0], tmp_path / "mri")
    ref = write_fusion_pictures(ct, empty, [0.0, 0.0, 0.0], tmp_path / "empty")
    for panel in (0, 1):                  # axial, coronal
        assert _overlay_centroid_fraction(paths["overlay"], ref["overlay"], panel) < 0.45, (grid, panel)


@needs_matplotlib
def test_fusion_qa_panels_carry_orientation_letters_and_a_scale_bar(tmp_path, monkeypatch):
    from RegistrationFusionLib.registration import qa

    drawn = []
    import SmartBiopsyCoreLib.display as display

    orig_letters, orig_bar = display.draw_orientation_letters, display.draw_scale_bar
    monkeypatch.setattr(display, "draw_orientation_letters",
                        lambda ax, u, v, **k: drawn.append(("letters", orig_letters(ax, u, v, **k))))
    monkeypatch.setattr(display, "draw_scale_bar", lambda ax, *a, **k: drawn.append(("bar", orig_bar(ax, *a, **k))))
    vol = _marked_volume(GRIDS["lps-ordered"])
    qa.write_fusion_pictures(vol, vol, [0.0, 0.0, 0.0], tmp_path)
    letters = [d for k, d in drawn if k == "letters"]
    bars = [d for k, d in drawn if k == "bar"]
    assert len(letters) == 6 and len(bars) == 6     # 3 panels x (checkerboard, overlay)
    assert letters[0]["left"] == "R" and letters[1]["top"] == "S" and letters[2]["left"] == "A"
    assert all(b > 0 for b in bars)


@needs_matplotlib
def test_habitat_panel_is_radiological_and_each_habitat_has_exactly_its_palette_colour():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from SmartBiopsyLib.report.sections.habitats import draw_habitat_panel

    direction = GRIDS["ras-ordered"]
    base = _marked_volume(direction, marker_ras=(0.0, 0.0, 0.0))
    base.array[:] = np.linspace(0.0, 1000.0, base.array.shape[2])[None, None, :]   # bright and dark anatomy
    hab = _marked_volume(direction, marker_ras=(25.0, 0.0, 0.0))                   # habitat B on patient right
    hab.array = np.where(hab.array > 0, 2, 0).astype(np.uint8)
    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    draw_habitat_panel(ax, hab, base, np.zeros(3), 40.0, [("Target B", "B", np.array([25.0, 0.0, 0.0]))])
    img = _render(fig)
    b = np.asarray(palette.REGION_COLOURS["B"])
    exact = np.all(np.abs(img - b) <= 1.5 / 255, axis=-1)
    assert exact.sum() > 200
    ys, xs = np.nonzero(exact)
    x0, x1 = (ax.transData.transform([(-40.0, 0.0), (40.0, 0.0)])[:, 0])
    assert xs.mean() < 0.5 * (x0 + x1)                                  # patient right on the image's left
    # inside the region (away from its border and the target cross) every pixel is exactly B's colour
    cx, cy = ax.transData.transform([(-25.0, 4.0)])[0]
    h = img.shape[0]
    block = img[int(h - cy) - 4:int(h - cy) + 4, int(cx) - 4:int(cx) + 4]
    assert np.all(np.abs(block - b) <= 1.5 / 255), block.reshape(-1, 3)[:3]
