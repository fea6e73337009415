"""``CurvatureConfig``: the settings of the curvature-aware propagation (``aa-ggn``, ``aa-hvp``) as one typed object.

It replaces the ``curvature_options={"preset": ...}`` dict (still accepted, with a ``FutureWarning``, for one
release). Each field maps one-to-one to a CLI flag of ``attribute``/``validate``/``intervene``:

==================  ===========================
field               flag
==================  ===========================
``preset``          ``--curvature-preset``
``krylov_size``     ``--krylov-size``
``max_segments``    ``--curvature-segments``
``sample_size``     ``--curvature-sample-size``
==================  ===========================

Example:
    >>> CurvatureConfig.cheap()
    CurvatureConfig(preset='cheap', krylov_size=8, max_segments=1, sample_size=None)
    >>> CurvatureConfig.cheap().replace(krylov_size=6).to_options()["krylov_size"]
    6
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import StageAttributionError, unknown_name
from .propagation import CURVATURE_PRESETS


@dataclass(frozen=True)
class CurvatureConfig:
    """How the curvature-aware propagation (ESTIMATORS.md §4a) spends its products.

    Build one from a preset (:meth:`default`, :meth:`cheap`, :meth:`from_preset`) and override fields with
    :meth:`replace`; the preset's name travels with it into the report's diagnostics and the embedding cache key.
    """

    #: The named preset these settings start from (``default`` or ``cheap``; see
    #: :data:`~hf_stage_attribution.estimators.curvature.propagation.CURVATURE_PRESETS`).
    preset: str = "default"
    #: Krylov (Ritz) vectors per curvature segment: more vectors capture more of the curvature spectrum, each costs
    #: one curvature product per segment.
    krylov_size: int = 12
    #: Curvature segments used per later stage (``None``: every recorded segment). ``1`` uses the recorded segment
    #: nearest the middle of the stage.
    max_segments: int | None = None
    #: Training examples per segment used for the products (``None``: every example the recorder captured).
    sample_size: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in CURVATURE_PRESETS:
            raise unknown_name("curvature preset", str(self.preset), tuple(CURVATURE_PRESETS))
        for name in ("krylov_size", "max_segments", "sample_size"):
            value = getattr(self, name)
            if value is None and name != "krylov_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StageAttributionError(
                    f"CurvatureConfig.{name} must be a positive integer{'' if name == 'krylov_size' else ' or None'}, "
                    f"got {value!r}."
                )

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Any) -> CurvatureConfig:
        """The settings of preset ``name``, with ``overrides`` applied (``None`` overrides are ignored)."""
        if name not in CURVATURE_PRESETS:
            raise unknown_name("curvature preset", str(name), tuple(CURVATURE_PRESETS))
        fields = {**CURVATURE_PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(preset=name, **fields)

    @classmethod
    def default(cls) -> CurvatureConfig:
        """Every recorded segment, 12 Krylov vectors each: the most faithful setting."""
        return cls.from_preset("default")

    @classmethod
    def cheap(cls) -> CurvatureConfig:
        """One segment per later stage and 8 Krylov vectors: ESTIMATORS.md §5's cheap configuration, for later
        stages too short for the default to be cheap next to replay."""
        return cls.from_preset("cheap")

    def replace(self, **changes: Any) -> CurvatureConfig:
        """A copy with ``changes`` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_options(self) -> dict[str, Any]:
        """The keyword options the embedding computation takes (``curvature_settings`` form)."""
        return dataclasses.asdict(self)


def resolve_curvature(
    curvature: CurvatureConfig | None, legacy: Mapping[str, Any] | None = None, *, where: str = "estimator_options"
) -> dict[str, Any]:
    """The curvature options for the estimators, from a :class:`CurvatureConfig` or the legacy dict.

    The legacy ``curvature_options`` dict still works for one release and warns; passing both is an error.

    Example:
        >>> resolve_curvature(CurvatureConfig.cheap())["max_segments"]
        1
        >>> resolve_curvature(None)
        {}
    """
    if curvature is not None and legacy:
        raise StageAttributionError(
            f"Got both `curvature=` and a `curvature_options` dict in {where}; pass only "
            "`curvature=CurvatureConfig(...)`."
        )
    if legacy:
        warnings.warn(
            f"`curvature_options` in {where} is deprecated and will be removed in the next release; pass "
            "`curvature=CurvatureConfig.from_preset(...)` (CLI: --curvature-preset, --krylov-size, "
            "--curvature-segments, --curvature-sample-size).",
            FutureWarning,
            stacklevel=3,
        )
        return dict(legacy)
    if curvature is None:
        return {}
    if not isinstance(curvature, CurvatureConfig):
        raise StageAttributionError(
            f"Expected `curvature` to be a CurvatureConfig, got {type(curvature).__name__}. Build one with "
            "CurvatureConfig.default(), CurvatureConfig.cheap() or CurvatureConfig.from_preset(name, **overrides)."
        )
    return curvature.to_options()


__all__ = ["CurvatureConfig", "resolve_curvature"]
