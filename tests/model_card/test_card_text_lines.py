"""``card_text``: each existing line keeps its own line ending (a README with mixed endings), the lines the writer
adds use the file's dominant one; ``strip_attribution`` takes our key and section out again, byte for byte."""

from __future__ import annotations

import pytest

from hf_stage_attribution.errors import ModelCardError
from hf_stage_attribution.model_card import (
    METADATA_KEY,
    SECTION_BEGIN,
    SECTION_END,
    strip_attribution,
    write_model_card,
)
from hf_stage_attribution.report import AttributionReport
from hf_stage_attribution.report.text import dominant_line_break


def _report() -> AttributionReport:
    return AttributionReport.build({"toxicity": {"pretraining": [0.1, 0.2], "sft": [0.9, 1.2]}},
                                   estimator="aa-linear", versions={})  # fmt: skip


def _write(tmp_path, content: str) -> str:
    readme = tmp_path / "README.md"
    readme.write_bytes(content.encode("utf-8"))
    write_model_card(_report(), readme, plot=False)
    return readme.read_bytes().decode("utf-8")


def _ours(line: str) -> bool:
    return line.startswith((f"{METADATA_KEY}:", "  ", "- ")) or line.strip() == ""


@pytest.mark.parametrize(
    "content,added",
    [
        ("---\nlicense: mit\n---\n# M\r\nline\n", "\n"),  # front matter \n, body \r\n: \n dominates
        ("---\r\nlicense: mit\r\ntags: a\n---\r\n# M\r\n\r\ntext\r\n", "\r\n"),  # the last YAML line ends in \n
        (f"---\nlicense: mit\r\n{METADATA_KEY}:\r\n  old: 1\r\nother: 2\n---\n# M\r\n", "\r\n"),  # our key mid-way
        (f"---\r\nlicense: mit\n{METADATA_KEY}: {{}}\n---\r\nbody\r\n", "\r\n"),  # our key last, \n lines
    ],
    ids=["lf-front-matter-crlf-body", "last-yaml-line-lf", "key-in-the-middle", "key-last"],
)
def test_every_existing_line_keeps_its_own_line_ending(tmp_path, content, added):
    new = _write(tmp_path, content)
    assert dominant_line_break(content) == added
    before = new[: new.index(SECTION_BEGIN)]
    kept = [line for line in before.splitlines(keepends=True) if not _ours(line)]
    assert kept == [line for line in content.splitlines(keepends=True) if not _ours(line)]
    section = new[new.index(SECTION_BEGIN) : new.index(SECTION_END)]
    assert section.count(added) == section.count("\n")  # the lines we add: the dominant ending only
    once = new.encode()
    assert _write(tmp_path, new).encode() == once  # idempotent


def test_an_lf_front_matter_above_a_crlf_body_stays_lf(tmp_path):
    """The front matter's ``license: mit\\n`` used to become ``license: mit\\r\\n`` (one file-wide line break)."""
    new = _write(tmp_path, "---\nlicense: mit\n---\n# M\r\nline\n")
    assert new.startswith(f"---\nlicense: mit\n{METADATA_KEY}:\n  ")
    assert "\r" not in new.replace("# M\r\nline\n", "")
    assert f"\n---\n# M\r\nline\n\n{SECTION_BEGIN}\n" in new and new.endswith(f"\n{SECTION_END}\n")


@pytest.mark.parametrize(
    "content",
    [
        "---\nlicense: apache-2.0\ntags:\n- text-generation  # a comment\n---\n\n# My model\n\nHand written.\n",
        "---\r\nlicense: mit\r\n---\r\n# M\r\n\r\ntext\r\n",
        "\ufeff---\nlicense: mit\n---\n# M\n",
        "# Title only\n\nNo front matter.\n",
        "---\nlicense: mit\n---\n# M\r\nline\n",
        "",
    ],
    ids=["plain", "crlf", "bom", "no-front-matter", "mixed", "empty"],
)
def test_strip_attribution_gives_back_the_card_before_the_writer(tmp_path, content):
    new = _write(tmp_path, content)
    assert SECTION_BEGIN in new and f"{METADATA_KEY}:" in new
    assert strip_attribution(new) == content
    assert strip_attribution(content) == content


def test_strip_attribution_keeps_text_and_keys_around_ours():
    card = (
        f"---\nlicense: mit\n{METADATA_KEY}:\n  estimator: aa-linear\n  stages:\n  - a\n\n# next key\nother: 2\n---\n"
        f"# M\n\n{SECTION_BEGIN}\n## Accountability: training-stage attribution\n{SECTION_END}\n\n## After\nkeep\n"
    )
    assert strip_attribution(card) == "---\nlicense: mit\n\n# next key\nother: 2\n---\n# M\n\n\n## After\nkeep\n"
    only_ours = f"---\n{METADATA_KEY}:\n  a: 1\n---\n{SECTION_BEGIN}\nx\n{SECTION_END}\n"
    assert strip_attribution(only_ours) == ""
    with pytest.raises(ModelCardError, match="marker"):
        strip_attribution(f"# M\n{SECTION_BEGIN}\nno end\n")
    with pytest.raises(ModelCardError, match="other keys"):
        strip_attribution(f"---\n{METADATA_KEY}: &a\n  x: 1\nother: *a\n---\n")
