"""Digital phantoms for the demo, tests and benchmarks (everything they produce is simulated and says so):
the retroperitoneal-sarcoma case (sarcoma), a small analytic abdomen for planner tests (abdomen) and a DCE (dce)."""
