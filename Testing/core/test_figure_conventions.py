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
    draw_habitat_panel(ax, hab, base, np.zeros(3), 40.0, [])
    img = _render(fig)
    b = np.asarray(palette.REGION_COLOURS["B"])
    exact = np.all(np.abs(img - b) <= 1.5 / 255, axis=-1)
    assert exact.sum() > 200
    # no second shade of B: blending with the anatomy (transparency) or smoothing at the region's border would
    # give reddish-purple pixels that are not exactly B's colour
    purplish = (img[..., 0] - img[..., 1] > 0.08) & (img[..., 2] - img[..., 1] > 0.03)
    assert (purplish & ~exact).sum() <= 0.02 * exact.sum(), ((purplish & ~exact).sum(), exact.sum())
    ys, xs = np.nonzero(exact)
    x0, x1 = (ax.transData.transform([(-40.0, 0.0), (40.0, 0.0)])[:, 0])
    assert xs.mean() < 0.5 * (x0 + x1)                                  # patient right on the image's left
    # inside the region (away from its border and the target cross) every pixel is exactly B's colour
    cx, cy = ax.transData.transform([(-25.0, 4.0)])[0]
    h = img.shape[0]
    block = img[int(h - cy) - 4:int(h - cy) + 4, int(cx) - 4:int(cx) + 4]
    assert np.all(np.abs(block - b) <= 1.5 / 255), block.reshape(-1, 3)[:3]


def test_mip_of_a_block_puts_patient_right_on_the_image_left():
    from SmartBiopsyCoreLib.display import oriented_mip

    for grid, direction in GRIDS.items():
        vol = _marked_volume(direction)
        centre_ijk = vol.ras_to_ijk_points(np.zeros((1, 3)))[0]
        for view in ("axial", "coronal"):
            mip = oriented_mip(vol.array, vol.ijk_to_ras, centre_ijk, view)
            cols = np.nonzero(mip.image.max(axis=0) > 500)[0]
            assert cols.size and cols.max() < mip.image.shape[1] / 2, (grid, view)
            x = mip.to_display([30.0, 0.0, 0.0], vol.ijk_to_ras_points(centre_ijk[None])[0])[0, 0]
            col = (x - mip.extent[0]) / (mip.extent[1] - mip.extent[0]) * mip.image.shape[1]
            assert cols.min() - 1 <= col <= cols.max() + 1


def test_report_figures_use_the_palette_colours():
    from SmartBiopsyLib.report import figures

    assert figures.HABITAT_COLOURS == palette.HABITAT_COLOURS and figures.REGION_COLOURS == palette.REGION_COLOURS
    rgba = figures.habitat_rgba(np.array([[0, 1], [2, 3]]))
    assert np.allclose(rgba[1, 0, :3], palette.REGION_COLOURS["B"]) and rgba[1, 0, 3] == 1.0 and rgba[0, 0, 3] == 0


