"""Skin accessibility map: surface geometry, margin-aware values, files in Slicer's LPS convention."""
import numpy as np
import pytest
from vtk.util import numpy_support as ns

from TrajectoryPlannerLib.planning import engine, skinmap

from SmartBiopsyCoreLib.phantom import abdomen as synthetic
from TrajectoryPlannerLib.errors import TrajectoryPlannerError


@pytest.fixture(scope="module")
def plan_and_skin():
    ct, labels, targets = synthetic.make_abdomen()
    r = engine.plan(ct, targets, labelmaps=[(labels, synthetic.RISK_LABELS)],
                    settings=engine.PlanSettings(top_n=1, shared_entry=False))
    return r, skinmap.skin_model(r)


def test_skin_points_lie_on_the_body_surface(plan_and_skin):
    _, poly = plan_and_skin
    p = ns.vtk_to_numpy(poly.GetPoints().GetData())
    lateral = np.abs(p[:, 2]) < 50  # away from the crop's top/bottom faces
    r = np.hypot(p[lateral, 0] / 150.0, p[lateral, 1] / 110.0)
    assert np.all(np.abs(r - 1.0) < 0.03)


def test_values_are_margin_aware_and_zero_where_no_target_is_reachable(plan_and_skin):
    r, poly = plan_and_skin
    p = ns.vtk_to_numpy(poly.GetPoints().GetData())
    c = ns.vtk_to_numpy(poly.GetPointData().GetArray(skinmap.CLEARANCE_ARRAY))
    n = ns.vtk_to_numpy(poly.GetPointData().GetArray(skinmap.REACHABLE_ARRAY))
    assert np.all((c > 0) <= (n > 0))
    assert 0.05 < np.mean(n > 0) < 0.8
    posterior = p[:, 1] < -90  # table side of the supine patient: excluded
    assert np.all(c[posterior] == 0)
    # the best trajectory's entry has a value close to its margin excess
    best = r.trajectories[0]
    k = np.argmin(np.linalg.norm(p - best.entry_ras, axis=1))
    assert c[k] > 0 and n[k] >= 1
    assert c.max() <= max(t.min_margin_excess_mm for t in r.trajectories) + 3 * r.error_bound_mm


def test_written_files_are_lps_and_read_back(plan_and_skin, tmp_path):
    import vtk
    _, poly = plan_and_skin
    for name, reader in (("skin.vtp", vtk.vtkXMLPolyDataReader()), ("skin.vtk", vtk.vtkPolyDataReader())):
        path = skinmap.write_skin_model(poly, tmp_path / name)
        reader.SetFileName(path)
        reader.Update()
        out = reader.GetOutput()
        a = ns.vtk_to_numpy(out.GetPoints().GetData())
        b = ns.vtk_to_numpy(poly.GetPoints().GetData())
        assert np.allclose(a, b * [-1, -1, 1], atol=1e-4)
        assert out.GetPointData().GetArray(skinmap.CLEARANCE_ARRAY) is not None
    with pytest.raises(TrajectoryPlannerError, match=".vtp or .vtk"):
        skinmap.write_skin_model(poly, tmp_path / "skin.stl")
