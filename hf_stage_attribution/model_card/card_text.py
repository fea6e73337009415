"""Editing a README in place: our YAML key in the front matter and our section between markers, nothing else.

Everything outside our key and our markers is kept byte for byte (other YAML keys, their formatting and
comments, the body, each line's own line ending, a byte-order mark), so re-running the writer is idempotent. Lines
the writer adds end with the file's dominant line ending (``\r\n`` or ``\n``). :func:`strip_attribution` removes
our key and section again (a card copied to a model derived from this one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import yaml

from ..errors import ModelCardError
from ..report.text import append_block, dominant_line_break, ends_with_blank_line, line_ending

SECTION_BEGIN = "<!-- hf-stage-attribution:begin -->"
SECTION_END = "<!-- hf-stage-attribution:end -->"
METADATA_KEY = "stage_attribution"
_KEY_LINE = re.compile(rf"""^(?:{METADATA_KEY}|"{METADATA_KEY}"|'{METADATA_KEY}')[ \t]*:""")
_EMPTY_FRONT_MATTER = re.compile(r"^(\s*---[ \t]*(?:\r\n|\r|\n))(---[ \t]*(?:\r\n|\n|$))")
_BOM = "\ufeff"
_LINE_START = re.compile(r"\A(?:\r\n|\r|\n)")


@dataclass
class CardParts:
    """A README split as huggingface_hub splits it: byte-order mark, front matter (with its fences), body.

    Example:
        >>> split_card("---\\nlicense: mit\\n---\\n# Model\\n").yaml_text
        'license: mit'
    """

    bom: str
    head: str
    yaml_start: int | None  # offsets of the YAML text inside ``head`` (None: no front matter)
    yaml_end: int | None
    body: str
    line_break: str

    @property
    def yaml_text(self) -> str:
        """The YAML between the fences ('' without front matter)."""
        return "" if self.yaml_start is None else self.head[self.yaml_start : self.yaml_end]


def split_card(content: str) -> CardParts:
    """Split README text; ModelCardError for a front matter that opens with ``---`` and never closes."""
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    bom = _BOM if content.startswith(_BOM) else ""
    text = content[len(bom) :]
    line_break = dominant_line_break(text)
    match = REGEX_YAML_BLOCK.search(text)
    if match:
        return CardParts(bom, text[: match.end()], match.start(2), match.end(2), text[match.end() :], line_break)
    empty = _EMPTY_FRONT_MATTER.match(text)
    if empty:
        pos = empty.end(1)
        return CardParts(bom, text[: empty.end()], pos, pos, text[empty.end() :], line_break)
    if text.lstrip().startswith("---"):
        raise ModelCardError(
            "Expected a README whose YAML front matter opens with '---' and closes with a '---' line, found an "
            "opening '---' without a closing one. Close the front matter (or remove the leading '---') and retry; "
            "the README was not changed."
        )
    return CardParts(bom, "", None, None, text, line_break)


def _yaml_lines(yaml_text: str) -> list[str]:
    """The YAML's lines, each with its own ending; only ``\\n`` ends a line (``str.splitlines`` also splits on
    ``\\x85``...)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", yaml_text)


def _key_span(lines: list[str]) -> tuple[int, int] | None:
    """``(start, end)``: the lines of our top-level key (its indented or blank continuation lines, trailing blank
    lines excluded), or None when the front matter has no such key."""
    start = next((i for i, line in enumerate(lines) if _KEY_LINE.match(line)), None)
    if start is None:
        return None
    end = start + 1
    while end < len(lines) and (lines[end][:1] in (" ", "\t") or not lines[end].strip()):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return start, end


def splice_metadata(parts: CardParts, block: str) -> str:
    """The new front matter (fences included) with our top-level key replaced by ``block`` or appended.

    Every existing line keeps its own line ending; the lines of ``block`` end with ``parts.line_break``.
    """
    lb = parts.line_break
    if parts.yaml_start is None:
        return f"---{lb}{block}{lb}---{lb}"
    yaml_text = parts.yaml_text
    lines = _yaml_lines(yaml_text)
    span = _key_span(lines)
    if span is None:
        if not yaml_text:
            new_yaml = block
        elif yaml_text.endswith(("\n", "\r")):
            new_yaml = yaml_text + block
        else:  # the last line's own ending follows the YAML (before the closing fence): it ends that line still
            closing = _LINE_START.match(parts.head[parts.yaml_end :])
            new_yaml = yaml_text + (closing.group(0) if closing else lb) + block
    else:
        start, end = span
        new_yaml = "".join(lines[:start]) + block + line_ending(lines[end - 1]) + "".join(lines[end:])
    if parts.yaml_start == parts.yaml_end and not yaml_text and parts.head[parts.yaml_start :].startswith("---"):
        new_yaml += lb  # an empty front matter '---\n---' has no line break before its closing fence
    return parts.head[: parts.yaml_start] + new_yaml + parts.head[parts.yaml_end :]


