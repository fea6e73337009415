"""The model-card writer: golden cards, idempotence, foreign content, bad input, escaping, TRL survival."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_stage_attribution.errors import ModelCardError, ReportError
from hf_stage_attribution.model_card import (
    METADATA_KEY,
    PLOT_NAME,
    SECTION_BEGIN,
    SECTION_END,
    SIDECAR_NAME,
    keep_section_callback,
    write_model_card,
)
from hf_stage_attribution.report import (
    AttributionReport,
    BehaviorDiagnostics,
    BehaviorSummary,
    ReportRow,
    StageSummary,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cards"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def fixed_report(fingerprint: str = "4f2a9c0d11e3b7a5", final_hash: str = "9e8d7c6b5a493827", shift: float = 0.0):
    """A report built from fixed numbers (no training, no bootstrap): the golden cards depend on nothing else."""
    stages = [
        StageSummary(
            0,
            "pretraining",
            "pretraining",
            200,
            "AdamW",
            1e-4,
            5e-4,
            {"datasets": [{"name": "toy-corpus", "size": 512, "fingerprint": "a1b2c3d4e5f60718"}]},
        ),
        StageSummary(
            1, "sft", "sft", 40, "AdamW, weight decay 0.01", 2e-5, 2e-5, {"name": "toxic-sft", "split": "train"}
        ),
        StageSummary(2, "dpo", "dpo", 20, "AdamW", 5e-6, 5e-6, None),
    ]
    tox = [
        (0.021, -0.01, 0.05, [0.0, 0.05, 0.013]),
        (0.84 + shift, 0.61, 1.07, [1.2, 0.5, 0.82]),
        (-0.31, -0.45, -0.18, [-0.4, -0.2, -0.33]),
    ]
    replay = {"toxicity": [0.019, 0.79, -0.29], "margin": [1.46, -0.04, 0.003]}  # validate ran: ground truth
    rows = [
        ReportRow(s.name, s.index, "toxicity", "aa-ggn", e, lo, hi, per, e / 0.62, r)
        for s, (e, lo, hi, per), r in zip(stages, tox, replay["toxicity"])
    ]
    margin = [(1.5, 1.1, 1.9, [1.0, 2.0]), (-0.05, -0.2, 0.1, [0.1, -0.2]), (0.002, -0.01, 0.014, [0.0, 0.004])]
    rows += [
        ReportRow(s.name, s.index, "margin", "aa-ggn", e, lo, hi, per, None, r)
        for s, (e, lo, hi, per), r in zip(stages, margin, replay["margin"])
    ]
    diagnostics = {
        "toxicity": BehaviorDiagnostics(
            0.62,
            0.551 + shift,
            0.069 - shift,
            ["aa-linear", "aa-fd"],
            {
                "pretraining": {"linear": 0.021, "fd": 0.02, "gap": -0.001, "relative_gap": 0.0012},
                "sft": {"linear": 0.84, "fd": 0.8, "gap": -0.04, "relative_gap": 0.048},
                "dpo": {"linear": -0.31, "fd": -0.3, "gap": 0.01, "relative_gap": 0.012},
            },
            ["Adam preconditioner frozen at the segment midpoint"],
            1,
            {"krylov_size": 12},
        ),
        "margin": BehaviorDiagnostics(
            None, 1.452, None, None, {}, ["Adam preconditioner frozen at the segment midpoint"], 1
        ),
    }
    return AttributionReport(
        rows=rows,
        stages=stages,
        behaviors=[
            BehaviorSummary("toxicity", "nats", "log p(toxic) − log p(clean) of completions", 3),
            BehaviorSummary("margin", "logit", "", 2),
        ],
        estimator="aa-ggn",
        estimator_reason="the ledger holds curvature material",
        approximations=["Adam preconditioner frozen at the segment midpoint"],
        diagnostics=diagnostics,
        fidelity={
            "all pairs": {"num_pairs": 6, "pearson": 0.91, "spearman": 0.83, "sign_agreement": 1.0},
            "non-terminal pairs (k < K)": {"num_pairs": 4, "pearson": 0.72, "spearman": None, "sign_agreement": 0.75},
        },
        ledger={"name": "ledger", "fingerprint": fingerprint, "final_hash": final_hash, "num_stages": 3},
        versions={"hf-stage-attribution": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"},
        interval={
            "method": "percentile bootstrap over behavior examples (paired across stages)",
            "confidence": 0.95,
            "resamples": 1000,
            "seed": 0,
        },
    )


def _check_golden(produced: bytes, name: str) -> None:
    golden = FIXTURES / name
    if UPDATE:
        golden.write_bytes(produced)
    assert golden.exists(), f"{golden} is missing: run with UPDATE_GOLDEN=1 to create it"
    assert produced == golden.read_bytes(), f"{name} differs from the golden file (UPDATE_GOLDEN=1 regenerates it)"


def test_golden_cards(tmp_path):
    report = fixed_report()
    (tmp_path / "new").mkdir()
    new = write_model_card(report, tmp_path / "new", plot=True)
    _check_golden(new.readme.read_bytes(), "new_card.md")
    existing = tmp_path / "existing" / "README.md"
    existing.parent.mkdir()
    existing.write_bytes((FIXTURES / "foreign_input.md").read_bytes())
    write_model_card(report, existing)
    _check_golden(existing.read_bytes(), "foreign_card.md")


def _section(text: str) -> str:
    return text[text.index(SECTION_BEGIN) : text.index(SECTION_END) + len(SECTION_END)]


def _table_after(section: str, heading: str) -> list[list[str]]:
    lines = section[section.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_card_parses_back_with_huggingface_hub(tmp_path):
    files = write_model_card(fixed_report(), tmp_path)
    card = ModelCard.load(files.readme)
    meta = card.data.to_dict()[METADATA_KEY]
    assert list(meta) == [
        "library_version",
        "estimator",
        "ledger_fingerprint",
        "ledger_final_hash",
        "stages",
        "behaviors",
        "replay_validated",
        "report",
        "plot",
    ]
    assert meta["estimator"] == "aa-ggn" and [s["name"] for s in meta["stages"]] == ["pretraining", "sft", "dpo"]
    assert meta["stages"][1] == {"index": 1, "name": "sft", "kind": "sft", "num_steps": 40}
    assert meta["behaviors"][0]["direction"] == "raised" and meta["behaviors"][0]["top_stage_replay_effect"] == 0.79
    assert [(b["name"], b["top_stage"]) for b in meta["behaviors"]] == [("toxicity", "sft"), ("margin", "pretraining")]
    section = _section(card.text)
    stages = _table_after(section, "### Training stages")
    assert [row[1] for row in stages] == ["pretraining", "sft", "dpo"] and stages[0][3] == "200"
    effects = _table_after(section, "#### toxicity")
    assert [row[1:6] for row in effects][1] == ["sft", "+0.84", "[+0.61, +1.07]", "+0.79", "72 %"]
    claim = "**sft** raised toxicity the most (+0.84 nats, 95 % interval (example sampling) [+0.61, +1.07]"
    assert claim + "; replay measured +0.79)." in section
    assert "Unit: nats. Positive" in section and "(nats)" not in section
    assert AttributionReport.from_json(files.sidecar) == fixed_report()
    assert (tmp_path / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({PLOT_NAME})" in section


def test_card_says_which_stages_raised_and_which_lowered_a_behavior(tmp_path):
    report = AttributionReport.build(
        {"toxicity": {"sft": [0.8, 0.9], "lora": [0.1, 0.3], "dpo": [-38.0, -38.32]}},
        estimator="aa-linear",
        behaviors={"toxicity": {"unit": "nats"}},
        n_resamples=50,
        versions={},
    )
    section = _section(write_model_card(report, tmp_path, plot=False).readme.read_text())
    assert "**dpo** lowered toxicity the most (-38.16 nats, 95 % interval (example sampling) [" in section
    assert (
        "Stages pushed toxicity in opposite directions: raised by **sft** (+0.85), **lora** (+0.2); "
        "lowered by **dpo** (-38.16)." in section
    )
    assert "Most accountable stage" not in section and "effect ÷ total change" not in section
    # nothing checked this estimate (no replay, no second estimator): the claim says so
    assert "Verdict: estimated — unreliable: nothing to check it against" in section


def test_trust_verdict_sits_beside_the_direction_sentence(tmp_path):
    report = fixed_report()
    report.diagnostics["toxicity"].trust = {"verdict": "verified", "label": "verified by replay", "reason": "r"}
    section = _section(write_model_card(report, tmp_path, plot=False).readme.read_text())
    claim = next(line for line in section.splitlines() if line.startswith("**sft** raised toxicity the most"))
    assert claim.endswith("]; replay measured +0.79). Verdict: verified by replay.")
    margin = next(line for line in section.splitlines() if line.startswith("**pretraining** raised margin"))
    assert " Verdict: " in margin  # no stored verdict: one is assessed from the report's own figures


def test_hub_start_is_linked_as_base_model_and_nothing_enters_model_index(tmp_path):
    report = fixed_report()
    report.ledger["start_source"] = {"model": "org/base-lm", "location": "hub", "revision": "v1"}
    report.stages[1].source = {"model": "/data/runs/sft", "location": "local"}
    files = write_model_card(report, tmp_path, plot=False)
    card = ModelCard.load(files.readme)
    data = card.data.to_dict()
    assert data["base_model"] == "org/base-lm" and data["base_model_relation"] == "finetune"
    assert "model-index" not in data and "model_index" not in data and "eval_results" not in data
    meta = data[METADATA_KEY]
    assert meta["start_source"]["model"] == "org/base-lm"
    assert meta["stages"][1]["source"] == {"model": "/data/runs/sft", "location": "local"}
    section = _section(card.text)
    assert "Start of the first stage (θ_0): [org/base-lm](https://huggingface.co/org/base-lm/tree/v1)" in section
    assert [row[-1] for row in _table_after(section, "### Training stages")] == [
        "n/a",
        "local folder /data/runs/sft",
        "n/a",
    ]
    before = files.readme.read_bytes()
    write_model_card(report, tmp_path, plot=False)
    assert files.readme.read_bytes() == before  # idempotent: the links are added once
    # an author's own base_model (and model-index) are never replaced
    readme = tmp_path / "own" / "README.md"
    readme.parent.mkdir()
    own = "---\nbase_model: org/other\nmodel-index:\n- name: m\n  results: []\n---\n# Model\n"
    readme.write_text(own)
    write_model_card(report, readme, plot=False)
    data = ModelCard.load(readme).data.to_dict()
    assert data["base_model"] == "org/other" and "base_model_relation" not in data
    assert data["model-index"] == [{"name": "m", "results": []}]


def test_twice_is_byte_identical_and_rewrites_nothing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_bytes((FIXTURES / "foreign_input.md").read_bytes())
    write_model_card(fixed_report(), readme)
    paths = [readme, tmp_path / SIDECAR_NAME, tmp_path / PLOT_NAME]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in paths]
    time.sleep(0.01)
    write_model_card(fixed_report(), readme)
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in paths] == before


def _strip_ours(text: str) -> str:
    text = re.sub(rf"(?m)^{METADATA_KEY}:.*\n(?:[ \t].*\n)*", "", text)
    return text[: text.index(SECTION_BEGIN)] + text[text.index(SECTION_END) + len(SECTION_END) :]


def test_foreign_content_outside_the_section_is_kept_byte_for_byte(tmp_path):
    readme = tmp_path / "README.md"
    original = (FIXTURES / "foreign_input.md").read_text()
    readme.write_text(original)
    write_model_card(fixed_report(), readme)
    first = readme.read_text()
    assert first.startswith(original.split("\n---\n")[0]) and original.split("\n---\n", 1)[1] in first
    # the owner adds content after our section and a YAML key after ours; a new report replaces only our parts
    edited = first.replace("\n---\n", "\nextra_key: kept  # note\n---\n", 1) + "\n## Owner's notes\n\nStill here.\n"
    readme.write_text(edited)
    write_model_card(fixed_report(shift=0.25), readme)
    second = readme.read_text()
    assert second != edited and "+1.09" in _section(second)
    assert _strip_ours(second) == _strip_ours(edited)
    assert ModelCard.load(readme).data.to_dict()["extra_key"] == "kept"


@pytest.mark.parametrize(
    "content",
    [
        "# Title only\n\nNo front matter.\n",
        "",
        "\ufeff---\nlicense: mit\n---\nbody\n",
        "---\r\nlicense: mit\r\n---\r\n\r\nbody\r\n",
        "---\n---\nempty front matter\n",
        "No newline at end",
    ],
    ids=["no-front-matter", "empty", "bom", "crlf", "empty-front-matter", "no-final-newline"],
)
def test_any_valid_readme_gets_front_matter_and_section_once(tmp_path, content):
    readme = tmp_path / "README.md"
    readme.write_bytes(content.encode())
    write_model_card(fixed_report(), readme, plot=False)
    text = readme.read_bytes().decode()
    card = ModelCard.load(readme)
    assert (
        card.data.to_dict()[METADATA_KEY]["estimator"] == "aa-ggn" and "plot" not in card.data.to_dict()[METADATA_KEY]
    )
    assert text.count(SECTION_BEGIN) == text.count(SECTION_END) == 1
    assert text.startswith("\ufeff") == content.startswith("\ufeff")
    if "\r\n" in content:
        assert "\n" not in text.replace("\r\n", "")
    body = content.split("---", 2)[-1] if content.lstrip("\ufeff").startswith("---") else content
    assert body.strip() in text
    once = readme.read_bytes()
    write_model_card(fixed_report(), readme, plot=False)
    assert readme.read_bytes() == once


@pytest.mark.parametrize(
    "content,match",
    [
        ("---\nlicense: [mit\n---\nbody\n", "does not parse"),
        ("---\nlicense: mit\nno closing fence\n", "without a closing one"),
        ("---\n- a list\n- not a mapping\n---\n", "does not parse"),
        (f"---\nlicense: mit\n---\n{SECTION_BEGIN}\nx\n{SECTION_BEGIN}\n{SECTION_END}\n", "marker"),
        (f"---\nlicense: mit\n---\n{SECTION_END}\nx\n{SECTION_BEGIN}\n", "marker"),
    ],
    ids=["broken-yaml", "unclosed-front-matter", "yaml-not-a-mapping", "two-begin-markers", "markers-reversed"],
)
def test_invalid_cards_raise_and_stay_untouched(tmp_path, content, match):
    readme = tmp_path / "README.md"
    readme.write_text(content)
    with pytest.raises(ModelCardError, match=match):
        write_model_card(fixed_report(), readme)
    assert readme.read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no sidecar, no plot, no temp file


def test_report_of_another_ledger_is_refused_unless_overwrite(tmp_path):
    readme = tmp_path / "README.md"
    write_model_card(fixed_report(), readme, plot=False)
    before = readme.read_bytes()
    with pytest.raises(ReportError, match="different ledger"):
        write_model_card(fixed_report(fingerprint="0000000000000000"), readme)
    with pytest.raises(ReportError, match="ledger_final_hash"):
        write_model_card(fixed_report(final_hash="1111111111111111"), readme)
    assert readme.read_bytes() == before and not (tmp_path / PLOT_NAME).exists()
    write_model_card(fixed_report(fingerprint="0000000000000000"), readme, plot=False, overwrite=True)
    assert ModelCard.load(readme).data.to_dict()[METADATA_KEY]["ledger_fingerprint"] == "0000000000000000"


def test_missing_model_directory_and_report_path(tmp_path):
    with pytest.raises(ModelCardError, match="to exist"):
        write_model_card(fixed_report(), tmp_path / "no-such-model")
    with pytest.raises(ModelCardError, match="to exist"):
        write_model_card(fixed_report(), tmp_path / "no-such-model" / "README.md")
    assert list(tmp_path.iterdir()) == []
    sidecar = tmp_path / "report.json"
    fixed_report().to_json(sidecar)
    files = write_model_card(sidecar, tmp_path, plot=False)  # a report path works as well as a report
    assert files.readme == tmp_path / "README.md" and AttributionReport.from_json(files.sidecar) == fixed_report()


def test_push_without_network_fails_clearly_after_writing_locally(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelCardError, match="pushing it to 'someone/tiny-model' failed"):
        write_model_card(fixed_report(), tmp_path, push_to_hub="someone/tiny-model", create_pr=True, plot=False)
    assert SECTION_BEGIN in (tmp_path / "README.md").read_text()


_NASTY = [
    "|",
    "a|b",
    "x\ny",
    "<script>alert(1)</script>",
    "---",
    "key: value",
    "# heading",
    "*bold* _it_",
    "`code`",
    SECTION_END,
    SECTION_BEGIN,
    "&amp;",
    "\r\n",
    "\x00\x1b[31m",
    "{{ jinja }}",
    "{% raw %}",
    "'quote\"",
    "- item",
    "? q",
    "!!python/object:os.system",
    "[link](http://x)",
    "![img](x.png)",
    "\u202eevil",
    "$\\frac{",
    "\\|",
    " ",
]
_NAME = st.one_of(
    st.sampled_from(_NASTY), st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
)


def _unescaped_pipes(line: str) -> int:
    count, i = 0, 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        count += line[i] == "|"
        i += 1
    return count


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stages=st.lists(_NAME.filter(lambda s: s.strip()), min_size=2, max_size=4, unique=True),
    behaviors=st.lists(_NAME.filter(lambda s: s.strip()), min_size=1, max_size=2, unique=True),
    data=_NAME,
    unit=_NAME,
)
def test_hostile_names_keep_the_yaml_valid_and_the_tables_intact(stages, behaviors, data, unit):
    per_example = {b: {s: [float(i + j), 1.0] for i, s in enumerate(stages)} for j, b in enumerate(behaviors)}
    summaries = [{"name": s, "kind": data, "data": {"name": data}} for s in stages]
    report = AttributionReport.build(
        per_example,
        estimator="aa-linear",
        stages=summaries,
        total_change=None,
        behaviors={b: {"unit": unit, "description": data} for b in behaviors},
        approximations=[data],
        versions={data: unit},
        ledger={"fingerprint": data},
    )
    with tempfile.TemporaryDirectory() as tmp:
        readme = Path(tmp) / "README.md"
        readme.write_text("---\nlicense: mit\n---\n# Model\n")
        write_model_card(report, readme, plot=False)
        meta = ModelCard.load(readme).data.to_dict()[METADATA_KEY]
        assert [s["name"] for s in meta["stages"]] == stages and [b["name"] for b in meta["behaviors"]] == behaviors
        assert meta["ledger_fingerprint"] == data and meta["behaviors"][0]["top_stage"] in stages
        front = readme.read_text().split("\n---\n")[0]
        assert yaml.safe_load(front.removeprefix("---\n"))["license"] == "mit"
        body = ModelCard.load(readme).text  # (the YAML may hold a marker-like string as data; the body may not)
        assert body.count(SECTION_BEGIN) == 1 and body.count(SECTION_END) == 1
        section = _section(body)
        inner = section[len(SECTION_BEGIN) : -len(SECTION_END)]
        assert "<" not in inner and ">" not in inner  # no raw HTML: no tag can open, no comment can close
        table_lines = [line for line in inner.splitlines() if line.startswith("|")]
        groups: dict[int, int] = {}
        for line in table_lines:
            assert line.endswith("|")
            groups[_unescaped_pipes(line)] = groups.get(_unescaped_pipes(line), 0) + 1
        assert set(groups) <= {8, 7}  # every row of the stage table has 7 cells, of an effect table 6
        assert len(_table_after(inner, "### Training stages")) == len(stages)


def test_hostile_names_do_not_break_the_plot(tmp_path):
    report = AttributionReport.build({"$\\frac{": {"a\nb": [1.0], "$x$": [2.0]}}, estimator="aa-fd", versions={})
    assert report.plot(tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


_WRITER = """
import sys
from pathlib import Path
from hf_stage_attribution.report.files import atomic_write_bytes
path, big = Path(sys.argv[1]), int(sys.argv[2])
contents = [b"A" * big, b"B" * big]
print("ready", flush=True)
i = 0
while True:
    atomic_write_bytes(path, contents[i % 2])
    i += 1
