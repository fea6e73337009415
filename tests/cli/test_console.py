"""The quiet console: library logs, progress bars and harmless warnings off by default, back with --verbose."""

from __future__ import annotations

import io
import logging
import warnings

import datasets
import huggingface_hub.utils as hub_utils
import pytest
import transformers.utils.logging as tf_logging

from hf_stage_attribution.cli.console import Console, quiet_console


def test_quiet_console_lowers_library_logs_and_restores_them():
    def state():
        return (
            tf_logging.get_verbosity(), datasets.utils.logging.get_verbosity(), hub_utils.logging.get_verbosity(),
            tf_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled(),
            hub_utils.are_progress_bars_disabled(),
        )  # fmt: skip

    before = state()
    with quiet_console():
        assert tf_logging.get_verbosity() == logging.ERROR and not tf_logging.is_progress_bar_enabled()
        assert hub_utils.logging.get_verbosity() == logging.ERROR and hub_utils.are_progress_bars_disabled()
        assert not datasets.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # as quiet_console
            warnings.warn_explicit("gone", FutureWarning, "x.py", 1, module="transformers.training_args")
            warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="hf_stage_attribution.report.files")
        assert [str(w.message) for w in seen] == ["ours"]  # our own warnings still show
    assert state() == before


def test_verbose_changes_nothing():
    before = tf_logging.get_verbosity()
    with quiet_console(verbose=True):
        assert tf_logging.get_verbosity() == before


def test_phase_is_one_plain_line_off_a_terminal_and_keeps_library_prints_back(capsys):
    stream = io.StringIO()
    console = Console(stream=stream)
    with console.phase("replaying", total=3) as phase:
        print({"loss": 1.0})  # what transformers' PrinterCallback does at each log step
        for _ in range(3):
            phase.update()
    assert capsys.readouterr().out == ""
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("replaying: done (3/3) in ") and "\r" not in stream.getvalue()
    with pytest.raises(RuntimeError), console.phase("failing"):
        print("what the trainer said")
        raise RuntimeError("boom")
    assert "what the trainer said" in stream.getvalue()  # kept back output is shown when the phase fails
    verbose = Console(verbose=True, stream=io.StringIO())
    with verbose.phase("loud"):
        print("shown")
    assert capsys.readouterr().out == "shown\n"


# --- the demo's and inspect's words (audit of 2026-12-06, problems 12 and 13) ------------------------------------

_IMPORTED_AT = __import__("time").time()


def test_the_demo_hint_passes_the_digits_stage_functions_on_the_command_line():
    import inspect

    from hf_stage_attribution.cli import demo_cmd
    from hf_stage_attribution.cli.attribute_cmd import stage_functions

    assert "cannot pass stage functions" not in inspect.getsource(demo_cmd.run_digits)
    options = demo_cmd.digits_stage_fn_options().split()
    assert options[0] == "--trust-code"
    fns = stage_functions([options[i + 1] for i, o in enumerate(options) if o == "--stage-fn"], trust_code=True)
    assert sorted(fns) == ["finetune", "patch", "pretraining"]
    from hf_stage_attribution.examples.spurious_digits import new_model

    model, optimizer = fns["patch"](new_model("small"), max_steps=1)  # the stage's own recipe, one step
    assert model is not None and optimizer.state


def test_the_demo_timer_starts_when_the_process_did():
    from hf_stage_attribution.cli.demo_cmd import process_start

    started = process_start()
    assert started is not None and started < _IMPORTED_AT


def test_inspect_prints_enough_digits_for_a_small_stage():
    from hf_stage_attribution.cli.inspect_cmd import times

    assert times(285.7e3 / 90.9e6) == "0.0031×" and times(6.431) == "6.43×"