def remove_metadata(parts: CardParts) -> str:
    """The front matter (fences included) without our top-level key, every other byte kept; ``''`` when our key
    was all it held. ModelCardError when the other keys would not read back the same (e.g. anchors into our key).

    Example:
        >>> remove_metadata(split_card("---\\nlicense: mit\\nstage_attribution:\\n  a: 1\\n---\\n# M\\n"))
        '---\\nlicense: mit\\n---\\n'
    """
    if parts.yaml_start is None:
        return parts.head
    yaml_text = parts.yaml_text
    lines = _yaml_lines(yaml_text)
    span = _key_span(lines)
    if span is None:
        return parts.head
    start, end = span
    kept, after = lines[:start], lines[end:]
    if not "".join(kept + after).strip():
        return ""
    new_yaml = "".join(kept + after)
    if not after and not line_ending(lines[end - 1]):  # our key was the last line: the closing fence's break ends
        new_yaml = new_yaml[: len(new_yaml) - len(line_ending(new_yaml))]  # the line before it now
    try:
        original = yaml.safe_load(yaml_text)
    except yaml.YAMLError as exc:
        raise ModelCardError(
            f"Expected the README's YAML front matter to parse, it does not ({str(exc).splitlines()[0]}); fix it, "
            f"or remove the {METADATA_KEY!r} key by hand."
        ) from exc
    try:
        stripped = yaml.safe_load(new_yaml)
    except yaml.YAMLError:
        stripped = None
    if not isinstance(original, dict) or stripped != {k: v for k, v in original.items() if k != METADATA_KEY}:
        raise ModelCardError(
            f"Removing {METADATA_KEY!r} from the README's front matter would change its other keys (unusual layout, "
            f"e.g. a flow-style mapping or anchors). Move {METADATA_KEY!r} to a block-style top-level key, or remove "
            "it by hand."
        )
    return parts.head[: parts.yaml_start] + new_yaml + parts.head[parts.yaml_end :]


def _section_span(body: str) -> tuple[int, int] | None:
    """Where our section (markers included) is in ``body``: ``(begin, end)``, None without markers;
    ModelCardError for markers in the wrong order or number."""
    begins = [m.start() for m in re.finditer(re.escape(SECTION_BEGIN), body)]
    ends = [m.start() for m in re.finditer(re.escape(SECTION_END), body)]
    if not begins and not ends:
        return None
    if len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        return begins[0], ends[0] + len(SECTION_END)
    raise ModelCardError(
        f"Expected at most one '{SECTION_BEGIN}' followed by one '{SECTION_END}' in the README, found "
        f"{len(begins)} begin and {len(ends)} end marker(s) in the wrong order or number. Remove the broken "
        "stage-attribution section by hand and retry; the README was not changed."
    )


def splice_section(body: str, section: str, line_break: str) -> str:
    """``body`` with the text between our markers (markers included) replaced by ``section``, or it appended."""
    span = _section_span(body)
    if span is None:
        return append_block(body, section, line_break)
    return body[: span[0]] + section + body[span[1] :]


def remove_section(body: str) -> str:
    """``body`` without our section (markers included) and the line break after it; at the end of the body, also
    without the blank line :func:`splice_section` put before it. Everything else is kept byte for byte.

    Example:
        >>> remove_section("# M\\n\\n" + SECTION_BEGIN + "\\nours\\n" + SECTION_END + "\\n")
        '# M\\n'
    """
    span = _section_span(body)
    if span is None:
        return body
    before, after = body[: span[0]], body[span[1] :]
    after = after[len(_LINE_START.match(after).group(0)) :] if _LINE_START.match(after) else after
    if not after and ends_with_blank_line(before):
        before = before[: len(before) - len(line_ending(before))]
    return before + after


def strip_attribution(content: str) -> str:
    """README text without the stage-attribution section and the ``stage_attribution`` YAML key (a front matter
    that held nothing else goes too); every other byte is kept. For the card of a model derived from this one (an
    intervention), whose weights the section and key no longer describe. ModelCardError for broken markers or a
    front matter that does not parse.

    Example:
        >>> card = "---\\nlicense: mit\\nstage_attribution:\\n  estimator: aa-linear\\n---\\n# M\\n\\nMine.\\n\\n"
        >>> strip_attribution(card + SECTION_BEGIN + "\\n## Accountability\\n" + SECTION_END + "\\n")
        '---\\nlicense: mit\\n---\\n# M\\n\\nMine.\\n'
        >>> strip_attribution("# No card of ours\\r\\n")
        '# No card of ours\\r\\n'
    """
    parts = split_card(content)
    return parts.bom + remove_metadata(parts) + remove_section(parts.body)