def _figure(w=5.0, h=4.0, projection=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(111, projection=projection)


def _path(region="B"):
    e, g = np.array([-60.0, 20.0, 0.0]), np.array([0.0, 0.0, 0.0])
    d = (g - e) / np.linalg.norm(g - e)
    return {"name": f"Target {region}-1", "target": f"Target {region}", "region": region, "entry_ras": e.tolist(),
            "target_ras": g.tolist(), "tip_ras": (g + 15.0 * d).tolist(), "length_mm": 63.2,
            "angle_to_axial_deg": 0.0, "clearance_mm": {"bone": 12.0}}


@needs_matplotlib
def test_reslice_panel_stops_the_needle_at_the_planned_notch_tip_and_marks_the_target_apart(monkeypatch):
    import SmartBiopsyCoreLib.display as display
    from SmartBiopsyLib.report.sections import trajectories

    letters = []
    orig = display.draw_orientation_letters
    monkeypatch.setattr(trajectories, "draw_orientation_letters",
                        lambda ax, u, v, **k: letters.append(orig(ax, u, v, **k)))
    ct = _marked_volume(GRIDS["lps-ordered"], n=(80, 60, 10), spacing=(2.0, 2.0, 3.0))
    t = _path()
    fig, ax = _figure()
    pts = trajectories.draw_path_reslice(ax, ct, t)
    tip_to_target = np.linalg.norm(pts["tip"] - pts["target"])
    assert abs(tip_to_target - 15.0) < 1e-6
    needle = [ln for ln in ax.get_lines() if np.allclose(ln.get_color()[:3] if not isinstance(ln.get_color(), str)
                                                         else (-1, -1, -1), palette.NEEDLE_COLOUR)]
    assert needle, "no needle drawn in the needle colour"
    xs = needle[0].get_xdata()
    assert np.allclose(sorted(xs), sorted([pts["entry"][0], pts["tip"][0]]))     # entry to planned tip only
    markers = {ln.get_marker(): ln for ln in ax.get_lines() if ln.get_marker() not in (None, "None", "")}
    assert {"X", "D", "o"} <= set(markers)                                       # target, planned tip, entry
    assert np.allclose(markers["X"].get_xydata()[0], pts["target"])
    assert np.allclose(markers["D"].get_xydata()[0], pts["tip"])
    assert np.allclose(markers["X"].get_color()[:3], palette.REGION_COLOURS["B"])
    assert not np.allclose(markers["D"].get_color()[:3], markers["X"].get_color()[:3])
    names = {tx.get_text() for tx in ax.texts}
    assert {"target", "planned notch tip"} <= names
    # the needle goes towards the patient's left-posterior: nearest directions on the edges, right on the left
    assert letters and letters[0]["left"].startswith("R") and letters[0]["right"].startswith("L")
    assert any(tx.get_text().endswith(" mm") for tx in ax.texts)                # scale bar


@needs_matplotlib
def test_path_is_visible_over_its_own_habitat_in_the_3d_view():
    from SmartBiopsyLib.report.sections import trajectories

    rng = np.random.default_rng(0)
    ball = rng.normal(size=(3000, 3))
    ball = 25.0 * ball / np.linalg.norm(ball, axis=1, keepdims=True) * rng.uniform(0, 1, (3000, 1)) ** (1 / 3)
    fig, ax = _figure(6, 6, projection="3d")
    trajectories.draw_paths_3d(ax, [_path("B")], ball, np.full(len(ball), 2), None, np.zeros(3), 70.0)
    img = _render(fig)

    def count(colour):
        return int(np.all(np.abs(img - np.asarray(colour)) <= 2.0 / 255, axis=-1).sum())

    assert count(palette.NEEDLE_COLOUR) > 100                  # the path, not hidden by the habitat-B points
    tumour = [c for c in ax.collections if len(c.get_offsets()) == len(ball)]
    assert len(tumour) == 1
    faces = tumour[0].get_facecolor()                         # as drawn (after any depth shading)
    assert np.allclose(faces, [*palette.REGION_COLOURS["B"], 1.0], atol=1e-6)   # one shade, opaque
    assert count(palette.REGION_COLOURS["B"]) > 500            # the tumour in exactly B's colour (no depth shading)
    assert not np.allclose(palette.NEEDLE_COLOUR, palette.REGION_COLOURS["B"])


@needs_matplotlib
@pytest.mark.parametrize("dlp", ([310.0, 45.0, 45.0, 45.0], [600.0, 20.0, 20.0, 20.0], [45.0, 45.0, 45.0, 500.0]))
def test_dose_timeline_labels_clear_the_bars_and_the_legend_clears_the_cumulative_line(dlp):
    from SmartBiopsyLib.report.sections.procedure import draw_dose_timeline

    labels = ["planning", "confirmation A", "confirmation B", "confirmation C"]
    fig, ax = _figure(8, 4.2)
    ax2 = draw_dose_timeline(ax, [2.0, 19.0, 27.0, 35.0], dlp, labels, 60.0)
    fig.tight_layout()
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and a.get_text() in labels)]
    assert len({t.get_text() for t in texts if t.get_visible()}) == len(labels)
    bars = [p.get_window_extent(r) for p in ax.patches]
    assert len(bars) == 4
    for t in texts:
        if t.get_visible() and t.get_text():
            box = t.get_window_extent(r)
            assert not any(box.overlaps(b) for b in bars), t.get_text()
    legend = ax.get_legend().get_window_extent(r)
    line = ax2.get_lines()[0]
    xy = line.get_transform().transform(line.get_path().interpolated(50).vertices)
    inside = (xy[:, 0] >= legend.x0) & (xy[:, 0] <= legend.x1) & (xy[:, 1] >= legend.y0) & (xy[:, 1] <= legend.y1)
    assert not inside.any()


@needs_matplotlib
def test_calibration_picture_panels_are_radiological_with_letters_and_scale(tmp_path, monkeypatch):
    from SmartBiopsyCoreLib.fiducial_frames.model import load_model
    from SmartBiopsyCoreLib.phantom.robot_frame import calibration_ct
    from TrajectoryPlannerLib.calibration import picture
    from TrajectoryPlannerLib.calibration.frame_fit import calibrate_from_ct

    frame = load_model("spheres-6")
    ct, _ = calibration_ct(3, frame, pixel_mm=1.5, slice_mm=2.0)
    cal = calibrate_from_ct(ct, frame, {})
    seen = []
    orig_letters, orig_bar = picture.draw_orientation_letters, picture.draw_scale_bar
    monkeypatch.setattr(picture, "draw_orientation_letters", lambda ax, u, v, **k: seen.append(orig_letters(ax, u, v, **k)))
    monkeypatch.setattr(picture, "draw_scale_bar", lambda ax, *a, **k: seen.append(orig_bar(ax, *a, **k)))
    assert picture.write_calibration_picture(ct, cal, tmp_path / "cal.png")
    letters = [s for s in seen if isinstance(s, dict)]
    assert [lt["left"] for lt in letters] == ["R", "R", "A"] and [lt["top"] for lt in letters] == ["A", "S", "S"]
    assert sum(isinstance(s, float) and s > 0 for s in seen) == 3


