"""Independent checks for planner tests: dense ray-march with exact nearest-voxel distances (KD-tree).

Deliberately shares no code with the planner's distance maps: structure voxel centres from the label map
go into a KD-tree, each path is marched every 0.1 mm and the exact distance to the nearest centre is taken
(:meth:`Oracle.axis_distances`) or, the planner's definition of clearance, to the nearest voxel *surface*
(each voxel a box of the voxel size; :meth:`Oracle.axis_surface_distances`).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


class Oracle:
    def __init__(self, labels, structure_labels: dict[str, tuple[int, ...]], outside_values=(0, 11)):
        self.labels = labels
        arr = np.asarray(labels.array)
        self.trees = {}
        for name, values in structure_labels.items():
            pts = labels.voxel_centres_ras(np.isin(arr, values))
            if len(pts):
                self.trees[name] = cKDTree(pts)
        self.outside_values = outside_values
        # the same voxel centres in a frame where voxels are axis-aligned boxes: index * spacing (mm)
        self.spacing_ijk = np.asarray(labels.spacing, float)
        self.box_trees = {}
        for name, values in structure_labels.items():
            ijk = np.argwhere(np.isin(arr, values))[:, ::-1] * self.spacing_ijk
            if len(ijk):
                self.box_trees[name] = cKDTree(ijk)

    @staticmethod
    def march(start, end, step_mm=0.1):
        start = np.asarray(start, float)
        end = np.asarray(end, float)
        n = max(2, int(np.ceil(np.linalg.norm(end - start) / step_mm)) + 1)
        return start + np.linspace(0, 1, n)[:, None] * (end - start)

    def axis_distances(self, start, end, step_mm=0.1) -> dict[str, float]:
        """Exact min distance (mm) from the densely sampled segment to each structure's voxel centres."""
        pts = self.march(start, end, step_mm)
        return {name: float(tree.query(pts)[0].min()) for name, tree in self.trees.items()}

    def leaves_body(self, start, end, skip_mm=2.0, step_mm=0.1) -> bool:
        pts = self.march(start, end, step_mm)
        depth = np.linalg.norm(pts - np.asarray(start, float), axis=1)
        kji = np.rint(self.labels.ras_to_ijk_points(pts)[:, ::-1]).astype(int)
        kji = np.clip(kji, 0, np.array(self.labels.array.shape) - 1)
        vals = self.labels.array[kji[:, 0], kji[:, 1], kji[:, 2]]
        return bool(np.isin(vals[depth >= skip_mm], self.outside_values).any())

    def axis_surface_distances(self, start, end, step_mm=0.1) -> dict[str, float]:
        """Exact min distance (mm) from the densely sampled segment to each structure's voxel boxes."""
        q = self.labels.ras_to_ijk_points(self.march(start, end, step_mm)) * self.spacing_ijk
        half = self.spacing_ijk / 2.0
        h = float(np.linalg.norm(half))
        out = {}
        for name, tree in self.box_trees.items():
            best = np.inf
            dc = tree.query(q)[0]
            for p in q[dc - h <= dc.min()]:  # a box is at least (centre distance - h) away
                idx = tree.query_ball_point(p, dc.min() + h + 1e-9)
                g = np.maximum(np.abs(tree.data[idx] - p) - half, 0.0)
                best = min(best, float(np.sqrt((g * g).sum(axis=1)).min()))
            out[name] = best
        return out