"""


def test_a_killed_writer_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / "README.md"
    big = 4_000_000
    target.write_bytes(b"A" * big)
    for delay in (0.05, 0.2, 0.4):
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_WRITER), str(target), str(big)], stdout=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        data = target.read_bytes()
        assert data in (b"A" * big, b"B" * big)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "README.md"]
    assert all(name.startswith(".README.md.") and name.endswith(".tmp") for name in leftovers)


def _tiny_sft_trainer(out: Path, callbacks: list):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    texts = [f"the model said {w} and then {v}" for w in ("hello", "thanks", "sorry") for v in ("left", "stayed")]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<unk>", "<eos>"], show_progress=False)
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=32,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    args = SFTConfig(
        output_dir=str(out),
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        per_device_train_batch_size=2,
        bf16=False,
        activation_checkpointing=False,  # (transformers 5.24 name of gradient_checkpointing)
        use_cpu=True,
        report_to=[],
        max_length=32,
        logging_steps=1,
        save_only_model=True,
        disable_tqdm=True,
    )
    model = GPT2LMHeadModel(config)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tok,
        callbacks=callbacks,
    )


def test_section_survives_a_trl_sft_trainer_that_rewrites_the_readme(tmp_path):
    report = fixed_report()
    control, kept = tmp_path / "control", tmp_path / "kept"
    for out in (control, kept):
        out.mkdir()
        write_model_card(report, out, plot=False)
    _tiny_sft_trainer(control, []).train()
    assert SECTION_BEGIN not in (control / "README.md").read_text()  # TRL's card replaced ours: the hazard is real
    callback = keep_section_callback(kept / SIDECAR_NAME, kept / "README.md", plot=False)
    _tiny_sft_trainer(kept, [callback]).train()
    text = (kept / "README.md").read_text()
    card = ModelCard.load(kept / "README.md")
    assert "trl" in card.data.to_dict().get("tags", []) and "TRL" in text  # TRL's own card is there...
    assert text.count(SECTION_BEGIN) == 1 and card.data.to_dict()[METADATA_KEY]["estimator"] == "aa-ggn"  # ...and ours
    assert callback.writes == 3  # two checkpoint saves and the end of training
