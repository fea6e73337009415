"""Model cards are untrusted on the way in and must not be injectable on the way out.

Complements the property test in tests/model_card/test_writer.py (which checks the markdown source) by *rendering*
the card section with a CommonMark + tables renderer (markdown-it-py) and comparing the HTML structure with a
card built from harmless names: hostile stage, dataset and behavior names (and descriptions, units) must not
add links, images, raw HTML, headings, lists, rules, code blocks or table cells. Also: a README whose YAML
front matter is hostile (python tags, not a mapping, broken) is refused without running anything or changing
the README.
"""

from __future__ import annotations

import html
import re
import tempfile
import unicodedata
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_stage_attribution.errors import ModelCardError
from hf_stage_attribution.model_card.writer import render_section, write_model_card
from hf_stage_attribution.report import AttributionReport

markdown_it = pytest.importorskip("markdown_it")

HOSTILE = [
    "[click](javascript:alert(1))",
    "![x](http://e/x.png)",
    "<img src=x onerror=alert(1)>",
    "<!-- x",
    "-->",
    "# heading",
    "## h2",
    "---",
    "===",
    "- item",
    "+ item",
    "* item",
    "1. item",
    "> quote",
    "    indented code",
    "```",
    "~~~",
    "| a | b |",
    "a\n\n# b",
    "x\r\n---",
    "&lt;script&gt;",
    "\\",
    "<http://evil.example>",
    "[ref]: http://evil.example",
    "\u2028line\u2029",
]


class _Structure(HTMLParser):
    """Counts of tags (with the link/image targets) and the text of every table cell."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags[tag] += 1
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.cells.append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _structure(section: str) -> _Structure:
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(section)
    parser = _Structure()
    parser.feed(rendered)
    return parser


def _report(stages: list[str], behavior: str, data: str, description: str = "harmless") -> AttributionReport:
    per_example = {behavior: {s: [float(i), 1.0] for i, s in enumerate(stages)}}
    return AttributionReport.build(
        per_example,
        estimator="aa-linear",
        stages=[{"name": s, "kind": "sft", "data": {"name": data}} for s in stages],
        total_change=None,
        behaviors={behavior: {"unit": description, "description": description}},
        versions={},
    )


# Tags that would mean injected structure; emphasis (strong/em) is left out: a name with leading blanks only
# keeps "**" from turning bold, which changes nothing but the look.
STRUCTURE = ("a", "img", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "ul", "ol", "li", "pre", "code", "blockquote",
             "table", "tr", "td", "th", "p", "script", "iframe", "style")  # fmt: skip


def _tags(found: _Structure) -> dict[str, int]:
    return {tag: found.tags[tag] for tag in STRUCTURE} | {"other": sum(
        n for tag, n in found.tags.items() if tag not in STRUCTURE and tag not in ("strong", "em")
    )}  # fmt: skip


BASELINE = _structure(render_section(_report(["s0", "s1"], "toxicity", "corpus"), plot_name=None))


def _shown(text: str) -> str:
    """How a name should read once rendered: line breaks, control, format and unassigned characters become spaces
    (so none can reorder or hide text), the rest is kept."""
    invisible = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
    return " ".join("".join(" " if unicodedata.category(c) in invisible else c for c in text).split())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stage=st.sampled_from(HOSTILE) | st.text(min_size=1, max_size=10),
    behavior=st.sampled_from(HOSTILE) | st.text(min_size=1, max_size=10),
    data=st.sampled_from(HOSTILE) | st.text(min_size=1, max_size=10),
)
def test_hostile_stage_dataset_and_behavior_names_do_not_change_the_rendered_structure(stage, behavior, data):
    stages = ["s0", stage] if stage.strip() and stage != "s0" else ["s0", "s1"]
    behavior = behavior if behavior.strip() else "b"  # reports refuse blank behavior names (tested elsewhere)
    section = render_section(_report(stages, behavior, data), plot_name=None)
    found = _structure(section)
    assert _tags(found) == _tags(BASELINE)
    assert _shown(stages[1]) in found.cells, "the stage name should appear, as text, in a table cell"
    assert _shown(data) in found.cells, "the dataset name should appear, as text, in a table cell"


@pytest.mark.parametrize("description", ["---", "- item", "+ item", "1. item", "    indented code"])
def test_hostile_behavior_descriptions_do_not_change_the_rendered_structure(description):
    found = _structure(render_section(_report(["s0", "s1"], "toxicity", "corpus", description), plot_name=None))
    assert _tags(found) == _tags(BASELINE)


def test_a_stage_name_cannot_become_a_link_even_through_a_reference_definition():
    section = render_section(_report(["s0", "[ref]"], "b", "[ref]: http://evil.example"), plot_name=None)
    rendered = markdown_it.MarkdownIt("commonmark").enable("table").render(section)
    assert "evil.example" in rendered and not re.search(r"href=\"[^\"]*evil", rendered)


# --- hostile README front matter -------------------------------------------------------------------------------

FRONT_MATTER = {
    "python tag": "---\nlicense: mit\nx: !!python/object/apply:os.system ['touch {marker}']\n---\n# Model\n",
    "python name tag": "---\nx: !!python/name:os.system\n---\n# Model\n",
    "not a mapping": "---\n- 1\n- 2\n---\n# Model\n",
    "broken YAML": "---\nkey: [unclosed\n---\n# Model\n",
}


@pytest.mark.parametrize("case", sorted(FRONT_MATTER))
def test_hostile_front_matter_is_refused_and_nothing_runs_or_changes(tmp_path, case):
    marker = tmp_path / "pwned"
    readme = tmp_path / "README.md"
    readme.write_text(FRONT_MATTER[case].replace("{marker}", str(marker)))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ModelCardError, match=re.escape(str(readme))):
        write_model_card(_report(["a", "b"], "tox", "d"), readme, plot=False)
    assert not marker.exists()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_html_entities_in_names_are_shown_literally():
    with tempfile.TemporaryDirectory() as tmp:
        files = write_model_card(_report(["a", "&lt;b&gt;"], "tox", "d"), Path(tmp), plot=False)
        text = files.readme.read_text()
    cells = _structure(text[text.index("<!--") :]).cells
    assert "&lt;b&gt;" in cells and html.unescape("&lt;b&gt;") not in cells
