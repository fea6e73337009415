"""Curvature-free propagation (ESTIMATORS.md §2): ``rules`` holds each optimizer family's recurrence and
preconditioner, ``stage`` carries a stage's update through the later stages' recorded steps."""