def test_report_html_is_responsive_without_a_browser():
    import re

    from SmartBiopsyLib.report.html import HEAD_META, REPORT_CSS, html_table

    assert 'name="viewport"' in HEAD_META and "width=device-width" in HEAD_META
    fixed = [int(w) for prop, w in re.findall(r"(?<![-\w])(width|min-width)\s*:\s*(\d+)px", REPORT_CSS)]
    assert all(w <= 800 for w in fixed), fixed                        # no fixed width wider than 800 px
    sizes = [int(x) for x in re.findall(r"font-size\s*:\s*(\d+)px", REPORT_CSS)]
    assert sizes and min(sizes) >= 14, sizes
    assert re.search(r"img\{[^}]*max-width:100%", REPORT_CSS)
    assert re.search(r"\.table-scroll\{[^}]*overflow-x:auto", REPORT_CSS)
    t = html_table(("a", "b"), [(1, 2)])
    assert t.startswith('<div class="table-scroll"><table>') and t.endswith("</table></div>")


@needs_matplotlib
def test_every_image_panel_of_the_report_has_letters_and_a_scale_bar_and_palette_colours(tmp_path, monkeypatch):
    from matplotlib import image as mpimg
    from matplotlib.axes import Axes

    import SmartBiopsyCoreLib.display as display
    from report_case import build_case
    from SmartBiopsyLib.report.sections import habitats, notch, trajectories
    from SmartBiopsyLib.report.writer import write_report

    build_case(tmp_path)
    images, letters, bars = [], [], []
    orig_imshow, orig_letters, orig_bar = Axes.imshow, display.draw_orientation_letters, display.draw_scale_bar

    def imshow(self, *a, **k):
        images.append(self)
        return orig_imshow(self, *a, **k)

    def with_letters(ax, *a, **k):
        letters.append(ax)
        return orig_letters(ax, *a, **k)

    def with_bar(ax, *a, **k):
        bars.append(ax)
        return orig_bar(ax, *a, **k)

    monkeypatch.setattr(Axes, "imshow", imshow)
    for mod in (display, habitats, notch, trajectories):
        if hasattr(mod, "draw_orientation_letters"):
            monkeypatch.setattr(mod, "draw_orientation_letters", with_letters)
        if hasattr(mod, "draw_scale_bar"):
            monkeypatch.setattr(mod, "draw_scale_bar", with_bar)
    write_report(tmp_path)
    panels = {id(ax): ax for ax in images}
    assert len(panels) >= 3 + 6 + 3 + 9       # habitats, fusion (2 x 3), reslices, notch (3 targets x 3 maps)
    missing_letters = [ax.get_title() for ax in panels.values() if not any(ax is x for x in letters)]
    missing_bar = [ax.get_title() for ax in panels.values() if not any(ax is x for x in bars)]
    assert not missing_letters and not missing_bar, (missing_letters, missing_bar)

    def count(name, colour):
        img = mpimg.imread(str(tmp_path / "figures" / f"{name}.png"))[..., :3]
        return int(np.all(np.abs(img - np.asarray(colour)) <= 2.0 / 255, axis=-1).sum())

    for region in "ABC":                      # each habitat in exactly its palette colour
        assert count("habitats_targets", palette.REGION_COLOURS[region]) > 200, region
        assert count("trajectories_3d", palette.REGION_COLOURS[region]) > 20, region
    assert count("trajectories_3d", palette.NEEDLE_COLOUR) > 300    # the paths (not only the legend), visible
    assert count("trajectories_reslice", palette.NOTCH_TIP_COLOUR) > 20


@needs_matplotlib
def test_saved_png_is_drawn_once_with_the_same_pixels_as_savefig(tmp_path):
    """display.save_png after tight_layout: one draw instead of savefig's two, and exactly savefig's pixels."""
    import matplotlib.image as mpimg
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from SmartBiopsyCoreLib.display import save_png

    def figure():
        fig = Figure(figsize=(6, 3), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 2)
        for k, ax in enumerate(axes):
            im = ax.imshow(np.arange(400.0).reshape(20, 20) * (k + 1), cmap="gray")
            fig.colorbar(im, ax=ax, label="HU")
            ax.set_title(f"panel {k}")
        fig.legend(handles=[axes[0].plot([0, 5], [0, 5], label="needle")[0]], loc="lower center")
        fig.suptitle("suptitle")
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        draws = []
        fig.canvas.mpl_connect("draw_event", lambda _e: draws.append(1))
        return fig, draws

    ref, ref_draws = figure()
    ref.savefig(tmp_path / "ref.png")
    fig, draws = figure()
    save_png(fig, tmp_path / "one.png")
    assert len(ref_draws) == 2 and len(draws) == 1
    assert np.array_equal(mpimg.imread(str(tmp_path / "ref.png")), mpimg.imread(str(tmp_path / "one.png")))
