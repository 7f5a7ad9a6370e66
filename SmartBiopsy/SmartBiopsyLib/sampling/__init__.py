"""Sampling: needle detection in the confirmation CT (needle), the notch region and its map values (notch),
MRML nodes (mrml), and the simulated confirmation CT used only by the demo and tests (needle_sim)."""
