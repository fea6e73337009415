"""``hf-stage-attribution import-checkpoints SPEC --output DIR``: table/JSON output, one-line errors, --help."""

from __future__ import annotations

import json

import pytest
import yaml

from hf_stage_attribution.checkpoints.cache import lay_out_hub_cache
from hf_stage_attribution.cli.main import main
from tests.checkpoints.test_fixtures import recorded_run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    _, folders, rates = recorded_run(root, stage_steps=(2, 2))
    commits = lay_out_hub_cache(root / "cache", "org/tiny", {"v0": folders[0], "v1": folders[1], "v2": folders[2]})
    return {"dir": root / "cache", "commits": commits, "rates": rates}


def _spec(tmp_path, stages, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"stages": stages}) if name.endswith(".yaml") else json.dumps({"stages": stages}))
    return str(path)


def test_import_prints_a_table_and_json(cache, tmp_path, capsys):
    stages = [
        {"model": "org/tiny", "revision": "v0"},
        {"model": "org/tiny", "revision": "v1", "name": "sft", "kind": "sft",
         "optimizer": {"type": "AdamW", "learning_rates": cache["rates"][0]}},
        {"model": "org/tiny", "revision": "v2", "name": "final"},
    ]  # fmt: skip
    spec = _spec(tmp_path, stages)
    args = ["import-checkpoints", spec, "--output", str(tmp_path / "a"), "--cache-dir", str(cache["dir"])]
    assert main([*args, "--offline", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Imported 2 stage(s)" in out and "org/tiny@v1 (" + cache["commits"]["v1"][:8] in out
    assert "delta-linear, delta-fd" in out
    assert main([*args[:3], str(tmp_path / "b"), *args[4:], "--offline", "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["stages"]] == ["sft", "final"]
    assert summary["stages"][0]["optimizer"] == "AdamW" and summary["stages"][0]["num_steps"] == 2
    # the stage after "sft" has no optimizer information: aa-* is not offered for sft, and the reason says why
    assert "aa-linear" not in summary["stages"][0]["estimators"] and "final" in summary["stages"][0]["reason"]
    assert "aa-linear" in summary["stages"][1]["estimators"]


def test_errors_are_one_line_with_nonzero_exit(cache, tmp_path, capsys):
    spec = _spec(
        tmp_path, [{"model": "org/tiny", "revision": "v0"}, {"model": "org/tiny", "revision": "v9"}], "s.json"
    )
    code = main(["import-checkpoints", spec, "--output", str(tmp_path / "x"), "--cache-dir", str(cache["dir"]),
                 "--offline", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("hf-stage-attribution import-checkpoints: error:") and "'v9'" in err
    assert err.count("\n") == 1 and not (tmp_path / "x").exists()
    (tmp_path / "bad.yaml").write_text("stages: {model: x}\n")
    assert main(["import-checkpoints", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "y")]) == 1
    assert "under `stages`" in capsys.readouterr().err


def test_warnings_are_one_line_each_and_steps_come_from_trainer_state(cache, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    for step, folder in ((2, "v1"), (4, "v2")):  # Trainer checkpoints whose log hides per-step rates
        shutil.copytree(
            cache["dir"] / "models--org--tiny" / "snapshots" / cache["commits"][folder], run / f"checkpoint-{step}"
        )
        state = {"global_step": step, "logging_steps": 2, "max_steps": 4,
                 "log_history": [{"step": s, "learning_rate": 0.01} for s in range(2, step + 1, 2)]}  # fmt: skip
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    spec = _spec(tmp_path, [{"model": "org/tiny", "revision": "v0"}, {"model": str(run), "name": "sft"}])
    args = ["import-checkpoints", spec, "--output", str(tmp_path / "a"), "--cache-dir", str(cache["dir"])]
    assert main([*args, "--offline", "--no-progress"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 2 and all(
        line.startswith("hf-stage-attribution import-checkpoints: warning: ") for line in lines
    )
    assert "logging_steps=2" in lines[0] and ".py" not in captured.err  # no source file, no source line
    rows = [line.split() for line in captured.out.splitlines() if line.startswith(("0 ", "1 "))]
    assert [row[4] for row in rows] == ["2", "2"]  # steps: from trainer_state.json (no optimizer information)


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["import-checkpoints", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "SPEC" in out and "--output" in out and "--allow-pickle" in out


def test_spec_paths_starting_with_dot_are_relative_to_the_spec(tmp_path):
    from hf_stage_attribution.checkpoints.spec import load_spec

    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "spec.yaml"
    path.write_text("stages:\n  - {model: ../runs/base}\n  - {model: org/name, revision: v1}\n")
    stages = load_spec(path)
    assert stages[0]["model"] == str((tmp_path / "runs" / "base").resolve()) and stages[1]["model"] == "org/name"
