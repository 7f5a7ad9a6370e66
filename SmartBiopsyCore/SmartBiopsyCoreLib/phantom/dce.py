"""Simulated DCE (test and demo data only): a dark tissue that enhances and a bright one that does not,
written as one DICOM series per frame (as scanners store many dynamic protocols).

Written DICOM says so in its StudyDescription ("SmartBiopsy simulated DCE"); values are arbitrary magnitude
units with Rician noise, times in seconds from the first frame, grid RAS mm.
"""
from __future__ import annotations

import datetime as dt
import os

import numpy as np

from SmartBiopsyCoreLib.dataio import dicomio
from SmartBiopsyCoreLib.geometry import RasVolume, make_grid

T0 = dt.datetime(2024, 3, 1, 10, 0, 0)
SHAPE = (6, 24, 24)
DARK_PRE, DARK_POST, BRIGHT = 30.0, 150.0, 600.0


def tissues():
    """(dark, bright) masks: a small dark tissue that enhances, a large bright one that does not."""
    dark = np.zeros(SHAPE, bool)
    dark[1:5, 3:7, 6:14] = True
    bright = np.zeros(SHAPE, bool)
    bright[1:5, 8:22, 2:22] = True
    return dark, bright


def dce_frames(n_frames=8, arrival=3, dt_s=6.0, sigma=4.0, seed=5):
    """Simulated frames [RasVolume] and times: the dark tissue rises from 30 to 150 over two frames from ``arrival`` on."""
    rng = np.random.default_rng(seed)
    dark, bright = tissues()
    m = make_grid([-18.0, -18.0, -9.0], [1.5, 1.5, 3.0], SHAPE, np.eye(3))
    frames = []
    for t in range(n_frames):
        enh = 0.0 if t < arrival else min(1.0, (t - arrival + 1) / 2.0)
        clean = np.where(dark, DARK_PRE + (DARK_POST - DARK_PRE) * enh, 0.0) + np.where(bright, BRIGHT, 0.0)
        img = np.hypot(clean + rng.normal(0, sigma, SHAPE), rng.normal(0, sigma, SHAPE))
        frames.append(RasVolume(np.round(img).astype(np.float32), m, f"dyn{t}", {}))
    return frames, [dt_s * t for t in range(n_frames)]


def write_dce(out_dir, n_frames=8, arrival=3, frame="1.2.3.4.5", dt_s=6.0, description="t1_vibe_dyn",
              first_series=20):
    """Write the DCE as ``n_frames`` separate MR series (one acquisition time each); returns the frames."""
    frames, times = dce_frames(n_frames, arrival, dt_s)
    for t, (vol, sec) in enumerate(zip(frames, times)):
        dicomio.write_dicom_series(vol, os.path.join(out_dir, f"dyn{t:02d}"), modality="MR",
                                   series_description=description, series_number=first_series + t,
                                   frame_of_reference_uid=frame, flip_angle=12.0,
                                   study_description="SmartBiopsy simulated DCE",
                                   acquisition_datetime=T0 + dt.timedelta(seconds=sec))
    return frames, times
