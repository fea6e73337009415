"""Curvature-aware propagation for ``aa-ggn``/``aa-hvp`` (ESTIMATORS.md §4a): ``propagation`` (the per-stage driver,
presets), ``products`` (Gauss–Newton and Hessian-vector products), ``krylov`` (block Lanczos), ``layout`` (segments
and parameter groups), ``recurrence`` (the per-mode recurrence) and ``trl`` (built-in curvature losses for TRL
stages)."""
