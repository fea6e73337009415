"""``CurvatureConfig``: presets as constructors, validation, the StageAttributor keyword, the deprecated dict form,
and the one-to-one CLI flags."""

from __future__ import annotations

import warnings

import pytest

from hf_stage_attribution import CurvatureConfig, StageAttributor
from hf_stage_attribution.cli.attribute_cmd import curvature_config
from hf_stage_attribution.cli.main import build_parser
from hf_stage_attribution.errors import StageAttributionError, UnknownNameError
from hf_stage_attribution.estimators.curvature.propagation import CURVATURE_PRESETS, curvature_settings
from tests.helpers.tiny import linear_ledger


def test_presets_are_constructors_and_match_the_preset_table():
    for name in CURVATURE_PRESETS:
        config = CurvatureConfig.from_preset(name)
        assert config.to_options() == curvature_settings({"preset": name})
    assert CurvatureConfig.default() == CurvatureConfig.from_preset("default")
    assert CurvatureConfig.cheap().max_segments == 1
    assert CurvatureConfig.cheap().replace(krylov_size=4).to_options() == curvature_settings(
        {"preset": "cheap", "krylov_size": 4}
    )


@pytest.mark.parametrize(
    "changes", [{"krylov_size": 0}, {"max_segments": -1}, {"sample_size": 1.5}, {"krylov_size": True}]
)
def test_bad_values_are_refused(changes):
    with pytest.raises(StageAttributionError, match="positive integer"):
        CurvatureConfig.default().replace(**changes)


def test_unknown_preset_suggests_the_known_ones():
    with pytest.raises(UnknownNameError, match="cheap"):
        CurvatureConfig.from_preset("chaep")


@pytest.fixture
def ledger_and_model(tmp_path):
    return linear_ledger(tmp_path / "ledger")


def test_attributor_takes_the_typed_config(ledger_and_model):
    ledger, model = ledger_and_model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attributor = StageAttributor(ledger, model, estimator="delta-fd", curvature=CurvatureConfig.cheap())
    assert attributor.estimator_options["curvature_options"] == CurvatureConfig.cheap().to_options()


def test_the_old_dict_form_still_works_and_warns(ledger_and_model):
    ledger, model = ledger_and_model
    with pytest.warns(FutureWarning, match="CurvatureConfig"):
        attributor = StageAttributor(
            ledger, model, estimator="delta-fd", estimator_options={"curvature_options": {"preset": "cheap"}}
        )
    assert attributor.estimator_options["curvature_options"] == {"preset": "cheap"}
    with pytest.raises(StageAttributionError, match="only"):
        StageAttributor(
            ledger,
            model,
            estimator="delta-fd",
            estimator_options={"curvature_options": {"preset": "cheap"}},
            curvature=CurvatureConfig.cheap(),
        )


def test_cli_flags_map_one_to_one():
    parser = build_parser()
    base = ["attribute", "L", "--model", "M", "--behaviors", "B", "--output-dir", "O"]
    assert curvature_config(parser.parse_args(base)) is None
    args = parser.parse_args(
        base
        + ["--curvature-preset", "cheap", "--krylov-size", "6", "--curvature-segments", "2",
           "--curvature-sample-size", "32"]
    )  # fmt: skip
    assert curvature_config(args) == CurvatureConfig(preset="cheap", krylov_size=6, max_segments=2, sample_size=32)
    assert curvature_config(parser.parse_args(base + ["--krylov-size", "5"])) == CurvatureConfig.default().replace(
        krylov_size=5
    )
