"""Editing a README in place: our YAML key in the front matter and our section between markers, nothing else.

Everything outside our key and our markers is kept byte for byte (other YAML keys, their formatting and
comments, the body, line endings, a byte-order mark), so re-running the writer is idempotent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ModelCardError

SECTION_BEGIN = "<!-- hf-stage-attribution:begin -->"
SECTION_END = "<!-- hf-stage-attribution:end -->"
METADATA_KEY = "stage_attribution"
_KEY_LINE = re.compile(rf"""^(?:{METADATA_KEY}|"{METADATA_KEY}"|'{METADATA_KEY}')[ \t]*:""")
_EMPTY_FRONT_MATTER = re.compile(r"^(\s*---[ \t]*(?:\r\n|\r|\n))(---[ \t]*(?:\r\n|\n|$))")
_BOM = "\ufeff"


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
    line_break = "\r\n" if "\r\n" in text else "\n"
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


def splice_metadata(parts: CardParts, block: str) -> str:
    """The new front matter (fences included) with our top-level key replaced by ``block`` or appended."""
    lb = parts.line_break
    if parts.yaml_start is None:
        return f"---{lb}{block}{lb}---{lb}"
    yaml_text = parts.yaml_text
    lines = re.findall(r"[^\n]*\n|[^\n]+$", yaml_text)  # only \n ends a line (str.splitlines also splits on \x85...)
    start = next((i for i, line in enumerate(lines) if _KEY_LINE.match(line)), None)
    if start is None:
        if not yaml_text:
            new_yaml = block
        elif yaml_text.endswith(("\n", "\r")):
            new_yaml = yaml_text + block
        else:
            new_yaml = yaml_text + lb + block
    else:
        end = start + 1
        while end < len(lines) and (lines[end][:1] in (" ", "\t") or not lines[end].strip()):
            end += 1
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        tail = lb if lines[end - 1].endswith(("\n", "\r")) else ""
        new_yaml = "".join(lines[:start]) + block + tail + "".join(lines[end:])
    if parts.yaml_start == parts.yaml_end and not yaml_text and parts.head[parts.yaml_start :].startswith("---"):
        new_yaml += lb  # an empty front matter '---\n---' has no line break before its closing fence
    return parts.head[: parts.yaml_start] + new_yaml + parts.head[parts.yaml_end :]


def splice_section(body: str, section: str, line_break: str) -> str:
    """``body`` with the text between our markers (markers included) replaced by ``section``, or it appended."""
    begins = [m.start() for m in re.finditer(re.escape(SECTION_BEGIN), body)]
    ends = [m.start() for m in re.finditer(re.escape(SECTION_END), body)]
    if not begins and not ends:
        if not body:
            return section + line_break
        if body.endswith(("\n\n", "\r\n\r\n")):
            return body + section + line_break
        if body.endswith(("\n", "\r")):
            return body + line_break + section + line_break
        return body + line_break + line_break + section + line_break
    if len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0]:
        return body[: begins[0]] + section + body[ends[0] + len(SECTION_END) :]
    raise ModelCardError(
        f"Expected at most one '{SECTION_BEGIN}' followed by one '{SECTION_END}' in the README, found "
        f"{len(begins)} begin and {len(ends)} end marker(s) in the wrong order or number. Remove the broken "
        "stage-attribution section by hand and retry; the README was not changed."
    )
