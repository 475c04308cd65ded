"""Reading the model's discover answer without trusting it.

The expected shape is 3–5 lines "N. Category | DESCRIPTION" and a "Summary:" line.
Small base models drift from it: they leave out the number, use ':' or '-' instead of '|',
repeat an idea, copy one from the worked cases, write more than five, put the summary first,
or carry on with an invented next case. Each of
these is tolerated and counted in `problems`; an answer with no usable idea at all falls back to
the need itself as the one idea (`fallback`), so a discover request always has something to
search for. Nothing here raises on bad text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from recsys.discover.prompt import MAX_IDEAS, MIN_IDEAS, worked_ideas
from recsys.llm.parsing import normalize_name
from recsys.llm.prompts import one_line

MAX_CATEGORY_CHARS = 40
MAX_DESCRIPTION_CHARS = 120
MAX_SUMMARY_CHARS = 200
DEFAULT_CATEGORY = "Idea"
FALLBACK_CATEGORY = "Your need"

_NUMBERED = re.compile(r"^(?:(\d{1,3})\s*[.):\]]|[-*\u2022])\s*(.*)$")
_LABELLED = re.compile(r"^(summary|ideas?|customer|need)\s*:\s*(.*)$", re.I)
_IDEAS_HEADER = re.compile(r"^ideas?(?:\s+for\s.*:|\s*:?)$", re.I)
_CASE_HEADER = re.compile(r"^case\s*\d+\s*:?$", re.I)
_CATEGORY_SEPARATORS = ("|", " - ", " \u2013 ", " \u2014 ", ": ")
_DECORATION = " \t*_`\"'"
_TRAILING = " \t*_`\"'.,;:-\u2013\u2014"


@dataclass(frozen=True)
class Idea:
    category: str
    description: str

    def as_dict(self) -> dict:
        return {"category": self.category, "description": self.description}


@dataclass
class ParsedIdeas:
    """The ideas read from one answer and what had to be forgiven to read them."""

    summary: str | None
    ideas: list[Idea]
    fallback: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        return bool(self.problems) and not self.fallback


def _clean(text: str, limit: int) -> str:
    return one_line(text).strip(_DECORATION).rstrip(_TRAILING).strip(_DECORATION)[:limit].strip()


def _has_words(text: str) -> bool:
    return sum(character.isalpha() for character in text) >= 2


def _split_idea(body: str) -> tuple[str | None, str]:
    """(category, description) of an idea line's body; no category when no separator is found."""
    for separator in _CATEGORY_SEPARATORS:
        head, found, tail = body.partition(separator)
        if found and head.strip() and tail.strip():
            return head, tail.replace("|", " ")
    return None, body


def _label(line: str) -> tuple[str, str] | None:
    """('summary'|'ideas'|'customer'|'need'|'case', rest) for a labelled line, else None."""
    if _CASE_HEADER.match(line):
        return "case", ""
    if _IDEAS_HEADER.match(line):
        return "ideas", ""
    match = _LABELLED.match(line)
    if match is None:
        return None
    word = match.group(1).lower()
    return ("ideas" if word.startswith("idea") else word), match.group(2)


def parse_ideas(text: str | None, need: str, copied: frozenset[str] | None = None) -> ParsedIdeas:
    """Summary and ideas from the answer text (the prompt's "1." and what the model wrote after it).

    Reading stops after the summary line or at the first sign of a new case (a 'Case',
    'Customer:' or 'Need:' line, numbering that starts again at 1, or a blank or prose line
    after the ideas). Ideas that repeat one of `copied` (default: the worked cases' ideas, which
    a small model copies whatever the need) are dropped.
    """
    copied_keys = {normalize_name(text_) for text_ in (worked_ideas() if copied is None else copied)}
    summary: str | None = None
    ideas: list[Idea] = []
    seen: set[str] = set()
    problems: list[str] = []
    items_seen = 0
    header_seen = False
    for raw_line in (text or "").replace("\r\n", "\n").split("\n"):
        line = raw_line.strip().strip(_DECORATION).strip()
        if not line:
            if items_seen:
                break
            continue
        label = _label(line)
        if label is not None:
            kind, rest = label
            if kind == "summary" and summary is None:
                summary = _clean(rest, MAX_SUMMARY_CHARS) or None
                if items_seen:
                    break
                continue
            if kind == "ideas" and not items_seen and not header_seen:
                header_seen = True
                if not rest.strip():
                    continue
                line = rest.strip()
            else:
                break
        numbered = _NUMBERED.match(line)
        if numbered and numbered.group(1) == "1" and items_seen:
            break
        body = numbered.group(2) if numbered else line
        category, description = _split_idea(body)
        if numbered is None and category is None:
            if items_seen or header_seen:
                break
            if summary is None:
                summary = _clean(line, MAX_SUMMARY_CHARS) or None
            continue
        items_seen += 1
        description = _clean(description, MAX_DESCRIPTION_CHARS)
        category = _clean(category or "", MAX_CATEGORY_CHARS)
        if not _has_words(description):
            problems.append(f"idea {items_seen} has no description")
            continue
        if category and not _has_words(category):
            category = ""
        if not category:
            problems.append(f"idea {items_seen} has no category")
        key = normalize_name(description)
        if key in copied_keys:
            problems.append(f"idea {items_seen} copies a worked example")
            continue
        if key in seen:
            problems.append(f"idea {items_seen} repeats an earlier one")
            continue
        seen.add(key)
        ideas.append(Idea(category or DEFAULT_CATEGORY, description))
    if summary is None:
        problems.append("no summary")
    if len(ideas) > MAX_IDEAS:
        problems.append(f"{len(ideas)} ideas; kept the first {MAX_IDEAS}")
        ideas = ideas[:MAX_IDEAS]
    if not ideas:
        problems.append("no usable idea; searching for the need itself")
        fallback_need = _clean(need, MAX_DESCRIPTION_CHARS) or one_line(need)[:MAX_DESCRIPTION_CHARS]
        return ParsedIdeas(summary=summary, ideas=[Idea(FALLBACK_CATEGORY, fallback_need)], fallback=True,
                           problems=problems)
    if len(ideas) < MIN_IDEAS:
        problems.append(f"only {len(ideas)} idea(s)")
    return ParsedIdeas(summary=summary, ideas=ideas, problems=problems)
